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


@pytest.mark.parametrize(
    "args", [["--port"], ["--port", "web"], ["--port=80a"], ["--port", "99999"], ["--port=0"], ["--port", "9" * 30]]
)
def test_bad_port_argument(args):
    """A port past 65535 was called "in use" after an OverflowError traceback from the port check, and
    port 0 started ComfyUI on a port of the system's choosing while serve.sh named port 0."""
    proc = _serve(*args, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "needs a port number from 1 to 65535" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def _serve_stand_in(tmp_path, home: pathlib.Path, main_py: str, custom_nodes: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """serve.sh in ``home``, whose venv is stamped as the set-up one (its python runs the real venv's),
    with a stand-in ComfyUI whose main.py is ``main_py``, and a copy of the pack's __init__.py and
    pyproject.toml in each folder of its custom_nodes named in ``custom_nodes``."""
    import sys

    set_up = pathlib.Path(os.environ.get("HEADSEG_HOME", pathlib.Path.home() / ".cache" / "headseg"))
    stamp = set_up / "venv" / ".headseg-stamp"
    if not stamp.is_file():
        pytest.skip(f"no set-up venv ({stamp}): run through tests/run.sh")
    (home / "venv" / "bin").mkdir(parents=True)
    (home / "venv" / ".headseg-stamp").write_text(stamp.read_text())
    (home / "venv" / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (home / "venv" / "bin" / "python").chmod(0o755)
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    (comfy / "main.py").write_text(main_py)
    for name in custom_nodes:
        (comfy / "custom_nodes" / name).mkdir(parents=True)
        for file in ("__init__.py", "pyproject.toml"):
            (comfy / "custom_nodes" / name / file).write_bytes((REPO_ROOT / file).read_bytes())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HEADSEG_HOME=str(home), HEADSEG_COMFYUI=str(comfy), HEADSEG_CPU="1")
    return subprocess.run(["bash", str(REPO_ROOT / "tests" / "serve.sh"), "--port", str(port)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip


def test_paths_file_keeps_a_home_with_yaml_characters_whole(tmp_path):
    """serve.sh wrote its extra-model-paths file unquoted: with HEADSEG_HOME named "... #2: it's",
    ComfyUI read both folders cut at " #" and never loaded the pack ("...: " alone makes the file
    unreadable). The stand-in ComfyUI prints the file as PyYAML reads it, as ComfyUI does."""
    import json

    pytest.importorskip("yaml")
    home = tmp_path / "home #2: it's"
    proc = _serve_stand_in(tmp_path, home, (
        "import json, sys, yaml\n"
        "path = sys.argv[sys.argv.index('--extra-model-paths-config') + 1]\n"
        "print('CONFIG ' + json.dumps(yaml.safe_load(open(path))))\n"
    ))  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = json.loads(proc.stdout.split("CONFIG ", 1)[1])["headseg"]
    (serve_dir,) = (home / "serve").iterdir()
    assert config == {"custom_nodes": str(serve_dir / "custom_nodes"), "checkpoints": str(home / "models" / "checkpoints")}
    assert (serve_dir / "custom_nodes" / "HeadSeg").resolve() == REPO_ROOT


def test_server_holds_the_venv(tmp_path):
    """A setup for a checkout that needs other packages deleted the venv under a running server;
    the server holds .venv-users.lock (shared) while it runs, which such a setup checks first
    (tests/scripts/test_setup_env.py). The stand-in ComfyUI tries to take that lock outright."""
    import shutil

    if shutil.which("flock") is None:
        pytest.skip("no flock(1) here: the venv is not held")
    home = tmp_path / "home"
    proc = _serve_stand_in(tmp_path, home, (
        "import fcntl, os\n"
        f"lock = os.open({str(home / '.venv-users.lock')!r}, os.O_RDONLY | os.O_CREAT)\n"
        "try:\n    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)\n    print('VENV FREE')\n"
        "except BlockingIOError:\n    print('VENV HELD')\n"
    ))  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == "VENV HELD", proc.stdout + proc.stderr


def test_headseg_in_comfyuis_own_custom_nodes_is_named(tmp_path):
    """With HEADSEG_COMFYUI pointing at a ComfyUI that has HeadSeg installed (as README's install section
    says), ComfyUI loaded that copy first and left this checkout's nodes and web files out: serve.sh served
    another copy than the checkout it was started from. It now names the folder and stops; a folder
    renamed to .disabled, which ComfyUI skips, does not stop it."""
    proc = _serve_stand_in(tmp_path, tmp_path / "home", "print('STARTED')\n", custom_nodes=("HeadSeg",))
    folder = tmp_path / "ComfyUI" / "custom_nodes" / "HeadSeg"
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"[headseg] {folder} holds HeadSeg too" in proc.stderr, proc.stderr
    assert "STARTED" not in proc.stdout

    other = tmp_path / "other"
    other.mkdir()
    proc = _serve_stand_in(other, other / "home", "print('STARTED')\n", custom_nodes=("HeadSeg.disabled",))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == "STARTED"
