"""Save and load recordings as headseg-recording/1 safetensors files (format: nodes/core/recording_file.py).

Saved files go to ComfyUI's output folder; Load lists the .safetensors files of the input folder
(and, marked " [output]", those of the output folder), or takes a path inside the input, output or
temp folder; like ComfyUI's LoadImage it reads nothing outside those folders. A loaded recording
runs the rest of the pipeline with no model loaded.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import os
import threading
import time

from comfy_api.latest import io

from . import types as hs
from .core.recording import nonfinite_layers
from .core.recording_file import (
    file_version,
    is_recording_file,
    is_utf8_path,
    load_recording,
    printable_path,
    save_recording,
)
from .memory_checks import check_memory
from .node_utils import as_recording, list_index
from .output_files import (
    PREFIX_RULES_TOOLTIP, comfy_metadata, output_error, output_place, prefix_error, writable_entries,
)
from .portable_names import portable_path, starts_with_drive

log = logging.getLogger("HeadSeg")

CATEGORY = "HeadSeg/recording"
NO_FILE = "(no recording files found)"
OUTPUT_MARK = " [output]"  # ComfyUI's annotation for a file of the output folder
_warned_names: set[str] = set()


def _loadable_name(path: str) -> bool:
    """Whether ``path`` can be listed: its name must be valid UTF-8, the text a workflow keeps a file name in
    (warns once per name otherwise)."""
    if is_utf8_path(path):
        return True
    shown = printable_path(path)
    if shown not in _warned_names:
        _warned_names.add(shown)
        log.warning("HeadSeg: %s is not listed: its name is not valid UTF-8, which a workflow cannot name: rename the file", shown)
    return False


def _is_within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies under it, compared as written (no file is touched; case
    folded where the file system folds it, as on Windows)."""
    path, folder = os.path.normcase(path), os.path.normcase(folder)
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # one relative and one absolute, or (Windows) two drives
        return False


def _path_inside(full: str, folders: list[str]) -> str | None:
    """``full`` made absolute with its '..' worked out as written, when that lies inside one of
    ``folders``; else None. The path that is then opened is that one, so a '..' can never climb out;
    links inside a folder are followed, as ComfyUI's Load Image follows them (only whoever runs the
    server can place them). Only the folders are resolved, not ``full``, so the answer says nothing
    about what exists outside."""
    try:
        written = os.path.abspath(full)
    except ValueError:  # a name the platform cannot take (Windows refuses some; NUL is refused before)
        return None
    bases = [os.path.abspath(f) for f in folders] + [os.path.realpath(f) for f in folders]  # a folder may be a link
    return written if any(_is_within(written, base) for base in bases) else None


# ComfyUI asks for the node's inputs several times while it checks one prompt, and every time the
# web page loads: a listing is used again for this many seconds (a linked shared drive can take
# seconds to walk). Save Recording forgets it, so its own files show up at once.
_LISTING_SECONDS = 2.0
# "entry": ((input folder, output folder), time.monotonic(), [...], generation), replaced whole, never
# changed in place: the file list is read on the server's thread (prompt checks, /object_info) while
# Save Recording may forget it on the execution thread, so it is read and written in one step each.
_listing: dict = {}
_generation = [0]  # bumped by forget_listing: a walk that started before it is not kept


def forget_listing() -> None:
    """The next _recording_files() walks the folders again."""
    _generation[0] += 1
    _listing.pop("entry", None)


def _recording_files() -> list[str]:
    """Recording files (.safetensors with headseg-recording/1 metadata) under the input folder, then
    those under the output folder (annotated); model files and other safetensors are left out. Linked
    files and folders are listed like the others, wherever they lead (as Load Image lists them). The
    same list for _LISTING_SECONDS after a walk."""
    import folder_paths

    key = (folder_paths.get_input_directory(), folder_paths.get_output_directory())
    entry = _listing.get("entry")  # one read: another thread may forget the listing at any time
    # a listing whose walk started before the last forget_listing is stale, even if it was stored
    # after it (the forget can fall between the check below and the store)
    if (entry is not None and entry[0] == key and entry[3] == _generation[0]
            and time.monotonic() - entry[1] < _LISTING_SECONDS):
        return list(entry[2])
    generation = _generation[0]
    found = _walk_recording_files(*key)
    if _generation[0] == generation:  # else a file was saved during the walk, which may have missed it
        _listing["entry"] = (key, time.monotonic(), found, generation)
    return list(found)


