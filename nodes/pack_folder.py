"""Where this copy of HeadSeg is installed, and what ComfyUI makes of that folder when it loads it.

Three start-up cases get a log line of their own, each naming the folder and what to do:

* HeadSeg installed twice (an old and a new folder in ``custom_nodes``): ComfyUI registers the node ids of
  the folder it loads last over those of the first, with no word in the log, and serves both folders'
  web files, of which the browser registers whichever loads first: nodes of one copy ran under the
  picker of the other. The copy loaded second now leaves its nodes and web files out (``other_copy``,
  ``withdraw_web_folder``): the first one stays whole. The first one names the other folders it finds
  (``other_installed_copies``): a copy from before this check, loaded after it, still takes its place.
  One folder that ComfyUI's custom_nodes paths name twice (``same_folder_entry``) is loaded twice too:
  the second load is left out as well, and its log line says to remove the path, not the folder.
* A folder name that ComfyUI lists but cannot serve web files from (a space, as in
  ``headseg-main (1)`` from a second zip download, or a letter outside ASCII): the nodes load, but the
  picker, the node docs and the example workflows answer 404 in the browser (``unservable_characters``).
* The pack failing to import (a file missing from a broken download, a ComfyUI too old for V3 nodes):
  ComfyUI's own line for a V3 pack has the error's text alone (``load_failure_message``).

Nothing here imports ComfyUI: its ``nodes`` module is looked up in ``sys.modules`` (main.py has
imported it before it loads custom nodes).
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
import sys

# the pack's root folder as ComfyUI loaded it (a link is not followed: two links to one checkout are
# two copies to ComfyUI)
PACK_DIR = pathlib.Path(os.path.abspath(__file__)).parent.parent
NODE_ID = "HeadSeg_RecordSelfAttention"  # any of the pack's node ids tells which copy registered them
COMFYUI_NEEDED = "0.3.75"

# What aiohttp (ComfyUI's web server) matches in a static route's folder name: the characters a URL
# path keeps as they are (RFC 3986 pchar). Others are percent-encoded in the route and decoded in the
# request, and the two no longer match.
_SERVABLE = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@]")


def _pyproject_text(folder: pathlib.Path) -> str:
    """``folder``/pyproject.toml's text, "" when it cannot be read as UTF-8."""
    try:
        return (folder / "pyproject.toml").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def pack_version(folder: pathlib.Path) -> str:
    """[project] version from ``folder``/pyproject.toml, or "unknown version" (no tomllib before Python 3.11)."""
    match = re.search(r'^version\s*=\s*"([^"]+)"', _pyproject_text(folder), re.MULTILINE)
    return match.group(1) if match else "unknown version"


def _comfy_nodes():
    return sys.modules.get("nodes")


def other_copy() -> pathlib.Path | None:
    """The root folder of another HeadSeg copy whose nodes ComfyUI has already registered, or None."""
    registered = getattr(_comfy_nodes(), "NODE_CLASS_MAPPINGS", {}).get(NODE_ID)
    file = getattr(sys.modules.get(getattr(registered, "__module__", "")), "__file__", None)
    if not file:
        return None
    folder = pathlib.Path(os.path.abspath(file)).parent.parent  # <pack>/nodes/record_node.py
    return None if folder == PACK_DIR else folder


def withdraw_web_folder(first: pathlib.Path) -> None:
    """Takes this copy's web folder out of the ones ComfyUI serves (its routes are added after all
    custom nodes are loaded), so that the browser loads the front end of ``first``, the copy in use, only.

    ComfyUI keys a web folder by the pack's folder name (and by the pyproject name): where both copies have
    the same name (``HeadSeg`` in two custom_nodes folders), this copy's folder took the key of the first
    one's, which then gets it back instead of losing its front end."""
    web_dirs = getattr(_comfy_nodes(), "EXTENSION_WEB_DIRS", None)
    if not isinstance(web_dirs, dict):
        return
    own = os.path.abspath(PACK_DIR / "js")
    first_js = os.path.abspath(first / "js")
    for name, path in list(web_dirs.items()):
        if isinstance(path, str) and os.path.abspath(path) == own:
            served = any(isinstance(p, str) and os.path.abspath(p) == first_js for p in web_dirs.values())
            if served or not os.path.isdir(first_js):
                del web_dirs[name]
            else:
                web_dirs[name] = first_js


def _holds_headseg(folder: pathlib.Path) -> bool:
    text = _pyproject_text(folder)
    return (folder / "__init__.py").is_file() and re.search(r'^name\s*=\s*"headseg"\s*$', text, re.MULTILINE) is not None


