"""The test server's process ends with the pytest process that started it, however that one ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from headseg.tests.support.server import REPO_ROOT

pytestmark = pytest.mark.server

STARTER = textwrap.dedent(
    f"""
    import runpy, time
    runpy.run_path({str(REPO_ROOT / "tests" / "support" / "checkout.py")!r})["import_checkout"]()
    from headseg.tests.support.server import ComfyServer
    server = ComfyServer().start()
    print(server.proc.pid, server.workdir, flush=True)
    time.sleep(600)
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead (its parent, init here, reaps it soon)
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_server_ends_when_its_starter_is_killed(tmp_path):
    """SIGKILL (or SIGTERM, as a CI timeout sends) skips pytest's teardown: the ComfyUI server, in a
    session of its own so that Ctrl-C reaches pytest first, stayed up as an orphan with its port."""
    starter = subprocess.Popen([sys.executable, "-c", STARTER], stdout=subprocess.PIPE, text=True)
    server_pid = None
    workdir = None
    try:
        line = starter.stdout.readline()
        assert line, "the starter printed nothing (ComfyUI did not start)"
        pid_text, workdir = line.split(maxsplit=1)
        server_pid = int(pid_text)
        assert _alive(server_pid)
        starter.kill()
        starter.wait(timeout=30)
        deadline = time.time() + 60
        while _alive(server_pid) and time.time() < deadline:
            time.sleep(0.5)
        assert not _alive(server_pid), "the ComfyUI server outlived the process that started it"
    finally:
        if starter.poll() is None:
            starter.kill()
        if server_pid is not None and _alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)
        if workdir:
            import shutil

            shutil.rmtree(workdir.strip(), ignore_errors=True)