# is_recording_file's answers ({file_version: bool}) for the .safetensors files the last walk found, replaced
# whole by each walk (read and written in one step each: walks run on the server's thread and on the execution
# thread): every header is read once however many files the folders hold, and no file that is gone is kept.
_header_answers: dict = {}


def _walk_recording_files(input_dir: str, output_dir: str) -> list[str]:
    global _header_answers
    found, earlier, answers = [], _header_answers, {}
    for base, suffix in ((input_dir, ""), (output_dir, OUTPUT_MARK)):
        if not os.path.isdir(base):
            continue
        real_base = os.path.realpath(base)
        names, seen = [], {real_base}
        for root, dirs, files in os.walk(base, followlinks=True):
            # linked folders are followed, each real folder once (a link back up would loop forever),
            # under its own name rather than a link's where both are in one folder
            keep = []
            for d in sorted(dirs, key=lambda d: (os.path.islink(os.path.join(root, d)), d)):
                real = os.path.realpath(os.path.join(root, d))
                if real not in seen:
                    seen.add(real)
                    keep.append(d)
            dirs[:] = keep
            for f in files:
                full = os.path.join(root, f)
                if f.lower().endswith(".safetensors") and _loadable_name(full) and is_recording_file(full, answers, earlier):
                    names.append(os.path.relpath(full, base).replace(os.sep, "/"))
        found += [n + suffix for n in sorted(names)]
    _header_answers = answers
    return found


def _text(value, name: str, what: str) -> str:
    """``value`` when it is a string; a TypeError naming the input otherwise (an API prompt may send 123)."""
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected {what} (text), got {type(value).__name__}")
    if "\x00" in value:  # no file name holds one; os functions would fail with 'embedded null byte'
        raise ValueError(f"{name}: expected {what} without NUL characters, got {value!r}")
    return value


def _file_path(file) -> str | None:
    """The ``file`` choice -> the path of the file it names, or None when no file is chosen.

    A name is relative to the input folder, or to the output folder when it ends in ' [output]';
    a name leading outside that folder ('..', an absolute path) is refused, untouched."""
    import folder_paths

    if file is None or file in ("", NO_FILE):
        return None
    name, folder = folder_paths.annotated_filepath(_text(file, "file", "a file name"))
    folder = folder or folder_paths.get_input_directory()
    allowed = [folder_paths.get_input_directory(), folder_paths.get_output_directory()]
    inside = _path_inside(os.path.join(folder, name), [folder]) if folder in allowed else None
    if inside is None:
        raise ValueError(
            f"file: expected a file inside ComfyUI's input folder, or the output folder when marked "
            f"'{OUTPUT_MARK}', got {file!r}"
        )
    return inside


def _inside_folders(written: str) -> str | None:
    """A typed path ('~' the home folder; relative: to the input folder, or to the folder a ' [output]' or
    ' [temp]' suffix names) -> its absolute path when that lies inside ComfyUI's input, output or temp folder,
    else None (nothing outside is looked at)."""
    import folder_paths

    try:
        full = os.path.expanduser(written)
        if not os.path.isabs(full):
            full = folder_paths.get_annotated_filepath(full)
    except ValueError:  # a '~user' the user database cannot encode (NUL is refused before)
        return None
    folders = [folder_paths.get_directory_by_type(kind) for kind in ("input", "output", "temp")]
    return _path_inside(full, folders)


def _override_paths(path) -> list[str] | None:
    """The ``path`` override -> the paths of the files it may name, in the order they are read; None when blank.

    First the path as Windows reads it (portable_path): a backslash separates folders on every system, a folder's
    trailing dots and spaces are dropped, and a Windows drive ('C:\\x') is outside on the others. Then, where a
    file of that very name exists (on Linux a name may hold a backslash, or start like a drive: 'c:x', and a
    folder may end in dots or spaces, as earlier versions made them), the path as typed. Each must lie inside the
    input, output or temp folder: ValueError naming the input when neither does; a path outside is refused
    without being touched."""
    path = _text("" if path is None else path, "path", "a file path").strip()
    if not path:
        return None
    written = portable_path(path)
    windows = None if os.sep == "/" and starts_with_drive(written) else _inside_folders(written)
    readings = [] if windows is None else [windows]
    typed = _inside_folders(path) if written != path or windows is None else None
    if typed is not None and typed != windows and os.path.isfile(typed):
        readings.append(typed)
    if not readings:
        raise ValueError(f"path: expected a file inside ComfyUI's input, output or temp folder, got {path!r}")
    return readings


