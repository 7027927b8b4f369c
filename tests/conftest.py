"""Imports this checkout as the package ``headseg``, whatever the folder is called
(tests/support/checkout.py).

ComfyUI has its own top-level ``nodes`` module, so the pack is never imported as a top-level
``nodes``; tests use ``from headseg.nodes.core import pca`` and so on.
"""

import pathlib
import runpy

runpy.run_path(str(pathlib.Path(__file__).resolve().parent / "support" / "checkout.py"))["import_checkout"]()
