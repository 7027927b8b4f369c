"""The files the Save nodes write into ComfyUI's output folder: their filename_prefix checked (when the prompt is
queued) and turned into a folder, name and counter, the errors of writing them named by filename_prefix, and
ComfyUI's prompt and workflow as the metadata written into them."""

from __future__ import annotations

import errno
import json
import logging
import os

from .portable_names import portable_prefix, windows_name_problem

log = logging.getLogger("HeadSeg")


# The rules of a Save node's filename_prefix (prefix_error, output_place), for its tooltip.
PREFIX_RULES_TOOLTIP = (
    "'\\' separates folders, as on Windows. A blank prefix, one leading outside the output folder ('../x'), one "
    "holding a character no file name can (a lone surrogate, from an API client), or a name Windows cannot save "
    "under (a device name as a folder or before a dot, such as 'CON/x' or 'nul.x', a character such as ':' or '?', "
    "a folder of dots and spaces only) is refused when the prompt is queued; a folder's trailing dots and spaces "
    "are dropped, as on Windows."
)


def _blank_prefix_error(filename_prefix, example: str) -> str | None:
    """The message for a filename_prefix that is no text, blank, holds a NUL or a character no file name can (a
    lone surrogate such as '\\ud800', from an API client that cut a UTF-16 text: open() raised an unnamed
    UnicodeEncodeError after sampling); None for any other. UTF-8 is asked, not os.fsencode: that takes
    '\\udc80' to '\\udcff' as the bytes 0x80 to 0xff, a name that is no UTF-8, whose recording file Load Recording
    refuses (a workflow keeps file names as UTF-8 text) and does not list."""
    if not isinstance(filename_prefix, str) or not filename_prefix.strip() or "\x00" in filename_prefix:
        return f"filename_prefix: expected a file name prefix such as {example!r}, got {filename_prefix!r}"
    try:
        filename_prefix.encode("utf-8")
    except UnicodeError:
        return (
            f"filename_prefix: expected a file name prefix such as {example!r}, got {filename_prefix!r}, which holds "
            "a character no file name can (a lone surrogate)"
        )
    return None


def _prefix_error(filename_prefix, example: str) -> str | None:
    """_blank_prefix_error's message, or one for a prefix that names no file Windows can hold (workflows are
    shared between systems: see portable_names), or None."""
    blank = _blank_prefix_error(filename_prefix, example)
    if blank:
        return blank
    problem = windows_name_problem(filename_prefix)
    if problem:
        return (
            f"filename_prefix {filename_prefix!r}: {problem}; workflows are shared between Windows, Linux and macOS, "
            f"so expected folder and file names every system can save, such as {example!r}"
        )
    return None


def prefix_error(filename_prefix, example: str) -> str | None:
    """For validate_inputs: output_place's refusal of a filename_prefix that is blank, holds a NUL, names no
    file Windows can hold or leads outside ComfyUI's output folder (ComfyUI's own rule, as
    get_save_image_path applies it, with '\\' a separator as on Windows), found when the prompt is queued
    rather than after sampling; None for any other prefix, and for a linked one (None here, checked at run
    time). Makes no folder."""
    import folder_paths

    if filename_prefix is None:
        return None
    refused = _prefix_error(filename_prefix, example)
    if refused:
        return refused
    out = os.path.abspath(folder_paths.get_output_directory())
    written = portable_prefix(filename_prefix)
    folder = os.path.abspath(os.path.join(out, os.path.dirname(os.path.normpath(written))))
    try:
        inside = os.path.commonpath((out, folder)) == out
    except ValueError:  # another drive (Windows)
        inside = False
    if not inside:
        return (
            f"filename_prefix {filename_prefix!r}: leads outside ComfyUI's output folder; expected folder and "
            f"file names inside it, such as {example!r}"
        )
    return None


