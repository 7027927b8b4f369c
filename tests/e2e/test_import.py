"""ComfyUI's own CI import check (`main.py --quick-test-for-ci`) loads the pack without failure."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import pathlib

import pytest

from headseg.tests.support.server import comfyui_dir, pack_custom_nodes_dir, write_paths_yaml

pytestmark = pytest.mark.server


def test_quick_test_for_ci_imports_the_pack():
    with tempfile.TemporaryDirectory(prefix="headseg-quick-") as tmp:
        tmp = pathlib.Path(tmp)
        yaml = tmp / "extra_model_paths.yaml"
        write_paths_yaml(yaml, pack_custom_nodes_dir(tmp), [])
        for d in ("output", "temp", "user", "input"):
            (tmp / d).mkdir()
        proc = subprocess.run(
            [sys.executable, "main.py", "--cpu", "--quick-test-for-ci", "--extra-model-paths-config", str(yaml),
             "--output-directory", str(tmp / "output"), "--temp-directory", str(tmp / "temp"),
             "--input-directory", str(tmp / "input"), "--user-directory", str(tmp / "user"),
             "--database-url", "sqlite:///:memory:"],
            cwd=comfyui_dir(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and "HeadSeg" in line]
    assert not failed, log[-4000:]
    # the pack was found and imported (ComfyUI lists import times per custom node folder)
    assert any("custom_nodes/HeadSeg" in line and "IMPORT FAILED" not in line for line in log.splitlines()), log[-4000:]
