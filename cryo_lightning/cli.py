"""The ``cryol`` command: LightningCLI trainer verbs plus model-free tools.

Trainer verbs (``fit``, ``validate``, ``test``, ``predict``) go through :class:`CryoCLI`, a
LightningCLI in subclass mode: ``--config configs/x.yaml`` picks the model and data classes.
Tools that need no model (``simulate``; more come with later issues) are plain functions with
their own jsonargparse parser, dispatched before LightningCLI sees the arguments (LightningCLI
requires a model for every subcommand).
"""

from __future__ import annotations

import importlib
import signal
import sys
import threading
from collections.abc import Sequence

from cryo_lightning import __version__
from cryo_lightning.io.errors import InputError

__all__ = ["main", "TRAINER_VERBS", "TOOLS"]

TRAINER_VERBS = {
    "fit": "Train a model (e.g. cryol fit --config configs/quickstart.yaml).",
    "validate": "Run the validation loop of a model on its datamodule.",
    "test": "Evaluate a model on the held-out test split.",
    "predict": "Run a model's predict step over the predict split.",
}

# name -> (module with a main(argv) function, one-line help)
TOOLS = {
    "simulate": (
        "cryo_lightning.tools.simulate",
        "Simulate a RELION 3.1 dataset (STAR + MRCS + clean stack) from a map, atomic model or random molecule.",
    ),
    "preprocess": (
        "cryo_lightning.tools.preprocess",
        "Downsample, normalise, invert, phase-flip or whiten particles (STAR/.cs in, MRCS + STAR out).",
    ),
    "denoise": (
        "cryo_lightning.tools.denoise",
        "Denoise particles (STAR/.cs/.mrcs) with a shipped or trained model, at any box and pixel size.",
    ),
    "models": (
        "cryo_lightning.tools.models",
        "List the shipped denoisers: box, pixel-size and SNR ranges, training config, held-out numbers.",
    ),
    "reconstruct": (
        "cryo_lightning.tools.reconstruct",
        "Ab initio map from particles: common lines + synchronization, then least squares (CG).",
    ),
    "evaluate": (
        "cryo_lightning.tools.evaluate",
        "Quality without ground truth: half-map FSC, denoised-vs-raw moment consistency, cross-half FRC.",
    ),
    "cache-guides": (
        "cryo_lightning.tools.cache_guides",
        "Compute a set model's EM guides once for the sets its fit config trains and validates on.",
    ),
    "export": (
        "cryo_lightning.tools.export",
        "Write a subset of particles by filtering the original STAR or .cs file.",
    ),
    "submit": (
        "cryo_lightning.launch.command",
        "Run a trainer verb on a Slurm cluster with submitit (DDP, requeue and resume); --dry-run prints the script.",
    ),
}
# What a user can fix: printed as one line without a traceback unless --debug is given.
USER_ERRORS = (InputError, FileExistsError, FileNotFoundError, PermissionError, IsADirectoryError,
               NotADirectoryError)


class Terminated(BaseException):
    """SIGTERM received by a tool: raised in the main thread so that every ``with`` block (staged
    outputs, temporary folders) cleans up on the way out, as for Ctrl-C."""


def _terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise Terminated


