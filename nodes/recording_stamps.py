"""Load Recording's fingerprint when its file or path is linked: a stamp per node that stays while the files it
read stay the same (so ComfyUI's cache serves it) and is replaced when one of them is replaced."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
import threading

from .core.recording_file import file_version


# Load Recording's fingerprint with a linked path or file (see LoadRecording.fingerprint_inputs), which ComfyUI
# computes without the linked value, so it cannot name the file. Each Load Recording (by its node id in the prompt)
# holds a stamp, a number never handed out twice, and the versions of the files it read while holding it
# (path -> file_version when read, None: missing); the stamp is its fingerprint. It stays while those files
# do, so a linked path is read from ComfyUI's cache (a click in Mask Select re-runs no k-means), and gives
# way to a new one when one of them is replaced, so that node reads its file again; a file replaced concerns
# only the nodes that read it. A stamp given up is never handed out again, so no entry ComfyUI's cache made
# under it (--cache-lru N keeps older ones) is served for a file it has not seen: a node beyond
# _NODES_KEPT, or one that read more than _FILES_KEPT files under its stamp, simply gets a new one. A list of
# paths (one run per item) reads all its files under one stamp: _FILES_KEPT bounds the datasets whose Load
# Recording is served from the cache (a file's entry is a few hundred bytes; each queue looks at every file).
_NODES_KEPT = 64
_FILES_KEPT = 4096


@dataclasses.dataclass
class _Watch:
    stamp: int
    files: dict = dataclasses.field(default_factory=dict)  # path -> file_version when read, or None
    # more than _FILES_KEPT files read, or a file read again in another version than under this stamp
    # before (a cache entry made under it may hold the earlier one): a new stamp at the next fingerprint
    full: bool = False


_watches: collections.OrderedDict = collections.OrderedDict()  # node id (None outside a prompt) -> _Watch
_stamps = itertools.count(1)
_watch_lock = threading.Lock()


def _node_id() -> str | None:
    """The id of the node ComfyUI is running (or fingerprinting) on this thread, or None outside a prompt."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    context = get_executing_context()
    return None if context is None else getattr(context, "node_id", None)


def _current_version(full: str) -> tuple | None:
    try:
        return file_version(full, os.stat(full))
    except (OSError, ValueError):
        return None


def _watch(full: str) -> None:
    """Adds the version of ``full`` that this Load Recording is about to read to the files of its stamp
    (nothing when no linked fingerprint gave it one: its cache key then holds no stamp)."""
    version = _current_version(full)
    with _watch_lock:
        watch = _watches.get(_node_id())
        if watch is None:
            return
        if watch.files.get(full, version) != version:  # replaced since an earlier read under this stamp
            watch.full = True
        watch.files[full] = version
        if len(watch.files) > _FILES_KEPT:
            watch.full = True


def _linked_stamp() -> int:
    """This node's stamp: the one it holds while every file read under it is still the version read (each
    read in one version only, and at most _FILES_KEPT); else, and for a node without one, a new stamp with
    no file read yet."""
    node = _node_id()
    with _watch_lock:
        watch = _watches.get(node)
        files = dict(watch.files) if watch is not None else {}
    same = watch is not None and not watch.full and all(_current_version(f) == v for f, v in files.items())
    with _watch_lock:
        if not same or _watches.get(node) is not watch:
            watch = _watches[node] = _Watch(next(_stamps))
        _watches.move_to_end(node)
        while len(_watches) > _NODES_KEPT:  # the least recent node's stamp is given up with it
            _watches.popitem(last=False)
        return watch.stamp
