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


def test_the_probe_blames_no_pack_line_for_a_library_that_opens_a_text_file_itself(monkeypatch):
    """The probe walks past the standard library's frames to the code that asked; an installed library's own
    open is that library's, not the line of the pack that called it. Where site-packages lies inside the
    standard library's folder (a Python installed without a venv: Windows' Lib\\site-packages, Linux's
    /usr/local/lib/python3.X/site-packages) a library's frame was walked past as the standard library's, and
    its open blamed on the pack. The frames are made here: _culprit reads a frame's file, line and caller."""
    import runpy
    import sysconfig
    import types

    culprit = runpy.run_path(str(PROBE))["_culprit"]
    site = pathlib.Path(os.path.realpath(sysconfig.get_paths()["purelib"]))
    # the standard library's folder taken to hold site-packages, as in such an install
    monkeypatch.setitem(culprit.__globals__, "STDLIB", (str(site.parent) + os.sep,))

    def frame(filename, line, back=None):
        return types.SimpleNamespace(f_code=types.SimpleNamespace(co_filename=filename), f_lineno=line, f_back=back)

    pack_line = frame(str(PROBE.parents[2] / "nodes" / "recording_io_nodes.py"), 7)
    library = frame(str(site / "somelib" / "reader.py"), 3, pack_line)
    assert culprit(library) is None
    stdlib = frame(str(site.parent / "pathlib.py"), 9, pack_line)  # pathlib's read_text, asked by the pack
    assert culprit(stdlib) == os.path.join("nodes", "recording_io_nodes.py") + ":7"
