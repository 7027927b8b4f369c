"""Runs the pack's file-writing and file-reading paths and prints, one a line, the pack's lines that opened a
text file without naming its encoding (run with ``python -X warn_default_encoding``, PEP 597).

Windows opens a text file in the locale's encoding (cp1252, cp936, ...) unless told, so a file the pack
wrote on Linux (UTF-8) would read back garbled there, or fail. Python's EncodingWarning names the line
that called open(); when the pack calls through the standard library (pathlib's read_text, ...) the
warning names the library's line, so each warning's stack is walked from the innermost frame outwards,
past the standard library, to the code that asked: reported when that is the pack's.

Usage: python -X warn_default_encoding text_encoding_probe.py FOLDER  (a fresh folder for ComfyUI's
input, output and temp folders). Prints nothing when every text file is opened with its encoding; exits 2
when the flag is missing (the probe would then see nothing).
"""

from __future__ import annotations

import os
import pathlib
import runpy
import sys
import sysconfig
import warnings

REPO = pathlib.Path(__file__).resolve().parents[2]
PACK = (str(REPO / "nodes") + os.sep, str(REPO / "__init__.py"))
STDLIB = tuple(os.path.realpath(sysconfig.get_paths()[key]) + os.sep for key in ("stdlib", "platstdlib"))
# installed libraries: inside the standard library's folder where Python is installed without a venv
# (Windows' Lib\site-packages, /usr/local/lib/python3.X/site-packages), and not part of it
SITE = tuple(os.path.realpath(sysconfig.get_paths()[key]) + os.sep for key in ("purelib", "platlib"))

found: list[str] = []


def _culprit(frame) -> str | None:
    """The first frame, from ``frame`` outwards, outside the standard library: 'file:line' when it is the pack's
    (an installed library's own open is the library's, not the line of the pack that called it)."""
    while frame is not None:
        name = frame.f_code.co_filename
        real = os.path.realpath(name)
        if not (name.startswith("<") or (real.startswith(STDLIB) and not real.startswith(SITE))):
            return f"{os.path.relpath(name, REPO)}:{frame.f_lineno}" if name.startswith(PACK) else None
        frame = frame.f_back
    return None


def _record(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, EncodingWarning) and "encoding" in str(message):
        where = _culprit(sys._getframe(1))
        if where is not None and where not in found:
            found.append(where)


def run_the_nodes(folder: pathlib.Path) -> None:
    """Save Recording, the file list, Load Recording (a good file and a bad one), the pipeline with its
    previews, Mask Select and Save Label Maps with a picture and masks, as ComfyUI runs them."""
    import folder_paths
    import torch

    for kind in ("input", "output", "temp"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
        getattr(folder_paths, f"set_{kind}_directory")(str(folder / kind))
    from headseg.nodes import prompt_migration, recording_files, recording_io_nodes
    from headseg.nodes.head_pca_node import HeadPCA
    from headseg.nodes.kmeans_node import MultiKMeans
    from headseg.nodes.mask_merge_node import MaskMerge
    from headseg.nodes.upsample_nodes import Upsample, UpsamplingErrorMap
    from headseg.nodes.label_map_nodes import SaveLabelMaps
    from headseg.nodes.mask_select_node import MaskSelectAtPixel
    from headseg.tests.core.planted import nested_scene, planted_recording, small_layout

    rec = planted_recording([nested_scene(64, 96)], layout=small_layout(heads=2), d=8, seed=3)
    path = recording_io_nodes.SaveRecording.execute(rec, "probe/rec").args[0]
    recording_files.forget_listing()
    assert recording_files._recording_files()
    loaded = recording_io_nodes.LoadRecording.execute("", path).args[0]
    (folder / "input" / "bad.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    try:
        recording_io_nodes.LoadRecording.execute("", "bad.safetensors")
    except ValueError:
        pass
    features = HeadPCA.execute(loaded, "down+up", "all", 4).args[0]
    stack = Upsample.execute(features, "bilinear", False).args[0]
    UpsamplingErrorMap.execute(stack)
    clusters = MultiKMeans.execute(stack, "2,4", 0).args[0]
    masks = MaskMerge.execute(clusters).args[0]
    picture = torch.rand(1, 64, 96, 3)
    MaskSelectAtPixel.execute(masks, 10, 10, 0, picture, "20,20")
    SaveLabelMaps.execute(clusters, "probe/labels", picture, masks)
    prompt_migration.on_prompt({"prompt": {"1": {"class_type": "HeadSeg_Upsample", "inputs": {}}}})


def main() -> int:
    if not sys.flags.warn_default_encoding:
        print("run with python -X warn_default_encoding", file=sys.stderr)
        return 2
    runpy.run_path(str(REPO / "tests" / "support" / "checkout.py"))["import_checkout"]()
    from headseg.tests.support.comfy_in_process import import_comfyui

    if not import_comfyui():
        print("HEADSEG_COMFYUI names no ComfyUI", file=sys.stderr)
        return 2
    warnings.showwarning = _record
    warnings.simplefilter("always", EncodingWarning)
    run_the_nodes(pathlib.Path(sys.argv[1]))
    print("\n".join(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
