"""Save and load recordings as headseg-recording/1 safetensors files (format: nodes/core/recording_file.py).

Saved files go to ComfyUI's output folder; Load lists the .safetensors files of the input folder
(and, marked " [output]", those of the output folder), or takes a path inside the input, output or
temp folder; like ComfyUI's LoadImage it reads nothing outside those folders. A loaded recording
runs the rest of the pipeline with no model loaded. Finding those files: recording_files; Load
Recording's fingerprint when its file or path is linked: recording_stamps.
"""

from __future__ import annotations

import logging
import os

from comfy_api.latest import io

from . import types as hs
from .core.recording import nonfinite_layers
from .core.recording_file import load_recording, printable_path, save_recording
from .memory_checks import check_memory
from .node_utils import as_recording, list_index
from .output_files import (
    PREFIX_RULES_TOOLTIP, comfy_metadata, output_error, output_place, prefix_error, writable_entries,
)
from .recording_files import NO_FILE, _file_path, _override_paths, _recording_files, _resolve, forget_listing
from .recording_stamps import _current_version, _linked_stamp, _watch

log = logging.getLogger("HeadSeg")

CATEGORY = "HeadSeg/recording"


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


NODES = [SaveRecording, LoadRecording]
