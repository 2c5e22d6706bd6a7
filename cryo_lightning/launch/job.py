"""The callable that submitit runs in every task: ``cryol <verb> --config FROZEN``, resumed."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["TrainJob"]


class TrainJob:
    """Runs ``cryol <verb> --config <config>`` and resumes from ``<checkpoint_dir>/last.ckpt``.

    submitit pickles this object, starts one copy per task (one task per GPU) and, on the
    time-limit signal, calls :meth:`checkpoint` in global rank 0 and requeues the job. Resuming
    does not depend on that path: whenever the job starts (first run, requeue after a timeout
    or preemption, node failure, or a resubmission into the same folder) it continues from the
    folder's ``last.ckpt`` if there is one. The object holds only strings, so it pickles the
    same on x86_64 and aarch64 and imports nothing heavy until it runs.

    Args:
        verb: ``fit``, ``validate``, ``test`` or ``predict``.
        config: the job's frozen config.
        checkpoint_dir: where :class:`~cryo_lightning.launch.checkpoint.ResumeCheckpoint`
            writes ``last.ckpt`` (None: never resume, for verbs other than ``fit``).
    """

    def __init__(self, verb: str, config: str, checkpoint_dir: str | None) -> None:
        self.verb, self.config, self.checkpoint_dir = verb, str(config), checkpoint_dir

    def resume_path(self) -> Path | None:
        """``last.ckpt`` of the job folder if it exists."""
        if self.checkpoint_dir is None:
            return None
        path = Path(self.checkpoint_dir) / "last.ckpt"
        return path if path.is_file() else None

    def command(self) -> list[str]:
        """The ``cryol`` arguments of this attempt."""
        args = [self.verb, "--config", self.config]
        resume = self.resume_path()
        return args + ["--ckpt_path", str(resume)] if resume is not None else args

    def __call__(self) -> None:
        _export_local_distributed_env()
        args = self.command()
        if "--ckpt_path" in args:
            print(f"cryol submit: resuming from {args[-1]} (global step {_global_step(args[-1])})", flush=True)
        from cryo_lightning.cli import main  # lazy: keeps the pickle small and CUDA uninitialised

        main(args)

    def checkpoint(self, *args: object, **kwargs: object):
        """Called by submitit in rank 0 on the requeue signal: the same job, started afresh.

        The periodic ``last.ckpt`` is the state to resume from; saving another one here is not
        possible because the other ranks do not take part in this call (DDP would deadlock).
        """
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(TrainJob(self.verb, self.config, self.checkpoint_dir))

    def __repr__(self) -> str:
        return f"TrainJob({self.verb!r}, {self.config!r}, {self.checkpoint_dir!r})"


def _export_local_distributed_env() -> None:
    """Give Lightning torchrun-style variables for multi-task local jobs.

    Under Slurm, Lightning's SLURMEnvironment reads ranks from ``SLURM_*`` itself; exporting
    submitit's variables there would also set ``CUDA_VISIBLE_DEVICES`` per task and break
    Lightning's ``cuda:<local_rank>`` mapping, so only the local executor gets them.
    """
    import submitit
    from submitit.helpers import TorchDistributedEnvironment

    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # called outside submitit (e.g. directly in a test)
        return
    if env.cluster == "local" and env.num_tasks > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        os.environ["MASTER_ADDR"] = "127.0.0.1"  # one machine; its host name may not resolve


def _global_step(path: str) -> int | str:
    import torch

    try:
        return int(torch.load(path, map_location="cpu", mmap=True, weights_only=False)["global_step"])
    except Exception:  # only for the message; Lightning reports a bad file itself
        return "unknown"
