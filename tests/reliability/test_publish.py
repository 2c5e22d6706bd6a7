"""Issue 22, item 5: output sets are published whole; SIGTERM and Ctrl-C leave nothing behind.

A real signal is sent to the test process at the last moment of each command (just before its
metadata would be written, after the stacks and maps are): the command must exit with one line,
no traceback, and leave neither files under the final names nor hidden temporaries, so that a
rerun without --overwrite succeeds.
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.reliability.conftest import leftovers, snapshot

# command -> (module attribute called after the bulk outputs are written, arguments after --out)
COMMANDS = {
    "preprocess": ("cryo_lightning.tools.preprocess.write_star_for_stack", ["--downsample", "16"]),
    "denoise": ("cryo_lightning.tools.denoise.write_star_for_stack", []),
    "reconstruct": ("cryo_lightning.tools.reconstruct.fsc_plot", []),
    "simulate": ("cryo_lightning.tools.simulate.write_particles_star", []),
}


def _args(command: str, dataset, out) -> list:
    if command == "simulate":
        return ["simulate", "--volume", "random", "--n-images", "8", "--box", "16", "--pixel-size", "5",
                "--snr", "1", "--out", out]
    target = out / "map.mrc" if command == "reconstruct" else out
    return [command, "--star", dataset / "particles.star", "--out", target, *COMMANDS[command][1]]


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_signal_before_publishing_leaves_no_output(cryol, dataset, tmp_path, monkeypatch, command, how):
    before, handler = snapshot(dataset), signal.getsignal(signal.SIGTERM)
    sig = getattr(signal, how)

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), sig)  # delivered to the main thread: raises there at once

    monkeypatch.setattr(COMMANDS[command][0], interrupted)
    out = tmp_path / "out"
    code, err = cryol(*_args(command, dataset, out))
    assert code == (143 if how == "SIGTERM" else 130)
    assert err.strip().splitlines()[-1] == \
        f"cryol {command}: stopped by {'SIGTERM' if how == 'SIGTERM' else 'Ctrl-C'}; unfinished outputs were removed"
    assert "Traceback" not in err
    assert not out.exists(), f"left behind: {list(out.rglob('*'))}"
    assert not leftovers(tmp_path) and snapshot(dataset) == before
    assert signal.getsignal(signal.SIGTERM) == handler  # the tool's handler is gone again

    monkeypatch.undo()  # a rerun needs no --overwrite
    code, err = cryol(*_args(command, dataset, out))
    assert code == 0, err
    assert any(out.iterdir()) and not leftovers(tmp_path)


def test_outputs_appear_together_in_an_existing_folder_without_touching_other_files(cryol, dataset, tmp_path,
                                                                                     monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(COMMANDS["reconstruct"][0], lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    code, _ = cryol(*_args("reconstruct", dataset, out))
    assert code == 130 and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
