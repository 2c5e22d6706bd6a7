"""``cryol cache-guides``: compute a set model's slow guide (EM's posterior means) once for the
sets that its fit config trains and validates on, so that training reads them.

Give the same ``--config`` files as ``cryol fit``. The config's ``data.init_args.guide_cache`` names
the folder, its data (molecule banks, simulation, set size) says which sets, and its network
(e.g. ``RotationalSetTransformer`` with ``guide: em``) computes the guides with its own settings
(``em_iterations``, ``em_rotations``, ``em_max_shift``). ``--split val`` caches the validation sets
(all of them), ``--split train`` the first ``--sets`` training sets. A stopped build resumes where
it stopped (shards of ``--shard`` sets are written whole). Example::

    cryol cache-guides --config configs/base/denoise_structures_l32.yaml --config configs/denoise_em_transformer_cpu.yaml --split val
    cryol cache-guides --config configs/base/denoise_structures_l32.yaml --config configs/denoise_em_transformer_cpu.yaml --split train --sets 2000
"""

from __future__ import annotations

import sys
import time

import torch

from cryo_lightning.abinitio.expectation_maximization import VERSION as EM_VERSION
from cryo_lightning.data.guide_cache import GuideCache
from cryo_lightning.data.synthetic import SetRecipeStream, SyntheticSetDataModule
from cryo_lightning.io.errors import InputError

__all__ = ["main"]


def _instantiate(configs: list[str]):
    """The model and data module that ``cryol fit --config ...`` would build."""
    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI

    args = [a for c in configs for a in ("--config", c)]
    cli = LightningCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       run=False, args=args, save_config_callback=None,
                       trainer_defaults={"logger": False}, seed_everything_default=False)
    return cli.model, cli.datamodule


def main(argv: list[str] | None = None) -> None:
    from tqdm import tqdm

    from jsonargparse import ArgumentParser

    paragraphs = __doc__.strip().split("\n\n")
    # not tools.common.tool_parser: its --config is a file of the tool's own options, here it is
    # a fit config, as in cryol fit
    parser = ArgumentParser(prog="cryol cache-guides", description=paragraphs[0], epilog=paragraphs[1])
    parser.add_argument("--config", action="append", default=None, required=True,
                        help="a fit config (repeat as for cryol fit: base first)")
    parser.add_argument("--split", choices=["train", "val"], default="train")
    parser.add_argument("--sets", type=int | None, default=None,
                        help="training sets to cache (default: the validation split's size for val, 500 for train)")
    parser.add_argument("--shard", type=int, default=8, help="sets per shard file")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    model, dm = _instantiate([str(c) for c in args.config])
    if not isinstance(dm, SyntheticSetDataModule) or dm.guide_cache is None:
        raise InputError(f"{args.config[-1]}: the config's data must be a SyntheticSetDataModule with "
                         "data.init_args.guide_cache set to the cache folder")
    net = model.net
    if not hasattr(net, "em_guide") or getattr(net, "guide", None) != "em":
        raise InputError(f"{args.config[-1]}: the network ({type(net).__name__}) has no EM guide to cache; "
                         "set model.init_args.net.init_args.guide: em")
    cache = GuideCache(dm.guide_cache.directory, {"data": dm.description(), "guide": {
        "network": type(net).__name__, **net.em_settings, "em_version": EM_VERSION}})
    source = SetRecipeStream(args.split, 0, len(dm.banks[args.split]), dm.seed, args.split == "train", dm.batch_size)
    total = args.sets if args.sets is not None else (dm.set_counts["val"] if args.split == "val" else 500)
    done = len(cache.recipes(args.split)[0])
    if done >= total:
        print(f"{cache.directory}: {done} {args.split} sets cached already (asked for {total})")
        return
    simulator = dm.simulators[args.split]
    seeds, molecules, guides = [], [], []
    start = time.perf_counter()
    for index in tqdm(range(done, total), desc=f"EM guides ({args.split})", initial=done, total=total):
        recipe = source.recipe(0, index)
        seed, molecule = torch.tensor([recipe["seed"]]), torch.tensor([recipe["molecule"]])
        batch = simulator(seed, molecule)
        guides.append(net.em_guide(batch["noisy"], batch["ctf"], batch["noise_variance"])[0])
        seeds.append(seed)
        molecules.append(molecule)
        if len(guides) == args.shard or index == total - 1:
            cache.append(args.split, torch.cat(seeds), torch.cat(molecules), torch.stack(guides))
            seeds, molecules, guides = [], [], []
    print(f"{cache.directory}: {total} {args.split} sets cached ({time.perf_counter() - start:.0f} s for "
          f"{total - done})")