def _message(err: Exception) -> str:
    """One line for a user error; OS errors as 'PATH: reason' rather than '[Errno N] ...'."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        hint = {FileExistsError: "; choose another --out (or pass --overwrite to replace a file)",
                PermissionError: "; check the permissions, or choose another location",
                IsADirectoryError: ": a file was expected", NotADirectoryError: ": a folder was expected"}
        return f"{err.filename}: {err.strerror.lower()}{hint.get(type(err), '')}"
    return str(err)


def _overview() -> str:
    width = max(map(len, [*TRAINER_VERBS, *TOOLS]))
    lines = [
        f"cryol {__version__}: learned denoising and ab initio modelling of cryo-EM images",
        "",
        "usage: cryol <subcommand> [options]     (cryol <subcommand> --help for its options)",
        "       --debug anywhere shows full tracebacks for input errors",
        "",
        "Training (LightningCLI; --config FILE.yaml, --print_config):",
        *(f"  {name:<{width}}  {text}" for name, text in TRAINER_VERBS.items()),
        "",
        "Tools:",
        *(f"  {name:<{width}}  {text}" for name, (_, text) in TOOLS.items()),
    ]
    return "\n".join(lines)


def _run_lightning(args: Sequence[str] | None) -> None:
    # Imported lazily so that `cryol --help` and the tools start fast.
    import lightning.pytorch as pl
    from lightning.pytorch.cli import LightningCLI

    import cryo_lightning.data.particles  # noqa: F401  (short class names in configs)
    import cryo_lightning.data.synthetic  # noqa: F401
    import cryo_lightning.models.dncnn  # noqa: F401
    import cryo_lightning.tasks.denoise  # noqa: F401
    from cryo_lightning.tasks.checkpoints import alias_renamed_tasks
    from cryo_lightning.tasks.training_record import RecordTrainingData

    alias_renamed_tasks()  # --ckpt_path: a checkpoint may name a task by its old class path

    LightningCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},  # a requeued run re-enters the same log dir
        # checkpoints record the training data's box, pixel size and SNR (cryol denoise reads them)
        trainer_defaults={"callbacks": [RecordTrainingData()]},
        args=args,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``cryol`` console script (and ``python -m cryo_lightning``).

    User errors (bad input files, existing outputs) print one line and exit with status 2;
    ``--debug`` shows the full traceback instead.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    name = args[0] if args else "cryol"
    # signal handlers can only be set from the main thread (not when main() runs in a test's thread)
    tool = name in TOOLS and threading.current_thread() is threading.main_thread()
    if tool:  # trainer verbs keep Lightning's own SIGTERM handling (requeue on clusters)
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        _dispatch(args)
    except (KeyboardInterrupt, Terminated) as err:
        if debug:
            raise
        what, code = ("SIGTERM", 143) if isinstance(err, Terminated) else ("Ctrl-C", 130)
        print(f"cryol {name}: stopped by {what}" + ("; unfinished outputs were removed" if tool else ""), file=sys.stderr)
        raise SystemExit(code) from None
    except Exception as err:
        if debug or not isinstance(err, USER_ERRORS):
            raise
        print(f"cryol {name}: error: {_message(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if tool:
            signal.signal(signal.SIGTERM, previous)


def _check_config_files(args: list[str]) -> None:
    """Refuse a ``--config`` that is not a readable text file before LightningCLI parses it (a
    binary file otherwise ends in a UnicodeDecodeError traceback)."""
    for i, arg in enumerate(args):
        path = args[i + 1] if arg == "--config" and i + 1 < len(args) else \
            arg.split("=", 1)[1] if arg.startswith("--config=") else None
        if path is None:
            continue
        try:
            with open(path, "rb") as f:
                f.read().decode("utf-8")
        except FileNotFoundError:
            raise InputError(f"--config {path}: no such file") from None
        except UnicodeDecodeError as err:
            raise InputError(f"--config {path} is not a text (YAML) file: byte {err.start} is not UTF-8; give a "
                             "config such as configs/quickstart.yaml") from None
        except OSError as err:
            raise InputError(f"--config {path}: cannot be read ({err.strerror})") from None


def _dispatch(args: list[str]) -> None:
    if not args or args[0] in ("-h", "--help"):
        print(_overview())
        return
    if args[0] in ("-V", "--version"):
        print(__version__)
        return
    if args[0] in TOOLS:
        module = importlib.import_module(TOOLS[args[0]][0])
        module.main(args[1:])
        return
    if args[0] not in TRAINER_VERBS:
        print(f"cryol: unknown subcommand {args[0]!r}\n\n{_overview()}", file=sys.stderr)
        raise SystemExit(2)
    _check_config_files(args)
    # LightningCLI gets the arguments explicitly (without --debug), so hide the host's argv.
    saved, sys.argv = sys.argv, sys.argv[:1]
    try:
        _run_lightning(args)
    finally:
        sys.argv = saved
