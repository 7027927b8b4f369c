"""The pack names the encoding of every text file it opens: Windows (ComfyUI's portable build) opens a text
file in the locale's encoding (cp1252, cp936, ...) unless told, so a file written as UTF-8 on one system reads
back garbled, or fails, on another. Python's PEP 597 warning (-X warn_default_encoding) finds each open without
an encoding; tests/support/text_encoding_probe.py runs the nodes' file paths in a Python started with it."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.comfy

PROBE = pathlib.Path(__file__).resolve().parents[1] / "support" / "text_encoding_probe.py"


def test_the_nodes_name_the_encoding_of_every_text_file_they_open(tmp_path):
    run = subprocess.run(
        [sys.executable, "-X", "warn_default_encoding", str(PROBE), str(tmp_path)],
        capture_output=True, text=True, encoding="utf-8", errors="replace", env={**os.environ, "PYTHONUTF8": "0"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == [], f"text files opened without an encoding at: {run.stdout.split()}"
    # the probe ran the nodes: their files are there
    assert list((tmp_path / "output" / "probe").glob("rec_*_.safetensors"))
    assert list((tmp_path / "output" / "probe").glob("labels_*_k2.png"))
