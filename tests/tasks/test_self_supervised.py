"""Self-supervised fine-tuning: the Noisier2Noise and SURE objectives against closed forms, the
starting checkpoint, and a fine-tuning run on a `cryol simulate` stack that must lower the true
error of `cryol denoise` against the clean stack."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import mrcfile
import numpy as np
import pytest
import torch

from cryo_lightning.cli import main
from cryo_lightning.data.set_simulator import SimulationConfig
from cryo_lightning.data.synthetic import SyntheticSetDataModule
from cryo_lightning.io.errors import InputError
from cryo_lightning.metrics import relative_mse
from cryo_lightning.models.dncnn import DnCNN
from cryo_lightning.models.set_transformer import PolarSetTransformer
from cryo_lightning.physics.noise import disk_mask
from cryo_lightning.tasks.denoise import DenoiseTask
from cryo_lightning.tasks.pretrained import load_denoise_task
from cryo_lightning.tasks.self_supervised import (SelfSupervisedDenoiseTask, load_denoiser_weights,
                                                  noisier2noise_floor, noisier2noise_pair, sure_loss)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _gaussian_case(seed: int, s2: float = 2.0, sigma2: float = 0.5, shape=(4, 8, 32, 32)):
    """i.i.d. pixels: clean x ~ N(0, s2), observed y = x + N(0, sigma2); sigma2 per set ``(B,)``."""
    g = torch.Generator().manual_seed(seed)
    x = math.sqrt(s2) * torch.randn(shape, generator=g, dtype=torch.float64)
    y = x + math.sqrt(sigma2) * torch.randn(shape, generator=g, dtype=torch.float64)
    return x, y, torch.full((shape[0],), sigma2, dtype=torch.float64), g


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_noisier2noise_pair_is_the_papers_correction_and_trains_the_noisier_wiener_filter(alpha):
    s2, sigma2 = 2.0, 0.5
    x, y, var, g = _gaussian_case(0, s2, sigma2, shape=(16, 8, 32, 32))
    z, t = noisier2noise_pair(y, var, alpha, generator=g)
    m = z - y
    assert abs(float(m.var()) / (alpha**2 * sigma2) - 1) < 0.02  # added noise of variance alpha^2 sigma^2
    # The paper trains f(z) ~ y and corrects x_hat = ((1 + a^2) f - z) / a^2; with h = x_hat the two losses
    # differ by the constant factor ((1 + a^2) / a^2)^2.
    h = 0.3 * z + 0.1 * torch.tanh(z)  # any estimator
    f = (alpha**2 * h + z) / (1 + alpha**2)
    assert torch.allclose(((1 + alpha**2) * f - z) / alpha**2, h)
    assert math.isclose(float((h - t).square().mean()),
                        ((1 + alpha**2) / alpha**2) ** 2 * float((f - y).square().mean()), rel_tol=1e-9)
    # E||c z - t||^2 = (1 + 1/a^2) sigma^2 + E||c z - x||^2, with E(c z - x)^2 = (c - 1)^2 s2 + c^2 (1 + a^2) sigma2
    for c in (0.0, 0.5, 0.8):
        closed = noisier2noise_floor(alpha) * sigma2 + (c - 1) ** 2 * s2 + c**2 * (1 + alpha**2) * sigma2
        assert abs(float((c * z - t).square().mean()) / closed - 1) < 0.03, c
    # The least-squares linear fit of t on z is the Wiener gain at the noisier level: h -> E[x | z]
    # (tolerance: 4 standard errors of the fit).
    gain = float((z * t).sum() / (z * z).sum())
    wiener = s2 / (s2 + (1 + alpha**2) * sigma2)
    residual = noisier2noise_floor(alpha) * sigma2 + (1 - wiener) * s2
    assert abs(gain - wiener) < 4 * math.sqrt(residual / float((z * z).sum()))


def test_sure_is_unbiased_for_linear_and_nonlinear_denoisers():
    s2, sigma2 = 2.0, 0.5
    x, y, var, g = _gaussian_case(1, s2, sigma2)
    for c in (0.0, 0.5, 0.8, 1.0):  # h(y) = c y: divergence c per pixel, expected risk closed form
        risk, out = sure_loss(lambda v: c * v, y, var, generator=g)
        closed = ((c - 1) ** 2 * s2 + c**2 * sigma2) / sigma2
        assert torch.allclose(out, c * y)
        assert abs(float(risk.mean()) - closed) < 0.03, c
    # A nonlinear denoiser (soft thresholding): SURE tracks the true error set by set.
    def soft(v: torch.Tensor) -> torch.Tensor:
        return torch.sign(v) * (v.abs() - 0.7).clamp_min(0)

    risk, out = sure_loss(soft, y, var, generator=g)
    true = ((out - x).square() / sigma2).flatten(1).mean(1)
    assert torch.allclose(risk, true, atol=0.06), (risk, true)


def test_noise_variance_from_the_batch_or_the_background():
    task = SelfSupervisedDenoiseTask(DnCNN(depth=2, channels=4))
    noise = 1.5 * torch.randn(3, 16, 32, 32, generator=torch.Generator().manual_seed(0))
    given = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(task.noise_variance(noise, given), given)
    estimated = task.noise_variance(noise + 5.0 * disk_mask(32, 12.0))  # a particle inside the disk
    assert estimated.shape == (3,) and torch.allclose(estimated, torch.full((3,), 2.25), rtol=0.05)


def _save_task_checkpoint(net: torch.nn.Module, path: Path, net_config: dict | None = None) -> Path:
    """A checkpoint shaped like `cryol fit`'s: weights plus the network's config as plain values."""
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                "hyper_parameters": {"net": net_config or {}, "lr": 1e-3}}, path)
    return path


def test_init_ckpt_loads_weights_and_buffers_and_explains_mismatches(tmp_path):
    torch.manual_seed(0)
    trained = PolarSetTransformer(L=16, n_radii=9, n_angles=16, heads=2, layers=1, guide="cwf",
                                  cwf_prior_strength=4, cwf_prior_molecules=2)
    trained.cwf_prior.normal_()
    trained.cwf_prior_fitted.fill_(True)  # a fitted population prior travels with the weights
    ckpt = _save_task_checkpoint(trained, tmp_path / "pst.ckpt")
    fresh = PolarSetTransformer(L=16, n_radii=9, n_angles=16, heads=2, layers=1, guide="cwf",
                                cwf_prior_strength=4, cwf_prior_molecules=2)
    task = SelfSupervisedDenoiseTask(fresh, init_ckpt=str(ckpt))
    task.configure_model()  # what a trainer does first
    assert not task.net.needs_population
    for k, v in trained.state_dict().items():
        assert torch.equal(task.net.state_dict()[k], v), k

    dncnn = _save_task_checkpoint(DnCNN(depth=4, channels=8), tmp_path / "dncnn.ckpt",
                                  {"class_path": "cryo_lightning.models.dncnn.DnCNN",
                                   "init_args": {"depth": 4, "channels": 8}})
    with pytest.raises(InputError, match=r"'depth': 4.*does not fit the configured DnCNN.*unexpected: body.6"):
        SelfSupervisedDenoiseTask(DnCNN(depth=3, channels=8), init_ckpt=str(dncnn)).configure_model()
    with pytest.raises(InputError, match="shapes"):
        load_denoiser_weights(DnCNN(depth=4, channels=16), dncnn)
    with pytest.raises(InputError, match="no such file"):
        load_denoiser_weights(DnCNN(depth=4, channels=8), tmp_path / "missing.ckpt")


def test_validation_on_synthetic_sets_reports_the_truth_and_an_unbiased_mse_estimate():
    torch.manual_seed(0)
    sim = SimulationConfig(set_size=8, pixel_size=8.0, snr=(0.25, 0.25))
    dm = SyntheticSetDataModule(box=16, batch_size=4, simulation=sim, n_train_molecules=2, n_val_molecules=2,
                                n_test_molecules=2, train_sets_per_epoch=8, val_sets=8, test_sets=8, seed=0)
    task = SelfSupervisedDenoiseTask(DnCNN(depth=3, channels=8), alpha=1.0, inference_samples=4)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(task, datamodule=dm, verbose=False)[0]
    assert {"val/ss_loss", "val/mse_estimate", "val/rel_mse", "val/rel_mse_noisy"} <= metrics.keys()
    # The estimate is the error on the noisier input z, measured here against the clean truth.
    batch = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    task.eval()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(5)
        loss, estimate = task.self_supervised_loss(batch, generator)
        z, _ = noisier2noise_pair(batch["noisy"], batch["noise_variance"], 1.0, torch.Generator().manual_seed(5))
        true = (task.network(z, batch["ctf"], 2 * batch["noise_variance"]) - batch["clean"]).square().mean((1, 2, 3))
    assert torch.allclose(estimate, true / batch["noise_variance"], atol=0.1), (estimate, true)


# -- fine-tuning on a simulated RELION stack -------------------------------------------------------

PRETRAIN = """
seed_everything: 0
trainer: {accelerator: cpu, max_steps: 60, limit_val_batches: 0, logger: false, enable_progress_bar: false,
          enable_model_summary: false,
          callbacks: [{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {dirpath: pre, save_last: true}}]}
