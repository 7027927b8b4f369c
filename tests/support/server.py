"""Start and stop a real ComfyUI server on 127.0.0.1 with the HeadSeg pack, and talk to it.

Used by the end-to-end tests (tests/e2e), the browser tests (tests/browser) and tests/serve.sh:

    from headseg.tests.support.server import comfy_server   # in a conftest: registers the fixture

    def test_something(comfy_server):
        api = comfy_server.api_from_ui(ui_workflow)          # UI -> API format (object_info)
        result = comfy_server.run(api, timeout=600)          # queue, wait on the websocket
        assert result.ok, result.error

The ``comfy_server`` fixture is session scoped and shared: however many conftests import it,
one server runs per pytest process (started on first use, stopped at the end of the session).
It serves the random-weight SD2.1-architecture checkpoint (tests/support/checkpoint.py) from
``$HEADSEG_HOME/models/checkpoints``; ``comfy_server.checkpoint_name`` is its name as
CheckpointLoaderSimple lists it. Input, output, temp and user folders live in a fresh temporary
folder; ``comfy_server.input_dir`` is where a test puts images for LoadImage.

The web frontend is the one the ComfyUI install pins (comfyui-frontend-package), unless
``HEADSEG_FRONTEND_ROOT`` names another one: the folder of its built files (with ``index.html``),
or a ``pip install --target`` folder of a comfyui-frontend-package, whose
``comfyui_frontend_package/static`` is taken. It is handed to ComfyUI as ``--front-end-root``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def comfyui_dir() -> pathlib.Path:
    home = pathlib.Path(os.environ.get("HEADSEG_HOME", pathlib.Path.home() / ".cache" / "headseg"))
    path = pathlib.Path(os.environ.get("HEADSEG_COMFYUI", home / "ComfyUI-0.3.75"))
    if not (path / "main.py").is_file():
        raise FileNotFoundError(f"no ComfyUI at {path} (HEADSEG_COMFYUI): source tests/setup_env.sh first")
    return path


def frontend_root() -> pathlib.Path | None:
    """The web frontend ``HEADSEG_FRONTEND_ROOT`` names (see the module's docstring), or None when it
    is unset or empty (ComfyUI's own). A folder with no ``index.html`` in it or in the package's
    ``comfyui_frontend_package/static`` is refused with a message that names the variable."""
    value = os.environ.get("HEADSEG_FRONTEND_ROOT", "")
    if not value:
        return None
    given = pathlib.Path(value).expanduser().resolve()
    for root in (given, given / "comfyui_frontend_package" / "static"):
        if (root / "index.html").is_file():
            return root
    raise FileNotFoundError(
        f"HEADSEG_FRONTEND_ROOT={value}: expected a folder of a built ComfyUI frontend (with index.html), or a "
        "folder comfyui-frontend-package was installed into with pip install --target (with "
        "comfyui_frontend_package/static/index.html); found neither"
    )


def pack_custom_nodes_dir(parent: pathlib.Path) -> pathlib.Path:
    """``parent/custom_nodes`` holding one link, HeadSeg, to this checkout (made if missing)."""
    folder = parent / "custom_nodes"
    link = folder / "HeadSeg"
    folder.mkdir(parents=True, exist_ok=True)
    if not (link.is_symlink() and link.resolve() == REPO_ROOT):
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    return folder


def _parent_death_signal():
    """-> a function for Popen's ``preexec_fn`` that has the child sent SIGTERM when the process that
    started it dies (Linux; None elsewhere). Resolved here, in the parent: the child of a process with
    other threads (Playwright's) must not import anything between fork and exec."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    PR_SET_PDEATHSIG = 1
    return lambda: prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_paths_yaml(path: pathlib.Path, custom_nodes: pathlib.Path, checkpoints: list[pathlib.Path]) -> None:
    """An extra-model-paths file adding the pack's custom_nodes folder and checkpoint folders.

    The custom_nodes folder is written as a double-quoted YAML string (JSON's quoting): unquoted, a
    folder name with " #" lost everything from there on (a comment) and one with ": " made the file
    unreadable. The checkpoint folders are the lines of a literal block, where nothing is special."""
    lines = ["headseg:"]
    lines.append(f"    custom_nodes: {json.dumps(str(custom_nodes), ensure_ascii=False)}")
    if checkpoints:
        lines.append("    checkpoints: |")
        lines += [f"        {c}" for c in checkpoints]
    path.write_text("\n".join(lines) + "\n")


@dataclasses.dataclass
class RunResult:
    prompt_id: str
    ok: bool
    error: dict | None             # the execution_error message, if any
    history: dict                  # /history/<id> entry: "outputs" (ui payload per node id), "status"
    executed: dict                 # node id -> ui payload from the websocket "executed" messages
    progress: dict                 # node id -> list of (value, max) progress messages
    seconds: float

    def outputs(self, node_id) -> dict:
        return self.history.get("outputs", {}).get(str(node_id), {})


class ComfyServer:
    """One ComfyUI process; ``start()`` waits until it answers, ``stop()`` ends it, ``cleanup()`` also
    removes the temporary folder it made (a ``with`` block ends with ``cleanup()``)."""

    def __init__(
        self,
        port: int | None = None,
        checkpoints: list[pathlib.Path] | None = None,
        workdir: pathlib.Path | None = None,
        extra_args: list[str] | None = None,
        python: str | None = None,
    ):
        self.comfyui = comfyui_dir()
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self._own_workdir = workdir is None
        self.workdir = pathlib.Path(workdir or tempfile.mkdtemp(prefix="headseg-comfy-"))
        self.input_dir = self.workdir / "input"
        self.output_dir = self.workdir / "output"
        self.temp_dir = self.workdir / "temp"
        self.user_dir = self.workdir / "user"
        self.started_mark = 0  # log_mark() once the server answers (start)
        self.log_path = self.workdir / "comfyui.log"
        self.checkpoints = list(checkpoints or [])
        self.extra_args = list(extra_args or [])
        self.python = python or sys.executable
        self.frontend_root = frontend_root()  # None: the one ComfyUI pins
        self.proc: subprocess.Popen | None = None
        self.checkpoint_name: str | None = None
        self._object_info: dict | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [
            self.python, "main.py", "--cpu", "--listen", self.host, "--port", str(self.port),
            "--extra-model-paths-config", str(self.workdir / "extra_model_paths.yaml"),
            "--output-directory", str(self.output_dir), "--input-directory", str(self.input_dir),
            "--temp-directory", str(self.temp_dir), "--user-directory", str(self.user_dir),
            "--database-url", "sqlite:///:memory:", "--disable-auto-launch",
            *(["--front-end-root", str(self.frontend_root)] if self.frontend_root else []), *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        for d in (self.input_dir, self.output_dir, self.temp_dir, self.user_dir):
            d.mkdir(parents=True, exist_ok=True)
        write_paths_yaml(self.workdir / "extra_model_paths.yaml", pack_custom_nodes_dir(self.workdir), self.checkpoints)
        log = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # A session of its own, so that Ctrl-C in the terminal reaches pytest (which then stops the
        # server) and not ComfyUI mid-test; and ended with its parent, so that a pytest killed
        # outright (SIGTERM from a CI timeout, SIGKILL) leaves no server holding memory and a port.
        self.proc = subprocess.Popen(
            self.command(), cwd=self.comfyui, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            preexec_fn=_parent_death_signal(),
        )
        log.close()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as r:
                    if r.status == 200:
                        self.started_mark = self.log_mark()  # the log of the start-up ends here
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Ends the server process (only the one this object started)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()

    # -- logs ----------------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def log_mark(self) -> int:
        """Current length of the log: pass it to ``pack_errors(start=...)`` to look at later lines only."""
        return len(self.log_text())

    def pack_errors(self, start: int = 0, end: int | None = None) -> list[str]:
        """Log lines (with some context) that report a failure inside the HeadSeg pack.

        ``start`` / ``end``: character offsets from ``log_mark()`` (e.g. to leave out errors a test
        provoked on purpose). ComfyUI 0.3.75 always logs two torchaudio tracebacks when torchaudio
        is absent; those do not name the pack and are ignored.
        """
        lines = self.log_text()[start:end].splitlines()
        found = []
        for i, line in enumerate(lines):
            low = line.lower()
            names_pack = "headseg" in low.replace(str(self.workdir).lower(), "")
            bad = any(w in low for w in ("import failed", "traceback", "error", "exception"))
            if names_pack and bad:
                found.append("\n".join(lines[max(0, i - 3): i + 3]))
            elif line.startswith('  File "') and "HeadSeg" in line:
                found.append("\n".join(lines[max(0, i - 3): i + 6]))
        return found

    # -- HTTP ----------------------------------------------------------------------------------
    def get_json(self, path: str, timeout: float = 30.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def get_bytes(self, path: str, timeout: float = 30.0) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return r.read()

    def post_json(self, path: str, payload: dict, timeout: float = 30.0):
        req = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            raise RuntimeError(f"POST {path} -> {e.code}: {body}") from None

    def object_info(self) -> dict:
        if self._object_info is None:
            self._object_info = self.get_json("/object_info", timeout=120)
        return self._object_info

    def view(self, image: dict) -> bytes:
        """Bytes of an image from a ui payload entry {filename, subfolder, type}."""
        q = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
        return self.get_bytes("/view?" + q)

    def api_from_ui(self, ui_workflow: dict) -> dict:
        from .workflow_api import ui_to_api

        return ui_to_api(ui_workflow, self.object_info())

    # -- queue and wait ------------------------------------------------------------------------
    def queue(self, api_prompt: dict, client_id: str) -> str:
        return self.post_json("/prompt", {"prompt": api_prompt, "client_id": client_id})["prompt_id"]

    def run(self, api_prompt: dict, timeout: float = 900.0) -> RunResult:
        """Queues ``api_prompt`` and waits for it on the websocket; returns the run's outcome."""
        import websocket  # websocket-client

        client_id = uuid.uuid4().hex
        ws = websocket.create_connection(f"ws://{self.host}:{self.port}/ws?clientId={client_id}", timeout=30)
        start = time.time()
        executed: dict = {}
        progress: dict = {}
        error = None
        ok = False
        try:
            prompt_id = self.queue(api_prompt, client_id)
            deadline = start + timeout
            while True:
                remaining = deadline - time.time()
                if remaining <= 0:
                    raise TimeoutError(f"prompt {prompt_id} not done within {timeout:.0f} s:\n{self.log_tail()}")
                ws.settimeout(min(remaining, 30.0))
                try:
                    raw = ws.recv()
                except websocket.WebSocketTimeoutException:
                    if self.proc is not None and self.proc.poll() is not None:
                        raise RuntimeError(f"ComfyUI died:\n{self.log_tail()}") from None
                    continue
                if not isinstance(raw, str):
                    continue  # binary preview frames
                msg = json.loads(raw)
                data = msg.get("data", {})
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                kind = msg.get("type")
                if kind == "executed":
                    executed[str(data["node"])] = data.get("output")
                elif kind == "progress":
                    progress.setdefault(str(data.get("node")), []).append((data.get("value"), data.get("max")))
                elif kind == "execution_error":
                    error = data
                    break
                elif kind == "execution_success":
                    ok = True
                    break
                elif kind == "execution_interrupted":
                    error = data
                    break
        finally:
            ws.close()
        history = {}
        for _ in range(20):  # the history entry is written just after the last message
            history = self.get_json(f"/history/{prompt_id}").get(prompt_id, {})
            if history:
                break
            time.sleep(0.25)
        return RunResult(prompt_id, ok, error, history, executed, progress, time.time() - start)


# ---------------------------------------------------------------------------------------------
# pytest: one shared server per process, whichever conftests import the fixture.

_shared: dict = {"server": None, "users": 0}
_lock = threading.Lock()


def acquire_shared_server(with_test_checkpoint: bool = True) -> ComfyServer:
    with _lock:
        if _shared["server"] is None:
            checkpoints = []
            name = None
            if with_test_checkpoint:
                from .checkpoint import ensure_checkpoint

                path = ensure_checkpoint()
                checkpoints.append(path.parent)
                name = path.name
            server = ComfyServer(checkpoints=checkpoints)
            server.checkpoint_name = name
            try:
                server.start()
            except BaseException:
                server.cleanup()  # its temp folder; the error carries the log's tail
                raise
            _shared["server"] = server
        _shared["users"] += 1
        return _shared["server"]


def release_shared_server() -> None:
    with _lock:
        _shared["users"] -= 1
        if _shared["users"] <= 0 and _shared["server"] is not None:
            _shared["server"].cleanup()
            _shared["server"] = None
            _shared["users"] = 0


try:
    import pytest
except ImportError:  # used outside pytest (e.g. by tests/serve.sh helpers)
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="session")
    def comfy_server():
        """A live ComfyUI (127.0.0.1, free port) with the pack and the random SD2.1 checkpoint."""
        server = acquire_shared_server()
        try:
            yield server
        finally:
            release_shared_server()


def quick_test_log(tmp: pathlib.Path, custom_nodes: pathlib.Path | list[pathlib.Path]) -> tuple[int, str]:
    """Runs ComfyUI's ``--quick-test-for-ci`` with ``custom_nodes`` as the custom-nodes folder (or folders,
    loaded in that order): (exit code, log)."""
    yaml = tmp / "extra_model_paths.yaml"
    if isinstance(custom_nodes, list):
        yaml.write_text("headseg:\n    custom_nodes: |\n" + "".join(f"        {c}\n" for c in custom_nodes))
    else:
        write_paths_yaml(yaml, custom_nodes, [])
    for d in ("output", "temp", "user", "input"):
        (tmp / d).mkdir(exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "main.py", "--cpu", "--quick-test-for-ci", "--extra-model-paths-config", str(yaml),
         "--output-directory", str(tmp / "output"), "--temp-directory", str(tmp / "temp"),
         "--input-directory", str(tmp / "input"), "--user-directory", str(tmp / "user"),
         "--database-url", "sqlite:///:memory:"],
        cwd=comfyui_dir(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr
