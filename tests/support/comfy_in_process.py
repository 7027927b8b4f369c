"""ComfyUI imported in-process for tests: $HEADSEG_COMFYUI on sys.path, argument parsing off, CPU mode."""

import os
import pathlib
import sys


def import_comfyui() -> bool:
    """Makes `comfy`, `folder_paths`, ... importable in CPU mode; False when HEADSEG_COMFYUI names no ComfyUI."""
    path = os.environ.get("HEADSEG_COMFYUI", "")
    if not path or not (pathlib.Path(path) / "comfy").is_dir():
        return False
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    import comfy.model_management  # noqa: F401

    return True
