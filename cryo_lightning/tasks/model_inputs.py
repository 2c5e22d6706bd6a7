"""How a stack of particles reaches a denoiser, from the model's card: images per set, the
resampling plan, and warnings when the input lies outside what the model was trained on."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from cryo_lightning.data.resample import ScalePlan, in_range, plan_scale
from cryo_lightning.tasks.model_registry import ModelCard

if TYPE_CHECKING:
    from cryo_lightning.tasks.denoise import DenoiseTask

__all__ = ["SINGLE_IMAGE_GROUP", "default_set_size", "scale_plan", "range_warnings"]

# images per forward-pass group for single-image networks, whose output does not depend on the set
SINGLE_IMAGE_GROUP = 64


def default_set_size(card: ModelCard) -> int:
    """Images per set when ``--set-size`` is not given: the card's for a set model; for a
    single-image network (whose output does not depend on the set) a batching group of 64."""
    return card.set_size if card.kind == "set" else max(card.set_size, SINGLE_IMAGE_GROUP)


def scale_plan(task: DenoiseTask, card: ModelCard, box: int, pixel_size: float) -> ScalePlan:
    """How a stack of ``box`` pixels at ``pixel_size`` Angstrom reaches ``task``'s network
    (:func:`~cryo_lightning.data.resample.plan_scale` with the card's pixel-size range and the
    network's fixed box ``L``, if it has one, and the card's ``max_box``)."""
    return plan_scale(box, pixel_size, card.pixel_size_range, getattr(task.net, "L", None), card.max_box)


def _fmt(bounds: tuple[float, float], unit: str = "") -> str:
    lo, hi = bounds
    return f"{lo:g}{unit}" if math.isclose(lo, hi) else f"{lo:g}-{hi:g}{unit}"


def range_warnings(card: ModelCard, plan: ScalePlan, snr: float | None = None) -> list[str]:
    """One line each when the input's pixel size (beyond 1%), box (at the model's pixel size) or
    estimated SNR (beyond a factor 2: the estimate is rough) lies outside what ``card`` says the
    model was trained on, naming both; ranges the card does not know are not checked."""
    lines = []
    name = card.name
    if not in_range(plan.pixel_size, card.pixel_size_range):
        lines.append(f"pixel size {plan.pixel_size:.3g} A is outside the range model {name} was trained at "
                     f"({_fmt(card.pixel_size_range, ' A')}); the model sees the particles resampled to "
                     f"{plan.model_pixel_size:.3g} A")
    capped = card.max_box is not None and plan.model_box == card.max_box
    if capped and plan.crop < plan.box:
        lines.append(f"model {name} works at boxes up to {card.max_box}: the {plan.box}-pixel particles "
                     f"({plan.box * plan.pixel_size:.0f} A) are cropped to the {plan.crop * plan.pixel_size:.0f} A "
                     f"it sees at {plan.model_pixel_size:.3g} A/px")
    if card.box is not None and plan.model_box != card.box:
        lines.append(f"box {plan.model_box} at the model's pixel size ({plan.model_pixel_size:.3g} A) differs from "
                     f"the training box {card.box} of model {name}")
    elif plan.crop != plan.box and not capped:
        lines.append(f"model {name} has a fixed box of {plan.model_box} pixels at {_fmt(card.pixel_size_range, ' A')}: "
                     f"the {plan.box}-pixel particles ({plan.box * plan.pixel_size:.0f} A) are "
                     f"{'cropped' if plan.crop < plan.box else 'zero-padded'} to the "
                     f"{plan.crop * plan.pixel_size:.0f} A it sees")
    if snr is not None and card.snr_range is not None and not card.snr_range[0] / 2 <= snr <= 2 * card.snr_range[1]:
        lines.append(f"estimated SNR {snr:.3g} of the particles is outside the range model {name} was trained at "
                     f"({_fmt(card.snr_range)}, by more than a factor 2)")
    return lines
