"""File name prefixes and typed paths that mean the same file on Windows and on Linux / macOS.

Workflows travel between systems (ComfyUI's Windows portable build is the most common install), so a
Save node's filename_prefix, and Load Recording's path, must name the same folders and file on each: a
backslash separates folders on Windows, so it does here too, and Windows drops the trailing dots and
spaces of a folder's name, so they are dropped here too; a prefix Windows cannot save under (a reserved
device name, a forbidden character, a drive, a folder named with dots and spaces only) is refused on
every system rather than written on Linux and failing, or landing elsewhere, on Windows.
"""

from __future__ import annotations

import os
import posixpath
import re

# Characters no Windows file or folder name holds (besides the separators and the control characters).
_FORBIDDEN = '<>:"|?*'
# Windows' device names: a file or folder of that name, with or without an extension, is the device.
_DEVICES = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [port + n for port in ("COM", "LPT") for n in "0123456789\u00b9\u00b2\u00b3"]
)
_DRIVE = re.compile(r"[A-Za-z]:")


def _slashed(text: str) -> str:
    """``text`` with each backslash made '/'."""
    return text.replace("\\", "/")


def _folders_and_name(text: str) -> tuple[list[str], list[str]]:
    """A '/'-separated prefix -> (its folders' parts, the rest: the file name's start and any '' or '.' parts
    after it). ComfyUI works out the prefix's path (normpath) before it splits off the file name, so a
    separator or '.' at the end names no folder: in 'name./' the file name starts with 'name.'."""
    parts = text.split("/")
    last = max([i for i, p in enumerate(parts) if p not in ("", ".")], default=len(parts) - 1)
    return parts[:last], parts[last:]


def portable_prefix(filename_prefix: str) -> str:
    """A filename_prefix as Windows reads it, on every system: each backslash made '/', a folder separator
    ('sub\\name' is the file 'name...' in the folder 'sub', also on Linux, where it was one file name), and
    the trailing dots and spaces of each folder's name dropped ('sub./x' saves into 'sub' on Windows, where
    Linux made a folder 'sub.'). The last name, the file name's start, is kept ('name./' too): a counter
    follows it."""
    folders, name = _folders_and_name(_slashed(filename_prefix))
    folders = [p if p in (".", "..") or not p.rstrip(". ") else p.rstrip(". ") for p in folders]
    return "/".join(folders + name)


def starts_with_drive(text: str) -> bool:
    """Whether ``text`` starts with a Windows drive ('C:\\x', 'c:/x', 'D:x'): a path outside any folder of
    another system, and no name a file or folder of Windows can hold."""
    return bool(_DRIVE.match(text))


def portable_path(path: str) -> str:
    """A typed path as Windows reads it, on every system: each backslash made '/' where '/' is the separator
    (Linux, macOS; a workflow from Windows names 'headseg\\rec_00001_.safetensors' where the file is
    'headseg/rec_00001_...'), and the trailing dots and spaces of each folder's name dropped, as portable_prefix
    drops them ('run. /x' is the file 'x' of the folder 'run', into which Save's prefix 'run. /x' saves). The
    last name, the file's, is kept, and so are the separators' kind and a name of dots and spaces only."""
    parts = re.split(r"([/\\])", _slashed(path) if os.sep == "/" else path)  # names, with the separators between
    for i in range(0, len(parts) - 1, 2):  # the folders' names: every name but the last
        if parts[i].rstrip(". "):
            parts[i] = parts[i].rstrip(". ")
    return "".join(parts)


def _device(part: str) -> bool:
    """Whether Windows reads the name ``part`` as a device: its text before the first dot, trailing spaces
    dropped, is a device name ('nul', 'COM1.txt', 'aux .x')."""
    return part.split(".", 1)[0].rstrip(" ").upper() in _DEVICES


def windows_name_problem(filename_prefix: str) -> str | None:
    """What makes ``filename_prefix`` (its %...% patterns unfilled, or filled) no name Windows can save under,
    as a phrase, or None. The last part is the file name's start: a counter and a suffix follow it, so it
    is a device name only with a dot in it ('con.x' makes 'con.x_00001_.png', the device CON). A '..' part
    is left to the check that the prefix stays in the output folder."""
    text = _slashed(filename_prefix)
    if starts_with_drive(text):
        return f"starts with the drive {text[:2]!r}, which leads outside ComfyUI's output folder"
    # before '..' is worked out: Windows makes '.. ' the '..' that climbs, where Linux climbs out of it
    odd = [p for p in _folders_and_name(text)[0] if p not in ("", ".", "..") and not p.rstrip(". ")]
    if odd:
        return f"has the folder {odd[0]!r}, of dots and spaces only, which Windows reads otherwise"
    parts = [p for p in posixpath.normpath(text).split("/") if p not in ("", ".", "..")]
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        bad = sorted({c for c in part if c in _FORBIDDEN or ord(c) < 32})
        if bad:
            shown = " ".join(repr(c) for c in bad)
            hint = " (fill in %date:...% before sending the prompt, as the web UI does)" if "%date:" in part else ""
            return f"holds {shown} in {part!r}, which Windows allows in no file or folder name{hint}"
        if _device(part) and (not last or "." in part):
            return f"names {part!r}, which is a device on Windows ({part.split('.', 1)[0].rstrip(' ').upper()}), not a file or folder"
    return None
