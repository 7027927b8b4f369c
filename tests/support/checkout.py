"""Imports this checkout as the package ``headseg``, whatever its folder is called.

ComfyUI has its own top-level ``nodes`` module, so the pack is never imported as a top-level
``nodes``; tests and scripts use ``from headseg.nodes.core import pca`` and so on. This file imports
nothing from the pack: the entry points (tests/conftest.py, the benchmark scripts, the README
figure) run it by path before ``headseg`` exists:

    runpy.run_path(".../tests/support/checkout.py")["import_checkout"]()
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import ModuleType

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def import_checkout() -> ModuleType:
    """-> the package ``headseg`` (this checkout), imported once and kept in sys.modules."""
    if "headseg" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "headseg", REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["headseg"] = module
        spec.loader.exec_module(module)
    return sys.modules["headseg"]
