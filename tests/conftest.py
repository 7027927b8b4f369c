"""Imports this checkout as the package ``headseg``, whatever the folder is called
(tests/support/checkout.py).

ComfyUI has its own top-level ``nodes`` module, so the pack is never imported as a top-level
``nodes``; tests use ``from headseg.nodes.core import pca`` and so on.
"""

import pathlib
import runpy

runpy.run_path(str(pathlib.Path(__file__).resolve().parent / "support" / "checkout.py"))["import_checkout"]()


def pytest_report_header(config):
    """Says so at the top of the run when the in-process ComfyUI suites are not collected (their
    conftests leave them out without HEADSEG_COMFYUI), so a short run is not mistaken for a full one."""
    import os

    path = os.environ.get("HEADSEG_COMFYUI", "")
    if not path or not (pathlib.Path(path) / "comfy").is_dir():
        return (
            f"HeadSeg: HEADSEG_COMFYUI ({path or 'unset'}) names no ComfyUI: tests/comfy and tests/nodes are "
            "not collected (source tests/setup_env.sh, or run bash tests/run.sh)"
        )
    return None
