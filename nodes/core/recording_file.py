"""The recording file: a Recording saved as and loaded from a headseg-recording/1 safetensors file, and the
header checks a file list uses (is_recording_file).

File format (safetensors): one tensor per layer keyed "<block>.<number>.<depth>" (for example
"input.1.0", "middle.0.0", "output.11.0"), shape [B, heads, h, w, d], float16 (float32 for a layer with finite
values float16 makes inf; a load also takes bfloat16, float32 and float64); metadata strings
"format" = "headseg-recording/1", "image_height", "image_width" (pixels), "model", "steps", "branch",
and any others a writer adds (Save Recording: ComfyUI's "prompt" and "workflow"), which a loaded recording
keeps in ``metadata`` so that a copy saved again still says how its heads were made.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pathlib
import stat

import torch

from .numerics import FP16_OVERFLOW, FP16_TINY, FP32_MAX
from .recording import MAX_IMAGE_SIDE, LayerKey, Recording
from .safetensors_reader import header_metadata, read_header, read_tensors, shown_shape, tensor_entries
from .values import ascii_int, is_ascii_digits, is_int, shown_text

FORMAT = "headseg-recording/1"
METADATA_KEYS = ("format", "image_height", "image_width", "model", "steps", "branch")
# Longest value of a file's model and branch fields (the recorder writes labels such as 'SD2', 'cond'), and of
# its steps field ('last', '10-19', or the steps a run recorded, '0,2,4,...' where a cache node skipped every
# other step: up to ~25 000 characters for ComfyUI's 10 000 steps): a recording carries them into Head PCA's
# summary and its text form, which ComfyUI puts in every error report of a node it is an input of.
MAX_LABEL_CHARS = 256
MAX_STEPS_LABEL_CHARS = 65536
# Longest safetensors header is_recording_file reads (a recording's is a few kB; a model's up to ~1 MB).
_MAX_HEADER_BYTES = 16 << 20
# Longest header save_recording writes with extra metadata: ComfyUI's web UI reads the first 4 MiB of a
# .safetensors file dropped on it (8 bytes of length, then the header) to open the workflow it carries.
_SAVED_HEADER_BYTES = (4 << 20) - 8


def save_recording(
    rec: Recording, path, name: str = "save_recording", extra_metadata: dict[str, str] | None = None
) -> list[str]:
    """Writes ``rec`` as a headseg-recording/1 safetensors file (float16 tensors, string metadata; float32 for a
    layer with finite values float16 makes inf, 65520 or more, such as a float32 UNet's the recorder kept).

    ``extra_metadata``: more string metadata to keep in the file (a node passes ComfyUI's prompt and
    workflow, as Save Latent does); the format's own fields take precedence over a key of the same name.
    None: the recording's own ``metadata`` (a loaded file's prompt and workflow; none for a recorded one).
    Entries that would make the file's header longer than the web UI reads of a file dropped on it
    (_SAVED_HEADER_BYTES, 4 MiB, within the 16 MiB load_recording reads; the strings are JSON-escaped in
    it) are left out, largest first; returns their keys (usually none).
    ``name`` starts the errors about the recording's values (a node passes its input's name). Layers
    holding NaN or inf (a float16 overflow while sampling) are written as they are: the other layers stay
    usable, and Head PCA names such a layer when it is selected (see ``nonfinite_layers``)."""
    from safetensors.torch import save_file

    if not isinstance(rec, Recording):
        raise TypeError(f"save_recording: rec must be a Recording, got {type(rec).__name__}")
    rec.validate(check_finite=False)
    folder = pathlib.Path(path).parent
    if not folder.is_dir():
        raise ValueError(f"save_recording: path {str(path)!r}: the folder {str(folder)!r} does not exist")
    tensors = {}
    for key, t in rec.layers.items():
        B, heads, h, w, d = t.shape
        kept = torch.float16
        if t.dtype != torch.float16:  # a float16 layer (what the recorder keeps) is written as it is
            size = t.detach().abs().nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # |finite values|; NaN / inf stay
            peaks = size.reshape(B, heads, h * w * d).amax(2).amax(0)  # [heads] largest finite |value| per head
            del size
            top = peaks.max()  # the layer's largest finite |value|
            if float(top) > FP32_MAX:
                raise ValueError(f"{name}: layer {key!s} has values beyond the float32 range")
            # read as float32 holds them: torch casts float64 to float16 through float32, so 65519.999 is inf
            if float(top.to(torch.float32)) >= FP16_OVERFLOW:  # float16 would make them inf: float32 keeps them
                kept = torch.float32
            else:  # float16 would lose the digits of a head below its normal numbers
                small = ((peaks > 0) & (peaks < FP16_TINY)).nonzero().flatten().tolist()
                if small:
                    raise ValueError(
                        f"{name}: layer {key!s}, head {small[0]}: values at most {float(peaks[small[0]]):.3g}, below "
                        f"float16's smallest normal number {FP16_TINY:.3g}: the file would keep few or none of their digits"
                    )
        tensors[key.name] = t.detach().to("cpu", kept).contiguous()
    extra = dict((rec.metadata if extra_metadata is None else extra_metadata) or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise TypeError("save_recording: extra_metadata must map strings to strings")
    H, W = rec.image_size
    own = {
        "format": FORMAT,
        "image_height": str(H),
        "image_width": str(W),
        "model": str(rec.model),
        "steps": str(rec.steps),
        "branch": str(rec.branch),
    }
    left_out = []
    # the header: the metadata as JSON, and per tensor its name, dtype, shape and offsets (well under 256 bytes)
    while extra and _json_bytes({**extra, **own}) + 256 * (len(tensors) + 1) > _SAVED_HEADER_BYTES:
        largest = max(extra, key=lambda key: _json_bytes({key: extra[key]}))
        left_out.append(largest)
        del extra[largest]
    save_file(tensors, os.fspath(path), metadata={**extra, **own})
    return left_out


def _json_bytes(metadata: dict[str, str]) -> int:
    """UTF-8 bytes of ``metadata`` written as a JSON object, strings escaped, as in a safetensors header."""
    import json

    return len(json.dumps(metadata, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass"))


def _read_header(fh) -> tuple[int, dict] | None:
    """An open binary file -> (header length n, the header's JSON object), or None when the file does not
    start like a safetensors file (8 bytes of little-endian length, then that many bytes of JSON). A key given
    twice is taken as JSON takes it (the last): a file list asks the format only, and load_recording names it."""
    try:
        return read_header(fh, _MAX_HEADER_BYTES, refuse_repeats=False)
    except ValueError:
        return None


def file_version(path, st: os.stat_result) -> tuple:
    """(path, inode, size, mtime, ctime) of ``path`` from its stat: changes whenever the file is rewritten
    or replaced, also by a file of the same size and time (another inode or change time)."""
    return (os.fspath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def printable_path(path) -> str:
    """``path`` as text that can be printed and logged, also when its name is not valid UTF-8."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_utf8_path(path) -> bool:
    """Whether ``path`` is valid UTF-8: the text a workflow keeps a file name in (safetensors' writer takes no
    other name either)."""
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# is_recording_file's answers by file_version, for callers that keep none of their own (a file list keeps the
# answers of the files it found: see its ``answers``).
_RECORDING_FILE_CACHE: dict[tuple, bool] = {}
_RECORDING_FILE_CACHE_SIZE = 4096


def is_recording_file(path, answers: dict | None = None, earlier: dict | None = None) -> bool:
    """Whether ``path`` is a regular safetensors file whose metadata says headseg-recording/1. Reads only
    the header (8 bytes of length, then its JSON), once per version of the file, so model files in the
    same folder cost little; pipes and devices are never opened. The answer is kept in ``answers``
    ({file_version: bool}; None: a module cache of up to 4096 answers, emptied when full) and looked up
    there and in ``earlier`` (a file list passes the answers of its last walk, and keeps those of the files
    it finds: the module cache alone, emptied at every walk of more files than it holds, had every header
    read again)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # missing, unreadable folder, or a name with NUL
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    version = file_version(path, st)
    cache = _RECORDING_FILE_CACHE if answers is None else answers
    answer = cache.get(version)
    if answer is None and earlier is not None:
        answer = earlier.get(version)
    if answer is None:
        try:
            with open(path, "rb") as fh:
                found = _read_header(fh)
        except OSError:  # perhaps passing (a lock, too many open files): asked again next time
            return False
        meta = found[1].get("__metadata__") if found else None
        answer = isinstance(meta, dict) and meta.get("format") == FORMAT
        if answers is None and len(cache) >= _RECORDING_FILE_CACHE_SIZE:
            cache.clear()
    cache[version] = answer
    return answer


def _check_regular_file(path: str, shown: str) -> None:
    """FileNotFoundError when ``path`` does not exist; ValueError naming it (as ``shown``) when it is a folder, not
    a regular file (a pipe, which an open for reading would wait on forever, or a device), or cannot be looked
    at."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"load_recording: no such file: {shown}") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        raise ValueError(f"{shown}: cannot read the file ({getattr(exc, 'strerror', None) or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{shown}: is a folder, expected a recording file (.safetensors)")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{shown}: not a regular file (a pipe or a device), expected a recording file (.safetensors)")


def _checked_header(fh, path: str, shown: str) -> tuple[int, dict]:
    """(header length n, the header's JSON object) of the open recording file ``fh``, read and parsed once;
    ValueError naming it (as ``shown``) when it is not laid out as safetensors, its header gives a key twice (a
    tensor's name...), it is shorter than its header says, or it is named so that a workflow cannot name it (not
    UTF-8). OSError when the system cannot read it."""
    try:
        n, header = read_header(fh, _MAX_HEADER_BYTES)
    except ValueError as exc:
        raise ValueError(f"{shown}: not a safetensors file ({exc})") from None
    ends = [v["data_offsets"][1] for v in header.values() if isinstance(v, dict) and _is_offsets(v.get("data_offsets"))]
    described = 8 + n + max(ends, default=0)
    file_bytes = os.fstat(fh.fileno()).st_size
    if described > file_bytes:
        # an end of up to 4300 digits is JSON Python reads, and more than Python writes as text
        claim = str(described) if described <= 2**64 else "more than 2**64"
        raise ValueError(f"{shown}: damaged or truncated: its header describes {claim} bytes, the file has {file_bytes}")
    if not is_utf8_path(path):
        raise ValueError(f"{shown}: the file name is not valid UTF-8, which a workflow cannot name: rename the file")
    return n, header


def _is_offsets(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and is_int(value[0]) and is_int(value[1]) and min(value) >= 0


def _read_layers(fh, path: str, n: int, header: dict) -> tuple[dict, dict[str, str], list[int]]:
    """(layers {LayerKey: tensor}, metadata, [image height, image width]) of the open recording file ``fh``
    (named ``path`` in the errors) whose header of ``n`` bytes _checked_header read as ``header``: its tensors
    and metadata checked, then each layer read (``header`` is emptied once its entries are taken); ValueError
    naming the file and what is wrong."""
    try:
        metadata = header_metadata(header)
        entries = tensor_entries(header, os.fstat(fh.fileno()).st_size - 8 - n)
    except ValueError as exc:
        raise ValueError(f"{path}: not a safetensors file ({exc})") from None
    header.clear()  # its JSON objects freed before the layers are made (~100 MB for ~170 000 tensors)
    missing = [k for k in METADATA_KEYS if k not in metadata]
    if "format" in missing:
        raise ValueError(f"{path}: metadata field 'format' is missing (expected {FORMAT!r})")
    if metadata["format"] != FORMAT:
        raise ValueError(f"{path}: metadata field 'format' is {metadata['format']!r}, expected {FORMAT!r}")
    if missing:
        raise ValueError(f"{path}: metadata field(s) {missing} missing (a {FORMAT} file has {list(METADATA_KEYS)})")
    size = []
    for field_name in ("image_height", "image_width"):
        text = metadata[field_name]
        digits = text.strip()
        # ascii_int: int() refuses more than 4300 digits, leading zeros too, in Python's words
        if not (is_ascii_digits(digits) and 1 <= ascii_int(digits) <= MAX_IMAGE_SIDE):
            raise ValueError(
                f"{path}: metadata field {field_name!r} must be an integer from 1 to {MAX_IMAGE_SIDE} (pixels), "
                f"got {shown_text(text)}"
            )
        size.append(ascii_int(digits))
    for field_name, example, longest in (
        ("model", "SD2", MAX_LABEL_CHARS), ("steps", "last", MAX_STEPS_LABEL_CHARS), ("branch", "cond", MAX_LABEL_CHARS)
    ):
        text = metadata[field_name]
        if len(text) > longest:
            raise ValueError(
                f"{path}: metadata field {field_name!r} must be a label such as {example!r} of at most "
                f"{longest} characters, got {shown_text(text)}"
            )
    keys, names = {}, {}
    for entry in sorted(entries, key=lambda e: e.name):  # checked before any layer is read
        name = entry.name
        try:
            key = LayerKey.parse(name)
        except ValueError as exc:
            raise ValueError(f"{path}: tensor {shown_text(name)}: {exc}") from None
        if key in names:
            raise ValueError(f"{path}: tensors {shown_text(names[key])} and {shown_text(name)} are the same layer {key}")
        names[key] = name
        if len(entry.shape) != 5:
            raise ValueError(f"{path}: layer {name!r} must be 5-D [B, heads, h, w, d], got shape {shown_shape(entry.shape)}")
        keys[name] = key
    layers = {}
    try:
        for entry, tensor in read_tensors(fh, 8 + n, entries):  # in the order of their bytes
            layers[keys[entry.name]] = tensor
    except EOFError as exc:
        raise ValueError(f"{path}: damaged or truncated: {exc}") from None
    return layers, metadata, size


@contextlib.contextmanager
def _cyclic_gc_paused():
    """Python's cycle collector paused while a load makes its objects (none of them in a cycle), then resumed
    unless it was off already: a header of ~170 000 tensors makes some 2 million (its JSON, the entries, the
    layers), and the collections their making set off walked all of them again and again (~40 % of the load)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def load_recording(path) -> Recording:
    """Reads a headseg-recording/1 safetensors file; ValueError naming the file and field on bad content.
    Each layer's bytes are read into a tensor of its own (safetensors_reader), so the peak memory is about the
    heads once, and nothing of the file stays open or mapped once it returns or fails: on Windows a file held
    open or mapped (by a recording in ComfyUI's cache, or by a failed load's error, which ComfyUI's executor
    holds) cannot be replaced or deleted; on every system a mapped file written over in place would change the
    recording, and one cut shorter would end the process (SIGBUS)."""
    path = os.fspath(path)
    shown = printable_path(path)
    _check_regular_file(path, shown)
    try:
        fh = open(path, "rb")
    except FileNotFoundError:  # removed since it was looked at
        raise FileNotFoundError(f"load_recording: no such file: {shown}") from None
    except OSError as exc:
        raise ValueError(f"{shown}: cannot read the file ({exc.strerror or exc})") from None
    with fh, _cyclic_gc_paused():  # the header is read once, and the layers from the same open file: one version
        try:
            n, header = _checked_header(fh, path, shown)
        except OSError as exc:
            raise ValueError(f"{shown}: cannot read the file ({exc.strerror or exc})") from None
        try:
            layers, metadata, size = _read_layers(fh, path, n, header)
        except OSError as exc:  # the system refused to read it (a disk error, no memory): not its content
            raise ValueError(f"{path}: could not be read ({exc.strerror or exc})") from None
    if not layers:
        raise ValueError(f"{path}: the file holds no layer tensor")
    try:
        extra = {key: text for key, text in metadata.items() if key not in METADATA_KEYS}  # e.g. prompt, workflow
        rec = Recording(layers, (size[0], size[1]), metadata["model"], metadata["steps"], metadata["branch"], extra)
        rec.validate(check_finite=False)  # a layer with NaN / inf is named by Head PCA when it is selected
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return rec