def same_folder_entry(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Whether paths a and b name one folder (or one link) in custom_nodes, reached through two custom_nodes
    paths (a link to the custom_nodes folder, another case of its name on a case-insensitive disk): not two
    copies, of which one could be removed. Two links to one checkout are two entries, so two copies."""
    try:
        return os.path.samestat(os.lstat(a), os.lstat(b))
    except OSError:
        return False


def other_installed_copies() -> list[pathlib.Path]:
    """The other folders of HeadSeg that ComfyUI loads custom nodes from (its custom_nodes folders, less
    ``.disabled`` ones and those --disable-all-custom-nodes leaves out), in the order it loads them."""
    folder_paths = sys.modules.get("folder_paths")
    roots = folder_paths.get_folder_paths("custom_nodes") if folder_paths else [str(PACK_DIR.parent)]
    args = getattr(sys.modules.get("comfy.cli_args"), "args", None)
    only = set(args.whitelist_custom_nodes) if getattr(args, "disable_all_custom_nodes", False) else None
    found = []
    for root in roots:
        try:
            names = os.listdir(os.path.realpath(root))
        except OSError:
            continue
        for name in names:
            folder = pathlib.Path(os.path.abspath(os.path.join(root, name)))
            if name.endswith(".disabled") or (only is not None and name not in only) or folder == PACK_DIR:
                continue
            if folder not in found and not same_folder_entry(folder, PACK_DIR) and _holds_headseg(folder):
                found.append(folder)
    return found


def leave_out_second_copy() -> bool:
    """True (with a warning that names both folders) when another HeadSeg copy was loaded first: this one
    then registers no nodes and serves no web files. False for the first copy, which names the other
    copies it finds in a warning of its own."""
    first = other_copy()
    if first is None:
        others = other_installed_copies()
        if others:
            logging.warning(
                "[HeadSeg] HeadSeg is installed more than once: this copy, %s (%s), is loaded first; it is also in "
                "%s. A later copy leaves its nodes out, unless it is one from before that check, which replaces "
                "this one's. Remove all but one of the folders from custom_nodes and restart ComfyUI.",
                PACK_DIR, pack_version(PACK_DIR), ", ".join(f"{o} ({pack_version(o)})" for o in others),
            )  # fmt: skip
        return False
    withdraw_web_folder(first)
    if same_folder_entry(first, PACK_DIR):
        logging.warning(
            "[HeadSeg] %s is loaded twice, also as %s: ComfyUI's custom_nodes folders name one folder under two "
            "paths (a link to a custom_nodes folder, or an extra_model_paths.yaml entry for it), so it loads "
            "every pack in it twice; this second load is left out. Remove the second path from ComfyUI's "
            "custom_nodes folders (extra_model_paths.yaml) and keep the folder.",
            first, PACK_DIR,
        )  # fmt: skip
        return True
    logging.warning(
        "[HeadSeg] HeadSeg is installed twice: %s (%s) was loaded first and is in use; %s (%s) is left out "
        "(none of its nodes or web files). Remove one of the two folders from custom_nodes and restart ComfyUI.",
        first, pack_version(first), PACK_DIR, pack_version(PACK_DIR),
    )  # fmt: skip
    return True


def unservable_characters(name: str) -> str:
    """The characters of the folder name ``name`` that ComfyUI's web server cannot serve files under
    (each once, in order), "" when there are none."""
    return "".join(dict.fromkeys(c for c in name if not _SERVABLE.fullmatch(c)))


def warn_unservable_folder_name() -> None:
    bad = unservable_characters(PACK_DIR.name)
    if bad:
        logging.warning(
            "[HeadSeg] the pack's folder name %r has characters ComfyUI cannot serve web files under (%s): "
            "the nodes load, but the pixel picker, the node docs and the example workflows do not reach the "
            "browser. Rename the folder, e.g. to HeadSeg, and restart ComfyUI.",
            PACK_DIR.name, " ".join(repr(c) for c in bad),
        )  # fmt: skip


def comfyui_version() -> str:
    return str(getattr(sys.modules.get("comfyui_version"), "__version__", "unknown version"))


def load_failure_message(error: BaseException) -> str:
    return (
        f"[HeadSeg] the pack in {PACK_DIR} ({pack_version(PACK_DIR)}) failed to load, so its nodes are missing "
        f"(ComfyUI runs on without them): {type(error).__name__}: {error}. HeadSeg needs ComfyUI "
        f"{COMFYUI_NEEDED} or newer (this is {comfyui_version()}) and all of its own files: update ComfyUI, or "
        "install the pack again (git clone, or the whole zip)."
    )
