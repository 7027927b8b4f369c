"""Finding Load Recording's files: the recording files its `file` list offers (the input folder's, then the
output folder's marked " [output]"; walked again at most every _LISTING_SECONDS, or when Save Recording wrote
one), and its `file` and `path` inputs resolved to the path of a file inside ComfyUI's input, output or temp
folder; like ComfyUI's LoadImage, nothing outside those folders is read or looked at."""

from __future__ import annotations

import logging
import os
import time

from .core.recording_file import is_recording_file, is_utf8_path, printable_path
from .portable_names import portable_path, starts_with_drive

log = logging.getLogger("HeadSeg")

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
