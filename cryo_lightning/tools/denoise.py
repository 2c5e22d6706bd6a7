"""``cryol denoise``: denoise a particle stack with a trained model, in sets of context images.

Example::

    cryol denoise --star particles.star --out denoised/
    cryol denoise --model NAME --star particles.star --out denoised/
    cryol denoise --ckpt runs/denoise_transformer/checkpoints/last.ckpt --star particles.star --out denoised/

reads a RELION STAR, a cryoSPARC .cs or a plain .mrcs stack, takes the default shipped model (or
``--model NAME``, ``cryol models`` lists them, or a ``cryol fit`` checkpoint ``--ckpt``),
background-normalises the particles, Fourier-resamples them to the model's pixel size when theirs
lies outside the range it was trained at (a model with a fixed box also gets its field of view),
denoises them in sets of ``--set-size`` particles (random sets, or sets of nearest neighbours in a
rotation-invariant embedding), resamples the result back, and writes ``denoised/<stem>.mrcs`` and
``denoised/<stem>.star`` (every original column kept) at the input's box and pixel size
(``--model-scale``: the model's). Runs on the GPU when there is one and halves the batch when it
runs out of GPU memory.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from jsonargparse.typing import PositiveInt
import numpy as np
import torch
from tqdm import tqdm

from cryo_lightning.abinitio.invariant_features import rotation_invariant_features
from cryo_lightning.data.context_sets import context_sets
from cryo_lightning.data.particle_source import ParticleSource, preprocess_rows
from cryo_lightning.data.preprocess import PreprocessConfig, Preprocessor
from cryo_lightning.data.resample import ScalePlan, estimate_snr
from cryo_lightning.io.errors import InputError
from cryo_lightning.io.mrc import StackWriter
from cryo_lightning.io.output_set import output_set
from cryo_lightning.io.particle_writer import write_star_for_stack
from cryo_lightning.physics.noise import estimate_noise_variance
from cryo_lightning.tools.common import (add_flag, open_particle_input, parse_assume, pick_device, prepare_outputs,
                                         tool_parser)

__all__ = ["denoise_particles", "main"]


# Larger model inputs are Fourier-cropped to this box for the --context neighbours embedding
# (rotation_invariant_features' max_box): its time and memory grow as L^4, and cropping simulated
# 64-pixel particles to half their band found equally close neighbours.
_EMBEDDING_BOX = 64


@torch.no_grad()
def _embedding(net: torch.nn.Module, prepare, rows: np.ndarray, batch: int = 1024) -> torch.Tensor:
    """``(n, D)`` for grouping the particles ``rows`` into neighbour sets: the model's own learned
    embedding when it has one (the rotational set transformer's class memberships), else
    :func:`~cryo_lightning.abinitio.invariant_features.rotation_invariant_features` (CWF-denoised,
    CTF-aware bispectrum invariants), which depend on the whole set: the rows are embedded
    together. ``prepare`` gives the model's inputs, ``batch`` rows at a time."""
    prepared = (prepare(rows[i : i + batch]) for i in range(0, len(rows), batch))

    def ctf_of(p: dict) -> torch.Tensor | None:
        ctf = p.get("ctf")
        return None if ctf is None else ctf.expand_as(p["images"])

    if hasattr(net, "embedding"):
        return torch.cat([net.embedding(p["images"], ctf_of(p)) for p in prepared])
    images, ctfs = zip(*((p["images"], ctf_of(p)) for p in prepared))
    ctf = None if any(c is None for c in ctfs) else torch.cat(ctfs)
    return rotation_invariant_features(torch.cat(images), ctf, max_box=_EMBEDDING_BOX)


def denoise_particles(
    ckpt: str | None, star: str, out: str, set_size: int | None = None, context: str = "random",
    batch_sets: int = 4, datadir: str | None = None, pixel_size: float | None = None,
    assume: dict[str, float] | None = None, device: str = "auto", overwrite: bool = False, seed: int = 0,
    chunk_particles: int = 20000, model: str | None = None, model_scale: bool = False,
    sure_blend: bool | None = None, strict: bool = False,
) -> tuple[Path, Path]:
    """Denoise every particle of ``star`` with the checkpoint ``ckpt`` or the shipped ``model``
    (neither: the default shipped model); returns the (stack, STAR) paths.

    ``set_size`` None: the model card's. ``model_scale``: write at the model's box and pixel size
    instead of the input's. ``strict``: refuse an input with NaN/Inf images instead of leaving them
    out. ``sure_blend`` None: the model's setting; True/False switches the
    per-frequency SURE weighting of a guided model's correction (models/guided_unet.py) on/off.
    """
    from cryo_lightning.tasks.pretrained import (load_denoiser, load_pretrained,  # Lightning only for this command
                                                 set_inference_option)

    if ckpt and model:
        raise InputError("--ckpt and --model both given: choose one (a checkpoint file, or a shipped model name)")
    if ckpt and not (Path(ckpt).exists() or Path(ckpt).is_symlink()):
        raise InputError(f"--ckpt {ckpt}: no such file")
    dev = pick_device(device)
    task, card = load_denoiser(ckpt, dev) if ckpt else load_pretrained(model, dev)
    if sure_blend is not None:
        set_inference_option(task, "sure_blend", sure_blend, f"--{'' if sure_blend else 'no-'}sure-blend")
    with tempfile.TemporaryDirectory() as tmp:
        source = open_particle_input(star, Path(tmp), datadir, pixel_size, assume, strict)
        return _run(task, card, source, Path(star), Path(out), set_size, context, batch_sets, dev, overwrite, seed,
                    chunk_particles, model_scale)


def _run(task, card, source: ParticleSource, star: Path, out: Path, set_size: int | None, context: str,
         batch_sets: int, dev: torch.device, overwrite: bool, seed: int, chunk_particles: int,
         model_scale: bool) -> tuple[Path, Path]:
    from cryo_lightning.tasks.model_inputs import default_set_size, range_warnings, scale_plan

    for message in source.warnings:
        print(f"cryol denoise: warning: {message}", file=sys.stderr)
    set_size = set_size or default_set_size(card)
    pixel_in = float(source.table.particles["pixel_size_A"].median())
    plan = scale_plan(task, card, source.box, pixel_in)
    # background normalisation at the input's box; the CTF is computed on the model's grid
    processor = Preprocessor(PreprocessConfig(), source.box)
    ctf_processor = Preprocessor(PreprocessConfig(normalize=False), plan.model_box)
    mode = source.ctf_mode(processor.config)
    out_box, scale = (plan.model_box, plan.scale) if model_scale else (source.box, 1.0)
    stack_path, star_path = out / f"{star.stem}.mrcs", out / f"{star.stem}.star"
    prepare_outputs([stack_path, star_path], [star, *(i.path for i in source.reader.infos)], overwrite)
    n = len(source)

    def prepare(rows: np.ndarray) -> dict:
        return _prepare(source, rows, processor, ctf_processor, plan, mode, dev)

    snr = None
    if card.snr_range is not None:
        snr = estimate_snr(prepare(np.unique(np.linspace(0, n - 1, min(n, 256)).astype(np.int64)))["images"])
    for message in range_warnings(card, plan, snr):
        print(f"cryol denoise: warning: {message}", file=sys.stderr)

    pixel_out = source.table.particles["pixel_size_A"].to_numpy(np.float64) * scale
    with output_set({"stack": stack_path, "star": star_path}, overwrite) as staged:
        with StackWriter(staged["stack"], n, out_box, pixel_in * scale) as writer:
            progress = tqdm(total=n, desc="denoising", unit="particle", disable=None)
            for start in range(0, n, chunk_particles):  # bounded memory: sets are formed within chunks
                chunk = np.arange(start, min(start + chunk_particles, n))
                embedding = None
                if context == "neighbours":
                    embedding = _embedding(task.net, prepare, chunk)
                sets = [chunk[s] for s in context_sets(len(chunk), set_size, context, seed + start, embedding)]
                i, batch = 0, batch_sets
                while i < len(sets):
                    group = sets[i : i + batch]
                    try:
                        outputs = _denoise_group(task, group, prepare)
                    except torch.OutOfMemoryError:
                        if batch == 1:
                            raise
                        batch = max(1, batch // 2)  # back off and retry the same sets
                        torch.cuda.empty_cache()
                        continue
                    for rows, (denoised, prepared) in zip(group, outputs):
                        images = plan.model_output(denoised, prepared["mean"], prepared["std"], model_scale)
                        writer.write_rows(rows, images.cpu())
                        progress.update(len(rows))
                    i += len(group)
            progress.close()
        write_star_for_stack(source.table, staged["star"], staged["stack"], out_box, pixel_out, ctf_mode=mode)
    return stack_path, star_path


def _prepare(source: ParticleSource, rows: np.ndarray, processor: Preprocessor, ctf_processor: Preprocessor,
             plan: ScalePlan, mode: str, dev: torch.device) -> dict:
    """Rows of ``source`` as the model sees them: ``images`` and effective ``ctf`` ``(n, M, M)`` on
    the model's grid, ``pixel_size`` ``(n,)`` there, the ``mean``/``std`` that
    :meth:`ScalePlan.model_output` needs, and ``offset`` ``(n, 1, 1)``: the constant that the
    background normalisations subtracted from each image, in the model's units (see
    :func:`_denoise_group`)."""
    if plan.identity:  # as the model was trained: one pass, CTF included
        out, _ = preprocess_rows(source, rows, processor, dev, stored_mode=mode)
        mean, std = plan.model_input(out["images"])[1:]
        return {**out, "mean": mean, "std": std, "offset": _offset(out)}
    first, meta = preprocess_rows(source, rows, processor, dev, stored_mode=mode, with_ctf=False)
    pixels, sign = meta["pixel_size_A"].to(dev), meta["data_sign"].to(dev)
    offset = _offset(first)
    x, mean, std = plan.model_input(first["images"])
    # x is processed already: this pass only computes the effective CTF at the model's box and pixel size
    out = ctf_processor(x, pixels * plan.scale, torch.ones_like(sign), meta["ctf_params"], mode)
    # a constant survives the Fourier resampling; after a downsampling model_input renormalised
    if plan.downsamples:
        offset = (offset + mean) / std
    return {**out, "mean": mean, "std": std, "offset": offset}


def _offset(processed: dict) -> torch.Tensor:
    """The constant that background normalisation subtracted, in normalised units ``(n, 1, 1)``."""
    mean, std = processed["background"]
    return mean / std


@torch.no_grad()
def _denoise_group(task, group: list[np.ndarray], prepare) -> list[tuple[torch.Tensor, dict]]:
    """Denoise sets of possibly different sizes (equal sizes are batched together); returns each
    set's model output and its prepared inputs."""
    results: list = [None] * len(group)
    for size in sorted({len(g) for g in group}):
        idx = [k for k, g in enumerate(group) if len(g) == size]
        prepared = [prepare(group[k]) for k in idx]
        noisy = torch.stack([p["images"] for p in prepared])  # (B, N, M, M)
        ctf = torch.stack([p["ctf"].expand_as(p["images"]) for p in prepared])
        # Per-image background normalisation subtracts each image's background mean, which holds
        # noise (sigma / sqrt(pixels in the ring): ~2% of sigma at L = 64). The offset is known
        # exactly, so it must come back unchanged, but a set denoiser shrinks a constant like any
        # other low frequency. So the model sees each image at its own background level relative
        # to the set's median, and that known constant is removed again after denoising (measured:
        # ribosome L = 64, SNR 1/32, relative MSE 0.615 -> 0.596 for cwf-unet-real).
        offsets = torch.stack([p["offset"] for p in prepared])  # (B, N, 1, 1)
        shift = offsets - offsets.median(dim=1, keepdim=True).values
        noisy = noisy + shift
        # The background ring used for normalisation (beyond 0.75 L / 2) can hold the edges of a
        # large particle; the corners outside the inscribed disk are noise only: the set's noise
        # variance, in normalised units, from there.
        denoised = task(noisy, ctf, estimate_noise_variance(noisy).mean(-1)) - shift
        for j, k in enumerate(idx):
            results[k] = (denoised[j], prepared[j])
    return results


def main(argv: list[str] | None = None) -> None:
    """Parse ``cryol denoise`` arguments and run :func:`denoise_particles`."""
    p = tool_parser("cryol denoise", __doc__)
    p.add_argument("--star", required=True, help="particles: RELION .star, cryoSPARC .cs or a plain .mrcs stack")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", type=str | None, default=None,
                   help="a shipped model (cryol models lists them); default: the default shipped model")
    p.add_argument("--ckpt", type=str | None, default=None,
                   help="instead of --model: a cryol fit checkpoint (DenoiseTask, SelfSupervisedDenoiseTask, "
                        "JointTask)")
    p.add_argument("--set-size", type=PositiveInt | None, default=None,
                   help="images per context set (default: the model's; 64 for single-image networks)")
    p.add_argument("--context", type=str, default="random", help="'random' or 'neighbours' (rotation-invariant kNN)")
    p.add_argument("--batch-sets", type=PositiveInt, default=4, help="sets per forward pass (halved on GPU out-of-memory)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random sets")
    add_flag(p, "--model-scale", False, "write at the model's box and pixel size instead of the input's")
    add_flag(p, "--sure-blend", None, "weight a guided model's learned correction per frequency by SURE, estimated "
             "from each set (default: the model's setting; the shipped guided models have it on)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    stack, star = denoise_particles(args.ckpt, args.star, args.out, args.set_size, args.context, args.batch_sets,
                                    args.datadir, args.pixel_size, parse_assume(args.assume), args.device,
                                    args.overwrite, args.seed, model=args.model, model_scale=args.model_scale,
                                    sure_blend=args.sure_blend, strict=args.strict)
    print(f"Wrote {stack} and {star}")