def output_place(filename_prefix, example: str, width: int = 0, height: int = 0) -> tuple[str, str, int, str]:
    """filename_prefix -> (folder, name, counter, subfolder) in ComfyUI's output folder, the folder made:
    ComfyUI's own rule (get_save_image_path: subfolders allowed, nothing outside the output folder, the
    counter one past the highest of the files named '<name>_<counter>_...', %width%, %height%, %year% ... %second%
    replaced as in Save Image's prefixes), '\\' a folder separator on every system, as on Windows. ValueError
    naming filename_prefix (with ``example``, a prefix to suggest) when it is empty, names no file Windows
    can hold (portable_names) or cannot be a name there."""
    import folder_paths

    refused = _prefix_error(filename_prefix, example)
    if refused:
        raise ValueError(refused)
    try:
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            portable_prefix(filename_prefix), folder_paths.get_output_directory(), width, height
        )
        os.makedirs(folder, exist_ok=True)
    except Exception as exc:  # ComfyUI's refusal (a prefix leaving the folder), a name too long, a file in the way
        raise output_error(exc, filename_prefix, None, example) from exc
    return folder, name, counter, subfolder


# Windows' MAX_PATH: a path of 260 characters or more (a folder's: 248, room for a file name of 8.3) fails where
# long paths are not enabled (the default), with an error that says no such file or folder.
_WINDOWS_MAX_PATH = 260


def _past_windows_path_limit(exc: BaseException, full: str | None) -> str | None:
    """On Windows, a phrase naming the length of the path that failed (``full``, else the error's own
    ``filename``: the folder being made) and the limit it is past, when it is past MAX_PATH (a folder's: 12
    less), the likely cause whatever the error says; None otherwise."""
    if os.name != "nt":
        return None
    path = full or getattr(exc, "filename", None)
    if not isinstance(path, str):
        return None
    length = len(os.path.abspath(path))
    limit = _WINDOWS_MAX_PATH if full else _WINDOWS_MAX_PATH - 12
    if length < limit:
        return None
    if full:
        return f"the path has {length} characters, past the {limit - 1} Windows takes"
    return f"the folder's path has {length} characters, past the {limit - 1} Windows takes for a folder"


def output_error(exc: BaseException, filename_prefix, full: str | None, example: str) -> ValueError:
    """A failure to make or write a file of the output folder -> ValueError naming filename_prefix, the
    file (``full``, None when no name was made yet), the reason and what to do."""
    code = getattr(exc, "errno", None)
    too_long = code == errno.ENAMETOOLONG or "too long" in str(exc).lower()
    refused = code in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, getattr(errno, "EDQUOT", -1))
    past_limit = _past_windows_path_limit(exc, full)
    if past_limit:
        hint = f"{past_limit} unless long paths are enabled: choose a shorter prefix, or enable long paths in Windows"
    elif too_long:
        hint = "choose a shorter prefix of plain folder and file names"
    elif full is None and not refused:  # ComfyUI refused the prefix, or a name in it is a file
        hint = f"expected folder and file names inside ComfyUI's output folder, such as {example!r}"
    else:
        hint = "check that ComfyUI's output folder is writable and has free space"
    where = f"cannot write {full}" if full else "cannot make the file's folder or name"
    reason = (str(exc).strip().splitlines() or [""])[0].strip(" *")  # ComfyUI's refusal spans lines
    return ValueError(f"filename_prefix {filename_prefix!r}: {where} ({type(exc).__name__}: {reason}); {hint}")


def comfy_metadata(hidden, workflow: bool = True) -> dict[str, str]:
    """A node's hidden inputs -> ComfyUI's prompt and (with ``workflow``) the extra PNG info (the workflow) as
    JSON texts, as Save Image and Save Latent write them into their files; none with --disable-metadata."""
    from comfy.cli_args import args

    if args.disable_metadata or hidden is None:
        return {}
    found = {} if hidden.prompt is None else {"prompt": hidden.prompt}
    if workflow:
        found.update(hidden.extra_pnginfo or {})
    return {key: json.dumps(value) for key, value in found.items()}


def writable_entries(texts: dict[str, str], encoding: str, node: str, why: str) -> dict[str, str]:
    """{key: JSON text} (comfy_metadata) -> the entries whose key ``encoding`` can write, the others left out with
    a log line naming ``node`` and ``why``. ComfyUI hands over every key of a prompt's extra_pnginfo, which
    whoever queues the prompt chooses: a PNG keyword holds Latin-1 only (an API client's '工作流': PIL raised
    UnicodeEncodeError), a safetensors header UTF-8 (a lone surrogate '\\ud800', from a client that cut a UTF-16
    string: safetensors raised UnicodeEncodeError), and either error named nothing."""
    kept = {}
    for key, text in texts.items():
        try:
            key.encode(encoding)
        except UnicodeError:
            log.warning("HeadSeg %s: %r left out: %s", node, key, why)
            continue
        kept[key] = text
    return kept
