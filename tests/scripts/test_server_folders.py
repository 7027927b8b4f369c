"""The test server's temporary folder is removed however the server ends. A stand-in ComfyUI (a
main.py that answers /system_stats, or one that exits at once) replaces the real one: nothing of
ComfyUI is loaded here."""

from __future__ import annotations

import pytest

from headseg.tests.support import server as server_module

FAKE_MAIN = """
import http.server, sys
if "fail" in open(__file__).read().splitlines()[0]:
    print("stand-in ComfyUI fails at start")
    sys.exit(3)
port = int(sys.argv[sys.argv.index("--port") + 1])

class Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

http.server.HTTPServer(("127.0.0.1", port), Answer).serve_forever()
"""


def _fake_comfyui(tmp_path, monkeypatch, fail: bool):
    comfy = tmp_path / "ComfyUI"
    comfy.mkdir()
    (comfy / "main.py").write_text(("# fail" if fail else "# serve") + FAKE_MAIN)
    monkeypatch.setenv("HEADSEG_COMFYUI", str(comfy))
    monkeypatch.setattr(server_module.tempfile, "tempdir", str(tmp_path))  # its temp folders go here


def _temp_folders(tmp_path):
    return sorted(tmp_path.glob("headseg-comfy-*"))


def test_with_block_removes_the_servers_folder(tmp_path, monkeypatch):
    """``with ComfyServer() as s:`` stopped the server but left its folder (log, input, output,
    custom_nodes link) in /tmp after every use."""
    _fake_comfyui(tmp_path, monkeypatch, fail=False)
    with server_module.ComfyServer() as server:
        assert server.workdir.is_dir()
        proc = server.proc
    assert proc.poll() is not None
    assert _temp_folders(tmp_path) == []


def test_shared_server_that_fails_to_start_leaves_no_folder(tmp_path, monkeypatch):
    _fake_comfyui(tmp_path, monkeypatch, fail=True)
    # the session's own shared server (started by earlier tests) stays out of it: a slot of this test's
    monkeypatch.setattr(server_module, "_shared", {"server": None, "users": 0})
    with pytest.raises(RuntimeError, match="stand-in ComfyUI fails at start"):
        server_module.acquire_shared_server(with_test_checkpoint=False)
    assert _temp_folders(tmp_path) == []
    assert server_module._shared["server"] is None and server_module._shared["users"] == 0


@pytest.mark.parametrize("name", ["a #1", "a: b", "it's \"x\"", "back\\slash", "[list], {map} & *star"])
def test_paths_yaml_keeps_folder_names_whole(tmp_path, name):
    """The custom_nodes folder was written unquoted: from a folder named "a #1" ComfyUI read only
    ".../a" (the rest a YAML comment) and did not load the pack; "a: b" made the file unreadable
    and ComfyUI stopped at start. ComfyUI reads each value as lines of paths
    (utils/extra_config.py)."""
    yaml = pytest.importorskip("yaml")
    folder = tmp_path / name
    custom_nodes = folder / "custom_nodes"
    checkpoints = [folder / "models" / "checkpoints", tmp_path / "more #2"]
    path = tmp_path / "extra_model_paths.yaml"
    server_module.write_paths_yaml(path, custom_nodes, checkpoints)
    config = yaml.safe_load(path.read_text())["headseg"]
    assert config["custom_nodes"].splitlines() == [str(custom_nodes)]
    assert config["checkpoints"].splitlines() == [str(c) for c in checkpoints]


def _frontend(folder):
    folder.mkdir(parents=True)
    (folder / "index.html").write_text("<!doctype html><title>frontend</title>")
    return folder


def test_default_server_serves_the_frontend_comfyui_pins(tmp_path, monkeypatch):
    _fake_comfyui(tmp_path, monkeypatch, fail=False)
    monkeypatch.delenv("HEADSEG_FRONTEND_ROOT", raising=False)
    assert "--front-end-root" not in server_module.ComfyServer().command()
    monkeypatch.setenv("HEADSEG_FRONTEND_ROOT", "")  # empty: the same
    assert "--front-end-root" not in server_module.ComfyServer().command()


@pytest.mark.parametrize("layout", ["static folder", "pip --target folder"])
def test_frontend_root_names_the_frontend_the_server_serves(tmp_path, monkeypatch, layout):
    """HEADSEG_FRONTEND_ROOT runs the tests' server (browser tests, e2e) with another web frontend: a
    folder of built files, or a folder comfyui-frontend-package was pip-installed into."""
    _fake_comfyui(tmp_path, monkeypatch, fail=False)
    static = _frontend(tmp_path / "fe" / "comfyui_frontend_package" / "static")
    given = static if layout == "static folder" else tmp_path / "fe"
    monkeypatch.setenv("HEADSEG_FRONTEND_ROOT", str(given))
    command = server_module.ComfyServer().command()
    assert command[command.index("--front-end-root") + 1] == str(static)


def test_frontend_root_without_a_frontend_is_named(tmp_path, monkeypatch):
    _fake_comfyui(tmp_path, monkeypatch, fail=False)
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("HEADSEG_FRONTEND_ROOT", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"HEADSEG_FRONTEND_ROOT=.*empty.*index\.html"):
        server_module.ComfyServer()
