"""``cryol models``: the denoisers shipped with cryo-lightning.

Example::

    cryol models
    cryol models --json

lists every model of the registry (``cryo_lightning/pretrained/models.json``, or the file that
``$CRYOL_MODELS`` or ``--manifest`` names): its name (the default one marked ``*``), kind
(single-image or set), training box, pixel-size and SNR ranges, set size, the config and command
that trained it, and its held-out numbers. ``--json`` prints the same as a JSON list. Use a name
with ``cryol denoise --model NAME``, ``cryol reconstruct --denoiser NAME`` or as a fine-tuning
``init_ckpt``.
"""

from __future__ import annotations

import json
import sys

from cryo_lightning.tools.common import add_flag, tool_parser

__all__ = ["format_models", "main"]


def _range(bounds, unit: str = "") -> str:
    if bounds is None:
        return "?"
    lo, hi = bounds
    return f"{lo:g}{unit}" if lo == hi else f"{lo:g}-{hi:g}{unit}"


def format_models(cards: list, manifest: str) -> str:
    """The printed table of ``cards`` (:class:`~cryo_lightning.tasks.model_registry.ModelCard`)."""
    if not cards:
        return (f"No denoisers are shipped yet ({manifest} lists none). Train one with `cryol fit` and denoise "
                "with `cryol denoise --ckpt CHECKPOINT`.")
    rows = [("", "name", "kind", "box", "pixel size (A)", "SNR", "set", "config")]
    for c in cards:
        rows.append(("*" if c.default else "", c.name, c.kind, "?" if c.box is None else str(c.box),
                     _range(c.pixel_size_range), _range(c.snr_range), str(c.set_size), c.config or "?"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"Shipped denoisers ({manifest}; * = default):"]
    for k, row in enumerate(rows):
        lines.append("  ".join(v.rjust(w) if i in (3, 6) else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
                     .rstrip())
        if k == 0:
            continue
        card = cards[k - 1]
        pad = " " * (widths[0] + 2)
        if card.description:
            lines.append(f"{pad}  {card.description}")
        if card.held_out:
            numbers = (f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                       for key, value in card.held_out.items())
            lines.append(f"{pad}  held out: " + ", ".join(numbers))
        if card.train_command:
            wall = f" ({card.wall_time})" if card.wall_time else ""
            lines.append(f"{pad}  trained by: {card.train_command}{wall}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse ``cryol models`` arguments and print the registry."""
    from cryo_lightning.tasks.model_registry import list_models, manifest_path

    p = tool_parser("cryol models", __doc__, particles=False)
    p.add_argument("--manifest", type=str | None, default=None,
                   help="another registry (models.json) instead of the shipped one")
    add_flag(p, "--json", False, "print the models as a JSON list")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    cards = list_models(args.manifest)
    if args.json:
        print(json.dumps([c.to_dict() for c in cards], indent=1))
    else:
        print(format_models(cards, str(manifest_path(args.manifest))))
