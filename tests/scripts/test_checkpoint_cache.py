"""The random-weight checkpoint's cache (tests/support/checkpoint.py) after an interrupted build.
The build itself is replaced by a stub that writes a small file: nothing of 2.6 GB is made here."""

from __future__ import annotations

import pathlib
import subprocess

from headseg.tests.support import checkpoint


def test_build_clears_partial_files_of_killed_builds(tmp_path, monkeypatch):
    """A build killed outright (SIGTERM from a CI limit, SIGKILL) skips its own cleanup and leaves a
    2.6 GB partial file named after its process id; the next build removes it under the lock."""
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    (comfy / "main.py").write_text("")
    monkeypatch.setenv("HEADSEG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HEADSEG_COMFYUI", str(comfy))
    path = checkpoint.checkpoint_path()
    path.parent.mkdir(parents=True)
    stale = path.with_name(path.name + ".tmp4242")
    stale.write_bytes(b"partial")
    other = path.parent / "my-model.safetensors"
    other.write_bytes(b"kept")

    def fake_run(cmd, **kwargs):
        pathlib.Path(cmd[3]).write_bytes(b"built")  # [python, checkpoint.py, --build, out, comfyui]
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(checkpoint.subprocess, "run", fake_run)
    assert checkpoint.ensure_checkpoint(log=lambda *a: None) == path
    assert path.read_bytes() == b"built"
    assert not stale.exists()
    assert other.read_bytes() == b"kept"


def test_command_line_shows_progress_and_prints_only_the_path(tmp_path):
    """serve.sh --test-checkpoint reads the path from stdout (``$(... | tail -n 1)``): the build's
    progress lines went there too, so a first start sat silent through the build. They go to stderr."""
    import os
    import sys

    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    (comfy / "main.py").write_text("")  # no comfy package: the build itself fails at once
    env = dict(os.environ, HEADSEG_HOME=str(tmp_path / "home"), HEADSEG_COMFYUI=str(comfy))
    proc = subprocess.run([sys.executable, checkpoint.__file__], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "[headseg] building the random-weight SD2.1 test checkpoint" in proc.stderr, proc.stderr
    assert proc.stdout == ""
