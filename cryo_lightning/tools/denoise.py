"""``cryol denoise``: denoise a particle stack with a trained model, in sets of context images.

Example::

    cryol denoise --ckpt runs/denoise_transformer/checkpoints/last.ckpt --star particles.star --out denoised/

reads a RELION STAR, a cryoSPARC .cs or a plain .mrcs stack, preprocesses the particles as the
model was trained (downsampled to the model's box, background-normalised so the noise has unit
variance), denoises them in sets of ``--set-size`` particles (random sets, or sets of nearest
neighbours in a rotation-invariant embedding), and writes ``denoised/<stem>.mrcs`` and
``denoised/<stem>.star`` (every original column kept). Runs on the GPU when there is one and
halves the batch when it runs out of GPU memory.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cryo_lightning.data.particles import ParticleSource, metadata_batch
from cryo_lightning.data.preprocess import PreprocessConfig, Preprocessor
from cryo_lightning.io.errors import InputError
from cryo_lightning.io.mrc import StackWriter
from cryo_lightning.io.particle_writer import write_star_for_stack
from cryo_lightning.physics.polar import PolarSpectrum
from cryo_lightning.tools.common import open_particle_input, parse_assume, pick_device, prepare_outputs, tool_parser

__all__ = ["context_sets", "load_denoise_task", "denoise_particles", "main"]


def rotation_invariant_embedding(images: torch.Tensor, n_radii: int = 12, n_angles: int = 32) -> torch.Tensor:
    """Features of ``(n, L, L)`` images unchanged by in-plane rotation: magnitudes of the angular
    Fourier coefficients of the low-frequency polar spectrum, L2-normalised. ``(n, D)``."""
    L = images.shape[-1]
    polar = PolarSpectrum(L, n_radii, n_angles).to(images.device)
    spec = polar(images)[:, : n_radii // 2 + 1]  # low frequencies carry the signal
    feats = torch.fft.fft(spec, dim=-1).abs()[..., : n_angles // 2].flatten(1)
    return feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)


def context_sets(n: int, set_size: int, mode: str, seed: int = 0,
                 embedding: torch.Tensor | None = None) -> list[np.ndarray]:
    """Partition particle rows ``0..n-1`` into sets of ``set_size`` (the last may be smaller).

    ``mode="random"``: a seeded permutation, chunked. ``mode="neighbours"``: greedy, each set is an
    unassigned particle and its ``set_size - 1`` nearest unassigned neighbours in ``embedding``.
    """
    if mode == "random":
        order = np.random.default_rng(seed).permutation(n)
        return [order[i : i + set_size] for i in range(0, n, set_size)]
    if mode != "neighbours" or embedding is None:
        raise InputError(f"--context must be 'random' or 'neighbours', got {mode!r}")
    free = torch.ones(n, dtype=torch.bool, device=embedding.device)
    sets = []
    for start in np.random.default_rng(seed).permutation(n).tolist():
        if not free[start]:
            continue
        sim = embedding @ embedding[start]
        sim[~free] = -torch.inf
        members = torch.topk(sim, min(set_size, int(free.sum()))).indices
        free[members] = False
        sets.append(members.cpu().numpy())
    return sets


def load_denoise_task(ckpt: str, device: torch.device):
    """The denoising task of a ``cryol fit`` checkpoint, in evaluation mode on ``device``: a
    ``DenoiseTask``, the ``SelfSupervisedDenoiseTask`` (whose inference differs) that the
    checkpoint's ``_class_path`` names, or the denoiser of a ``JointTask`` (the main job) in a
    ``DenoiseTask``."""
    from cryo_lightning.tasks.denoise import DenoiseTask  # Lightning only for this command
    from cryo_lightning.tasks.joint import JointTask
    from cryo_lightning.tasks.self_supervised import SelfSupervisedDenoiseTask

    path = Path(ckpt)
    if not path.is_file():
        raise InputError(f"--ckpt {ckpt}: no such file")
    hparams = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters", {})
    if str(hparams.get("_class_path", "")).endswith(".SelfSupervisedDenoiseTask"):
        # Its starting checkpoint was used in training; the weights here supersede it.
        task = SelfSupervisedDenoiseTask.load_from_checkpoint(path, map_location=device, init_ckpt=None)
    elif str(hparams.get("_class_path", "")).endswith(".JointTask"):
        # its pretrained-checkpoint options were used in training; the weights here supersede them
        joint = JointTask.load_from_checkpoint(path, map_location=device, denoiser_ckpt=None, reconstructor_ckpt=None)
        task = DenoiseTask(joint.denoiser).to(device)
    else:
        task = DenoiseTask.load_from_checkpoint(path, map_location=device)
    return task.eval()


def denoise_particles(
    ckpt: str, star: str, out: str, set_size: int = 64, context: str = "random", batch_sets: int = 4,
    datadir: str | None = None, pixel_size: float | None = None, assume: dict[str, float] | None = None,
    device: str = "auto", overwrite: bool = False, seed: int = 0, chunk_particles: int = 20000,
) -> tuple[Path, Path]:
    """Denoise every particle of ``star`` with the model in ``ckpt``; returns (stack, STAR) paths."""
    dev = pick_device(device)
    task = load_denoise_task(ckpt, dev)
    with tempfile.TemporaryDirectory() as tmp:
        source = open_particle_input(star, Path(tmp), datadir, pixel_size, assume)
        return _run(task, source, Path(star), Path(out), set_size, context, batch_sets, dev, overwrite, seed,
                    chunk_particles)


def _run(task, source: ParticleSource, star: Path, out: Path, set_size: int, context: str, batch_sets: int,
         dev: torch.device, overwrite: bool, seed: int, chunk_particles: int) -> tuple[Path, Path]:
    for message in source.warnings:
        print(f"cryol denoise: warning: {message}", file=sys.stderr)
    box = getattr(task.net, "L", None) or source.box
    processor = Preprocessor(PreprocessConfig(downsample=box if box != source.box else None), source.box)
    mode = source.ctf_mode(processor.config)
    stack_path, star_path = out / f"{star.stem}.mrcs", out / f"{star.stem}.star"
    prepare_outputs([stack_path, star_path], [star, *(i.path for i in source.reader.infos)], overwrite)
    n = len(source)
    pixel_out = np.empty(n)

    def prepare(rows: np.ndarray) -> dict:
        meta = metadata_batch(source, rows)
        return processor(torch.from_numpy(source.read(rows)).to(dev), meta["pixel_size_A"].to(dev),
                         meta["data_sign"].to(dev), meta["ctf_params"], mode)

    with StackWriter(stack_path, n, processor.out_box, float(source.table.particles["pixel_size_A"].median())
                     * source.box / processor.out_box, overwrite=overwrite) as writer:
        progress = tqdm(total=n, desc="denoising", unit="particle", disable=None)
        for start in range(0, n, chunk_particles):  # bounded memory: sets are formed within chunks
            chunk = np.arange(start, min(start + chunk_particles, n))
            embedding = None
            if context == "neighbours":
                embedding = torch.cat([rotation_invariant_embedding(prepare(chunk[i:i + 1024])["images"])
                                       for i in range(0, len(chunk), 1024)])
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
                for rows, (images, pixels) in zip(group, outputs):
                    writer.write_rows(rows, images.cpu())
                    pixel_out[rows] = pixels.cpu().numpy()
                    progress.update(len(rows))
                i += len(group)
        progress.close()
    write_star_for_stack(source.table, star_path, stack_path, processor.out_box, pixel_out, overwrite=overwrite,
                         ctf_mode=mode)
    return stack_path, star_path


@torch.no_grad()
def _denoise_group(task, group: list[np.ndarray], prepare) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Denoise sets of possibly different sizes: equal sizes are batched together."""
    results: list = [None] * len(group)
    for size in sorted({len(g) for g in group}):
        idx = [k for k, g in enumerate(group) if len(g) == size]
        prepared = [prepare(group[k]) for k in idx]
        noisy = torch.stack([p["images"] for p in prepared])  # (B, N, L, L)
        ctf = torch.stack([p["ctf"].expand_as(p["images"]) for p in prepared])
        denoised = task(noisy, ctf, torch.ones(len(idx), device=noisy.device))
        for j, k in enumerate(idx):
            results[k] = (denoised[j], prepared[j]["pixel_size"])
    return results


def main(argv: list[str] | None = None) -> None:
    """Parse ``cryol denoise`` arguments and run :func:`denoise_particles`."""
    p = tool_parser("cryol denoise", __doc__)
    p.add_argument("--ckpt", required=True, help="checkpoint of a DenoiseTask or SelfSupervisedDenoiseTask (cryol fit)")
    p.add_argument("--star", required=True, help="particles: RELION .star, cryoSPARC .cs or a plain .mrcs stack")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--set-size", type=int, default=64, help="images per context set")
    p.add_argument("--context", type=str, default="random", help="'random' or 'neighbours' (rotation-invariant kNN)")
    p.add_argument("--batch-sets", type=int, default=4, help="sets per forward pass (halved on GPU out-of-memory)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random sets")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    stack, star = denoise_particles(args.ckpt, args.star, args.out, args.set_size, args.context, args.batch_sets,
                                    args.datadir, args.pixel_size, parse_assume(args.assume), args.device,
                                    args.overwrite, args.seed)
    print(f"Wrote {stack} and {star}")