model:
  class_path: cryo_lightning.tasks.denoise.DenoiseTask
  init_args:
    net: {class_path: cryo_lightning.models.dncnn.DnCNN, init_args: {depth: 5, channels: 16}}
    lr: 0.003
data:
  class_path: cryo_lightning.data.synthetic.SyntheticSetDataModule
  init_args: {box: 24, batch_size: 2, n_train_molecules: 8, train_sets_per_epoch: 120, seed: 0,
              simulation: {set_size: 8, pixel_size: 8.0, snr: [0.5, 0.5]}}
"""


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, cryol_in):
    """A DnCNN pretrained (supervised) at SNR 1/2, then fine-tuned with configs/finetune_demo_dncnn.yaml,
    run from a folder holding the simulated stack where the config expects the demo's (SNR 1/8)."""
    root = tmp_path_factory.mktemp("finetune")
    cryol_in(root, ["simulate", "--volume", "random", "--seed", "1", "--n-images", "160", "--box", "24",
               "--pixel-size", "8.0", "--snr", "0.125", "--max-shift", "1", "--out", "runs/quickstart/simulated"])
    (root / "pretrain.yaml").write_text(PRETRAIN)
    cryol_in(root, ["fit", "--config", "pretrain.yaml"])
    start = root / "pre" / "last.ckpt"
    cryol_in(root, ["fit", "--config", str(CONFIGS / "finetune_demo_dncnn.yaml"), "--model.init_args.init_ckpt", str(start),
               "--model.init_args.net.init_args.depth", "5", "--model.init_args.net.init_args.channels", "16",
               "--model.init_args.lr", "0.001", "--data.init_args.set_size", "8", "--trainer.max_steps", "90",
               "--trainer.check_val_every_n_epoch", "9", "--trainer.enable_progress_bar", "false"])
    return root, start, root / "runs" / "finetune_demo_dncnn" / "checkpoints" / "last.ckpt"


