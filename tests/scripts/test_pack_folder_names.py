"""Which folder names ComfyUI can serve the pack's web files under: nodes/pack_folder.py's rule against
aiohttp's own static routes (ComfyUI adds one per custom-node web folder: /extensions/<folder name>, and
one per examples folder: /api/workflow_templates/<folder name>)."""

from __future__ import annotations

import urllib.parse

import pytest

from headseg.nodes.pack_folder import unservable_characters
from headseg.tests.support.comfy_in_process import run_on_own_thread

NAMES = ["HeadSeg", "ComfyUI-HeadSeg", "headseg-main", "headseg.v2", "headseg_1", "headseg~1", "headseg(1)",
         "head+seg", "head,seg", "head'seg", "head@seg", "head=seg", "head!seg", "head$seg", "head&seg",
         "head;seg", "head seg", "headseg-main (1)", "héadseg", "head%seg", "head#seg", "head[1]", "head?seg",
         "head{1}", "head^seg", "head`seg", "head|seg", 'head"seg', "head<seg>"]  # fmt: skip


def test_rule_matches_what_aiohttp_serves(tmp_path):
    web = pytest.importorskip("aiohttp.web")
    from aiohttp.test_utils import TestClient, TestServer

    (tmp_path / "headseg.js").write_text("export {};\n")

    async def statuses():
        app = web.Application()
        for name in NAMES:
            app.add_routes([web.static("/extensions/" + name, tmp_path)])
        async with TestClient(TestServer(app)) as client:
            # the URL as ComfyUI lists it (server.py quotes each path)
            return {n: (await client.get("/extensions/" + urllib.parse.quote(n) + "/headseg.js")).status for n in NAMES}

    served = run_on_own_thread(statuses)  # Playwright's loop may run on this thread (browser tests before)
    assert served["HeadSeg"] == 200 and served["head seg"] == 404  # both kinds are among the names
    for name, status in served.items():
        assert (status == 200) == (unservable_characters(name) == ""), (name, status, unservable_characters(name))


def test_characters_are_named_once_in_order():
    assert unservable_characters("headseg-main (1)") == " "
    assert unservable_characters("my héad #2 é") == " é#"
