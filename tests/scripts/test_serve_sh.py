"""tests/serve.sh's checks before it starts ComfyUI (nothing is served here)."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _serve(*args, timeout=120) -> subprocess.CompletedProcess:
    home = pathlib.Path(os.environ.get("HEADSEG_HOME", pathlib.Path.home() / ".cache" / "headseg"))
    if not (home / "venv" / ".headseg-stamp").is_file():
        pytest.skip(f"no set-up venv in {home}: run through tests/run.sh")
    env = dict(os.environ, HEADSEG_HOME=str(home))
    return subprocess.run(["bash", str(REPO_ROOT / "tests" / "serve.sh"), *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_port_in_use_is_named_before_comfyui_starts():
    """An earlier server on the port: serve.sh says so and stops, instead of ComfyUI loading every
    node and ending on an OSError traceback from aiohttp."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _serve("--port", str(port), timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"port {port} on 127.0.0.1 is in use" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args", [["--port"], ["--port", "web"], ["--port=80a"]])
def test_bad_port_argument(args):
    proc = _serve(*args, timeout=60)
    assert proc.returncode == 2
    assert "needs a port number" in proc.stderr, proc.stderr
