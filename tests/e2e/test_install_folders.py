"""The pack installed the ways users install it: twice (an old and a new folder). A real ComfyUI server:
the web routes matter."""

from __future__ import annotations

import pathlib
import urllib.error

import pytest

from headseg.tests.support.server import REPO_ROOT, ComfyServer

pytestmark = pytest.mark.server


def test_second_copy_is_left_out_and_named_in_the_log(tmp_path):
    """Two folders of HeadSeg: ComfyUI registered the node ids of the folder it loaded last over the first
    one's, silently, and served both front ends, of which the browser keeps whichever registers first (nodes
    of one copy under the picker of the other). The first copy loaded now stays whole, the second registers
    no nodes and serves no web files, and the log names both folders."""
    custom_nodes = tmp_path / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / "HeadSeg-old").symlink_to(REPO_ROOT, target_is_directory=True)
    server = ComfyServer(workdir=tmp_path)  # adds custom_nodes/HeadSeg, the copy under test
    try:
        server.start()
        info = server.object_info()
        modules = {v["python_module"] for k, v in info.items() if k.startswith("HeadSeg_")}
        assert len(modules) == 1, modules
        in_use = modules.pop().removeprefix("custom_nodes.")
        left_out = ({"HeadSeg", "HeadSeg-old"} - {in_use}).pop()
        scripts = [e for e in server.get_json("/extensions") if e.endswith("/headseg.js")]
        assert scripts == [f"/extensions/{in_use}/headseg.js"], scripts
        with pytest.raises(urllib.error.HTTPError, match="404"):
            server.get_bytes(f"/extensions/{left_out}/headseg.js")
        warning = [line for line in server.log_text().splitlines() if "HeadSeg is installed twice" in line]
        assert len(warning) == 1, server.log_tail()
        assert f"{custom_nodes / in_use} (" in warning[0] and "is in use" in warning[0]
        assert f"{custom_nodes / left_out} (" in warning[0] and "is left out" in warning[0]
        assert warning[0].index(str(custom_nodes / in_use) + " (") < warning[0].index("is in use")
    finally:
        server.stop()

