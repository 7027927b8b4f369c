"""ComfyUI's own CI import check (`main.py --quick-test-for-ci`) loads the pack without failure."""

from __future__ import annotations

import tempfile
import pathlib

import pytest

from headseg.tests.support.server import pack_custom_nodes_dir, quick_test_log

pytestmark = pytest.mark.server


def test_quick_test_for_ci_imports_the_pack():
    with tempfile.TemporaryDirectory(prefix="headseg-quick-") as tmp:
        returncode, log = quick_test_log(pathlib.Path(tmp), pack_custom_nodes_dir(pathlib.Path(tmp)))
    assert returncode == 0, log[-4000:]
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and "HeadSeg" in line]
    assert not failed, log[-4000:]
    # the pack was found and imported (ComfyUI lists import times per custom node folder)
    assert any("custom_nodes/HeadSeg" in line and "IMPORT FAILED" not in line for line in log.splitlines()), log[-4000:]
