"""A trained moment reconstructor applied to the moments of particle images (``cryol reconstruct --method learned``)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from cryo_lightning.io.errors import InputError
from cryo_lightning.tasks.checkpoints import alias_renamed_tasks, current_task_name, read_checkpoint, task_name
from cryo_lightning.tasks.reconstructor import ReconstructorTask

__all__ = ["LearnedFit"]


class LearnedFit:
    """``--method learned``: a trained :class:`~cryo_lightning.tasks.reconstructor.ReconstructorTask` on moments.

    The volume basis (``l_max``, band limit), viewing degree and third-moment use come from the
    checkpoint's datamodule settings (``settings``); ``box``, when given, must be the one it was
    trained at. A fit estimates the CTF-grouped, noise-debiased moments and their sampling error
    ``eps`` (:func:`~cryo_lightning.abinitio.moment_loss.expected_misfit`, the loss expected at the
    truth), draws a start like the training examples (white coefficients scaled to ``tr M2``,
    uniform viewing distribution), runs the network, then polishes by ``polish`` L-BFGS
    iterations of the MAP loss ``L(a, b) + prior_strength * eps * E(a)``, ``E`` the checkpoint's
    coefficient prior (fitted to its training molecules,
    :class:`~cryo_lightning.models.coefficient_prior.CoefficientPrior`). Noisier moments lean
    more on the prior; exact moments (``eps = 0``) not at all. If the polished misfit is still
    above ``2 eps`` (more than sampling error explains: a wrong basin, and always for exact
    moments), the classical endgame follows: a whitened stage, ``hops`` block basin hops and
    ``newton`` damped Newton steps (:func:`~cryo_lightning.abinitio.moment_solver.fit_moments`).
    """

    def __init__(self, checkpoint: str, box: int | None = None, polish: int = 200, prior_strength: float = 0.1,
                 hops: int = 30, newton: int = 20) -> None:
        path = Path(checkpoint)
        stored = read_checkpoint(path, "--checkpoint", mmap=False)
        if current_task_name(stored) not in ("", "ReconstructorTask"):
            raise InputError(f"--checkpoint {checkpoint} is a {task_name(stored)} checkpoint, not a learned "
                             "reconstructor; train one with `cryol fit --config configs/reconstructor_cpu.yaml`")
        settings = stored.get("datamodule_hyper_parameters")
        if not settings or "l_max" not in settings:
            raise InputError(f"--checkpoint {checkpoint}: not a learned-reconstructor checkpoint (no MomentDataModule "
                             "settings); train one with `cryol fit --config configs/reconstructor_cpu.yaml`")
        if box is not None and int(settings["box"]) != box:
            raise InputError(f"--checkpoint {checkpoint} was trained at box {settings['box']}, the particles are at "
                             f"box {box}: run with --box {settings['box']}")
        alias_renamed_tasks()  # a checkpoint of the task's old name (ReconstructTask) loads too
        try:
            self.task = ReconstructorTask.load_from_checkpoint(path, map_location="cpu").eval()
        except RuntimeError as err:  # a state dict without the prior's buffers
            raise InputError(f"--checkpoint {checkpoint}: cannot load the network ({str(err).splitlines()[0]}); "
                             "it predates the learned coefficient prior: retrain with `cryol fit --config "
                             "configs/reconstructor_cpu.yaml`") from err
        self.l_max, self.bandlimit = int(settings["l_max"]), float(settings["bandlimit"])
        self.view_degree, self.third = int(settings["view_degree"]), bool(settings.get("third", True))
        self.polish, self.prior_strength, self.hops = int(polish), float(prior_strength), int(hops)
        self.newton = int(newton)
        self.settings = dict(settings)

    def __call__(self, images: torch.Tensor, noise_variance: torch.Tensor, ctfs: torch.Tensor | None,
                 groups: torch.Tensor | None, generator: torch.Generator):
        """Same contract as :func:`~cryo_lightning.abinitio.moment_reconstruction.moments_reconstruct`."""
        from cryo_lightning.abinitio.moment_reconstruction import moment_problem
        from cryo_lightning.abinitio.moment_solver import MomResult

        t = time.perf_counter()
        basis, model, target = moment_problem(images, noise_variance, ctfs, groups, self.l_max, self.bandlimit,
                                              self.view_degree, self.third)
        a, b, loss = self.reconstruct(model, target, generator)
        result = MomResult(a, b, self.view_degree, loss, [loss], time.perf_counter() - t)
        return a, result.distribution, basis.evaluate(a).to(torch.float32), result

    def reconstruct(self, model, target, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(a, b, loss)`` from moments: random start, the network, the MAP polish and, if needed, hops.

        Args:
            model: :class:`~cryo_lightning.abinitio.moment_forward_model.MomentModel` of the checkpoint's
                basis and viewing degree, with the target's CTF groups.
            target: :class:`~cryo_lightning.abinitio.image_moments.ImageMoments` (with ``m3`` if the
                checkpoint uses the third-moment slice).
            generator: seeds the start and the hops.
        Returns:
            coefficients, viewing coefficients, and the final loss (the MAP loss when polished).
        """
        from cryo_lightning.abinitio.moment_loss import moment_loss
        from cryo_lightning.abinitio.moment_solver import map_polish, uniform_view_start

        a0, b0 = uniform_view_start(model, target, generator)
        with torch.enable_grad():
            a, b = self.task(a0, b0, lambda x, y: moment_loss(model, x, y, target, use_m3=self.third))
        return map_polish(model, target, a.detach(), b.detach(), self.task.net.prior.energy, self.polish,
                          self.prior_strength, self.third, hops=self.hops, newton=self.newton, generator=generator)
