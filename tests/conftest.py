"""Imports this checkout as the package ``headseg`` whatever the folder is called.

ComfyUI has its own top-level ``nodes`` module, so the pack is never imported as a top-level
``nodes``; tests use ``from headseg.nodes.core import pca`` and so on.
"""

import importlib.util
import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _import_pack_as_headseg():
    if "headseg" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        "headseg", REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["headseg"] = module
    spec.loader.exec_module(module)


_import_pack_as_headseg()
