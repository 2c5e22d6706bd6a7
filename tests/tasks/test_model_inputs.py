"""Applying a model card to a stack: the warnings when the input lies outside the training ranges."""

from __future__ import annotations

from cryo_lightning.data.resample import plan_scale
from cryo_lightning.tasks.model_inputs import range_warnings
from cryo_lightning.tasks.model_registry import ModelCard


def test_range_warnings_name_the_values_and_the_ranges():
    card = ModelCard("m", "single-image", box=64, pixel_size_range=(4.0, 6.0), snr_range=(0.05, 0.5))
    plan = plan_scale(128, 1.0, card.pixel_size_range)
    lines = range_warnings(card, plan, snr=0.001)
    assert lines == [
        "pixel size 1 A is outside the range model m was trained at (4-6 A); the model sees the particles "
        "resampled to 4 A",
        "box 32 at the model's pixel size (4 A) differs from the training box 64 of model m",
        "estimated SNR 0.001 of the particles is outside the range model m was trained at (0.05-0.5, by more "
        "than a factor 2)"]
    assert range_warnings(card, plan_scale(64, 5.0, card.pixel_size_range), snr=0.1) == []
    assert range_warnings(ModelCard("u", "single-image"), plan_scale(64, 1.0), snr=1e-4) == []  # nothing known