def _elsewhere(path: str, kinds=("output", "temp"), verb: str = "write") -> str:
    """For a relative ``path`` missing from the input folder: a hint naming the first folder of ``kinds``
    ('output', 'temp') where a file of that relative name is, and the name to ``verb`` ('write' for 'path',
    'choose' for the 'file' list, which holds no temp-folder file), else ""."""
    import folder_paths

    path = portable_path(path)
    if os.path.isabs(os.path.expanduser(path)) or path.endswith("]"):  # absolute, or a folder named
        return ""
    for kind in kinds:
        folder = folder_paths.get_directory_by_type(kind)
        full = _path_inside(os.path.join(folder, path), [folder])
        if full is not None and os.path.isfile(full):
            return f"; the {kind} folder has one: {verb} {path + ' [' + kind + ']'!r}"
    return ""


def _resolve(file, path) -> tuple[str, str]:
    """(the path of the recording to load, the input that named it): ``path`` when set, else ``file``;
    ValueError or TypeError naming the input when it is missing, not text, or outside ComfyUI's folders."""
    readings = _override_paths(path)
    if readings is not None:
        found = [full for full in readings if os.path.exists(full)]  # a folder or an unreadable file is named by load_recording
        if not found:
            raise ValueError(
                f"path: no such recording file: {path.strip()!r} (relative to the input folder, or absolute "
                f"inside the input, output or temp folder){_elsewhere(path.strip())}"
            )
        if len(found) > 1 and not _same_file(*found):  # (Windows itself may read both texts as one file)
            _warn_two_readings(path.strip(), found)
        return found[0], "path"
    full = _file_path(file)
    if full is None:
        raise ValueError(
            "file: no recording chosen: save one with Save Recording (output folder) or put a .safetensors "
            "recording in ComfyUI's input folder, or set 'path'"
        )
    if not os.path.exists(full):  # e.g. a shared workflow whose recording file did not come with it
        where = "output" if str(file).endswith(OUTPUT_MARK) else "input"
        raise ValueError(
            f"file: no such recording file: {file!r} in ComfyUI's {where} folder: put the recording file there "
            f"(Save Recording writes them to the output folder) and refresh the page, or choose another "
            f"file{_elsewhere(str(file), ('output',), 'choose') if where == 'input' else ''}"
        )
    return full, "file"


_warned_readings: set[tuple] = set()


def _same_file(one: str, other: str) -> bool:
    try:
        return os.path.samefile(one, other)
    except (OSError, ValueError):
        return False


def _warn_two_readings(path: str, found: list[str]) -> None:
    """Logs once per path and files that ``path`` names two files: ``found[0]`` (as Windows reads it), which is
    read, and ``found[1]`` (its name as typed), which is not."""
    if (path, *found) not in _warned_readings:
        _warned_readings.add((path, *found))
        log.warning(
            "HeadSeg Load Recording: path %r reads %s (read as on Windows: a backslash separates folders, a folder's "
            "trailing dots and spaces are dropped), not the file named as typed, %s: choose that one in the 'file' list, or rename it", path, *map(printable_path, found),
        )


def _take_name(folder: str, name: str, counter: int, filename_prefix) -> tuple[str, str]:
    """(file name, path) of the first '<name>_<counter>_.safetensors' from ``counter`` on that no file holds,
    made as an empty file in one step (exclusive create): another ComfyUI saving into the same output folder
    at the same moment finds it taken and moves on, instead of either writing over the other's file."""
    while True:
        filename = f"{name}_{counter:05}_.safetensors"
        full = os.path.join(folder, filename)
        try:
            with open(full, "xb"):
                return filename, full
        except FileExistsError:
            counter += 1
        except OSError as exc:
            raise output_error(exc, filename_prefix, full, "headseg/recording") from exc


def _remove_taken(full: str) -> None:
    """Removes the file _take_name made for a save that failed (with a log line when it cannot)."""
    try:
        os.remove(full)
    except FileNotFoundError:
        pass
    except OSError:
        log.warning("HeadSeg Save Recording: could not remove %s after the failed write", full)