def _denoised_rel_mse(root: Path, ckpt: Path | str, name: str) -> float:
    """`cryol denoise` on the simulated stack (``ckpt``: a checkpoint, or ``pretrained:NAME``),
    scored against the clean stack normalised as the noisy images were (background mean and
    standard deviation of each noisy image)."""
    sim = root / "runs" / "quickstart" / "simulated"
    model = ["--model", str(ckpt).removeprefix("pretrained:")] if str(ckpt).startswith("pretrained:") else \
        ["--ckpt", str(ckpt)]
    main(["denoise", *model, "--star", str(sim / "particles.star"), "--out", str(root / name)])
    noisy, clean = (torch.from_numpy(mrcfile.read(sim / f).astype(np.float32))
                    for f in ("particles.mrcs", "particles_clean.mrcs"))
    denoised = torch.from_numpy(mrcfile.read(root / name / "particles.mrcs").astype(np.float32))
    background = ~disk_mask(noisy.shape[-1], 0.75 * noisy.shape[-1] / 2)
    mean, std = noisy[:, background].mean(-1), noisy[:, background].std(-1)
    target = (clean - mean[:, None, None]) / std[:, None, None]
    return float(relative_mse(denoised, target).mean())


def test_finetuning_on_a_simulated_stack_lowers_the_true_error(finetuned):
    root, start, ckpt = finetuned
    before = _denoised_rel_mse(root, start, "before")
    after = _denoised_rel_mse(root, ckpt, "after")
    assert after < 0.85 * before, (before, after)
    assert list((root / "runs" / "finetune_demo_dncnn" / "tensorboard").rglob("events.out.tfevents*"))


def test_denoise_loads_the_finetuned_task_without_its_starting_checkpoint(finetuned, tmp_path):
    root, start, ckpt = finetuned
    moved = tmp_path / "start.ckpt"
    start.rename(moved)  # the fine-tuned checkpoint must not need the file it started from
    try:
        task = load_denoise_task(str(ckpt), torch.device("cpu"))
    finally:
        moved.rename(start)
    assert isinstance(task, SelfSupervisedDenoiseTask) and not task.training
    assert task.hparams.objective == "noisier2noise" and task.hparams.inference_samples == 16
    assert type(load_denoise_task(str(start), torch.device("cpu"))) is DenoiseTask
    y = torch.randn(1, 8, 24, 24)
    with torch.no_grad():  # Noisier2Noise inference averages fixed draws: reproducible
        assert torch.equal(task(y), task(y))


def test_the_shipped_config_fine_tunes_the_default_shipped_model(tmp_path, cryol_in):
    """configs/finetune_relion.yaml as shipped starts from the default shipped model (the CWF-guided
    U-Net) and trains it with SURE on the demo's stack; the result keeps its SURE weighting at
    inference, is applied to large sets like the shipped model, and is not worse than its start
    after a few steps (benchmarks/finetune.py measures the full 300: 0.248 -> 0.243)."""
    cryol_in(tmp_path, ["simulate", "--volume", "random", "--seed", "1", "--n-images", "200", "--box", "32",
                   "--pixel-size", "6.0", "--snr", "0.125", "--max-shift", "1", "--out", "runs/quickstart/simulated"])
    cryol_in(tmp_path, ["fit", "--config", str(CONFIGS / "finetune_relion.yaml"), "--trainer.max_steps", "12",
                   "--trainer.enable_progress_bar", "false"])
    ckpt = tmp_path / "runs" / "finetune_relion" / "checkpoints" / "last.ckpt"
    task = load_denoise_task(str(ckpt), torch.device("cpu"))
    assert type(task.net).__name__ == "GuidedUNet" and task.net.guide == "cwf" and task.net.sure_blend
    assert task.hparams.objective == "sure"
    from cryo_lightning.tasks.pretrained import load_denoiser

    assert load_denoiser(str(ckpt))[1].set_size == 1024  # trained on sets of 48, applied to large sets
    before = _denoised_rel_mse(tmp_path, "pretrained:cwf-unet-real", "before")
    after = _denoised_rel_mse(tmp_path, ckpt, "after")
    assert after < 1.02 * before and before < 0.3, (before, after)