class SaveRecording(io.ComfyNode):
    """Writes a recording to ComfyUI's output folder.

    UI payload: ``text`` [relative path], ``headseg_recording`` [{filename, subfolder, type,
    heads, layers}].
    """

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HeadSeg_SaveRecording",
            display_name="HeadSeg Save Recording",
            category=CATEGORY,
            description=(
                "Saves the recorded heads as a safetensors file (one float16 tensor [B, heads, h, w, d] "
                "per layer, float32 where float16 would make its values inf, keyed like 'input.1.0', with format/size/model metadata and ComfyUI's prompt and workflow; "
                "a recording from Load Recording keeps its file's) in the output folder, so masks can be recomputed later with Load Recording and no model."
            ),
            is_output_node=True,
            inputs=[
                hs.Recording.Input("recording", tooltip="Recorded heads to save (from Record Self-Attention)."),
                io.String.Input(
                    "filename_prefix",
                    default="headseg/recording",
                    tooltip=(
                        "File name prefix inside the output folder; a counter and '.safetensors' are "
                        "appended. May contain subfolders ('headseg/cat'); as in Save Image, %date:yyyy-MM-dd%, "
                        "%Node name.widget%, %width% and %height% (the sampled image's) are filled in. " + PREFIX_RULES_TOOLTIP
                    ),
                ),
                io.Latent.Input(
                    "latent",
                    optional=True,
                    tooltip=(
                        "The sampler's LATENT: required with a recording from Record Self-Attention, so the "
                        "file is written after sampling, for every new image, from the sampling run that "
                        "produced this LATENT. Connect it straight from the sampler."
                    ),
                ),
            ],
            outputs=[
                io.String.Output(
                    display_name="path", tooltip="Absolute path of the written .safetensors file."
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, filename_prefix="headseg/recording") -> bool | str:
        # a prefix outside the output folder is refused when queued, not after sampling
        return prefix_error(filename_prefix, "headseg/recording") or True

    @classmethod
    def execute(cls, recording, filename_prefix="headseg/recording", latent=None) -> io.NodeOutput:
        rec = as_recording(recording, latent)
        folder, name, counter, subfolder = output_place(filename_prefix, "headseg/recording", rec.image_size[1], rec.image_size[0])
        filename, full = _take_name(folder, name, counter, filename_prefix)
        try:
            try:
                left_out = save_recording(rec, full, name="recording", extra_metadata=_file_metadata(rec, cls.hidden))
            except BaseException:
                _remove_taken(full)  # no empty file left under the name taken
                raise
        except (ValueError, TypeError):  # named by save_recording (e.g. recording: a head below float16's normal numbers)
            raise
        except Exception as exc:  # OSError, or safetensors' own error wrapping one
            raise output_error(exc, filename_prefix, full, "headseg/recording") from exc
        if left_out:
            log.warning(
                "HeadSeg Save Recording: %s left out of %s's metadata: with it the file's header would be longer "
                "than the web UI reads of a file dropped on it to open its workflow (4 MiB)", " and ".join(left_out), full,
            )
        forget_listing()  # the new file is listed at the next page load
        rel = os.path.join(subfolder, filename).replace(os.sep, "/")
        info = {
            "filename": filename,
            "subfolder": subfolder,
            "type": "output",
            "heads": rec.num_heads,
            "layers": len(rec.layers),
        }
        return io.NodeOutput(full, ui={"text": [rel, *_nonfinite_note(rec, "Save Recording")], "headseg_recording": [info]})


def _file_metadata(rec, hidden) -> dict[str, str]:
    """The string metadata Save Recording writes besides the format's own: ComfyUI's prompt and workflow as
    JSON, as Save Latent keeps them (none with --disable-metadata), and "list_index", the item of a list of
    latents the heads were sampled for (ComfyUI runs the node once per item; "0" outside a list); for a
    recording read from a file, that file's own (the prompt, seed and model that made the heads, not the
    prompt that copied them)."""
    from comfy.cli_args import args

    if rec.metadata is None:  # recorded while sampling: this prompt made it
        return {**_utf8_entries(comfy_metadata(hidden)), "list_index": str(list_index())}
    if args.disable_metadata:
        return {key: text for key, text in rec.metadata.items() if key == "list_index"}
    return dict(rec.metadata)


def _utf8_entries(texts: dict[str, str]) -> dict[str, str]:
    """{key: JSON text} -> the entries whose key UTF-8 can write (the values are JSON, non-ASCII escaped)."""
    return writable_entries(texts, "utf-8", "Save Recording: metadata entry", "its key is no text UTF-8 can hold")


def _nonfinite_note(rec, node: str) -> list[str]:
    """A line (also logged) naming the layers of ``rec`` that hold NaN or inf, or none: the file keeps them,
    and Head PCA refuses them by name when its positions / levels select them."""
    bad = nonfinite_layers(rec)
    if not bad:
        return []
    names = ", ".join(str(key) for key in bad)
    line = (
        f"NaN or inf in layer{'s' if len(bad) > 1 else ''} {names} (a float16 overflow while sampling): "
        "leave them out with Head PCA's positions / levels"
    )
    log.warning("HeadSeg %s: %s", node, line)
    return [line]


class LoadRecording(io.ComfyNode):
    """Reads a recording file; the rest of the pipeline then runs with no model loaded."""

    @classmethod
    def define_schema(cls):
        files = _recording_files() or [NO_FILE]
        return io.Schema(
            node_id="HeadSeg_LoadRecording",
            display_name="HeadSeg Load Recording",
            category=CATEGORY,
            description=(
                "Loads a headseg-recording/1 safetensors file written by Save Recording. Lists the "
                ".safetensors files of the input folder and (marked [output]) of the output folder; "
                "'path' overrides the list. Connect it to Head PCA: no model is needed."
            ),
            inputs=[
                io.Combo.Input(
                    "file",
                    options=files,
                    default=files[0],
                    tooltip=(
                        "Recording file from ComfyUI's input folder, or from the output folder (marked "
                        "[output]). Refresh the page to see newly saved files."
                    ),
                ),
                io.String.Input(
                    "path",
                    default="",
                    tooltip=(
                        "Optional path of a file inside ComfyUI's input, output or temp folder: relative "
                        "to the input folder (a ' [output]' or ' [temp]' suffix means that folder), absolute, "
                        "or starting with '~'; read as on Windows: '\\' separates folders and a folder's trailing dots and spaces are "
                        "dropped (a file whose own name holds '\\' or starts like a drive, 'c:x', or in a folder whose does end so, is read "
                        "as typed when the path names no other file); a path leading elsewhere is refused. Blank: 'file' is read. "
                        "When set it is used instead of 'file'."
                    ),
                ),
            ],
            outputs=[
                hs.Recording.Output(
                    display_name="recording",
                    tooltip="The recorded heads, as saved: all layers, [B, heads, h, w, d] each.",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, file=None, path="") -> bool | str:
        # file=None: an API prompt that leaves 'file' out (ComfyUI reports the missing input itself)
        # must not make this call fail with a TypeError. Values linked from other nodes are None here; every value is checked again at run time. Only
        # where a value points is checked, not whether the file exists: the web page's list may be older
        # than the folder (it is made when the page loads), and files saved since are accepted.
        try:
            # file is read only when path is blank; a linked path (None here) may override it at run time
            blank = path is not None and _override_paths(path) is None
            if file is not None and blank:
                _file_path(file)
        except (TypeError, ValueError) as exc:
            return str(exc)
        return True

    @classmethod
    def fingerprint_inputs(cls, file=None, path="") -> str:
        # ComfyUI hands this no linked value (None instead): a linked path, or a linked file with no path,
        # names a file only known when the node runs; this node's stamp stands for the files it read
        if path is None or (file is None and isinstance(path, str) and not path.strip()):
            return f"linked: {_linked_stamp()}"
        try:
            full, _ = _resolve(file, path)
        except (TypeError, ValueError):
            return ""
        version = _current_version(full)
        return "" if version is None else ":".join(map(str, version))

    @classmethod
    def execute(cls, file, path="") -> io.NodeOutput:
        full, chosen = _resolve(file, path)
        _watch(full)  # before reading: a file replaced while it is read is read again next time
        try:
            size = os.stat(full).st_size
        except OSError:
            size = 0  # load_recording names what is wrong with it
        # the heads are copied into memory (about the file's size): a file larger than this machine's free
        # memory (one saved on a larger machine) stopped in torch's allocator or had the server killed
        check_memory(
            size, chosen, f"the heads of {os.path.basename(full)}, copied into memory,",
            "Load it on a machine with more free memory, or save a smaller recording (fewer positions or levels "
            "in Record Self-Attention, or fewer images per batch)",
        )
        try:
            rec = load_recording(full)
        except (ValueError, FileNotFoundError) as exc:  # names the file and what is wrong; say which input chose it
            if isinstance(exc, FileNotFoundError):  # removed since _resolve found it
                exc = f"{printable_path(full)} was removed while the node read it"
            raise ValueError(f"{chosen}: {exc}; HeadSeg Save Recording writes the files this node reads") from None
        rec.file = path.strip() if chosen == "path" else file  # named in the label maps made from it
        H, W = rec.image_size
        text = f"{os.path.basename(full)}: {rec.num_heads} heads in {len(rec.layers)} layers, {W}x{H} px"
        return io.NodeOutput(rec, ui={"text": [text, *_nonfinite_note(rec, "Load Recording")]})


# Load Recording's fingerprint with a linked path or file (see fingerprint_inputs), which ComfyUI computes
# without the linked value, so it cannot name the file. Each Load Recording (by its node id in the prompt)
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


NODES = [SaveRecording, LoadRecording]
