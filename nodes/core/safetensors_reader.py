"""The tensors of a safetensors file read straight into memory: each tensor's bytes into a tensor of its own,
with no mapping of the file and no second copy (safetensors' own reader maps the whole file, and a copy out of
its pages held the heads twice at the peak).

Layout (https://huggingface.co/docs/safetensors): 8 bytes of little-endian header length n, n bytes of a JSON
object (optional "__metadata__": text -> text; per tensor {"dtype", "shape", "data_offsets": [begin, end]}),
then the data, the tensors' bytes little-endian, from byte 8 + n: together they fill it, with no gap or
overlap, as safetensors itself requires. A key given twice in an object of the header is refused (read_header).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys

import torch

from .values import is_int, shown_text

# safetensors' dtype names -> torch's (a caller refuses those it cannot use, in its own words); an older torch
# lacks the unsigned ones past 8 bits
DTYPES = {
    name: getattr(torch, dtype)
    for name, dtype in (
        ("BOOL", "bool"), ("U8", "uint8"), ("I8", "int8"), ("I16", "int16"), ("U16", "uint16"), ("I32", "int32"),
        ("U32", "uint32"), ("I64", "int64"), ("U64", "uint64"), ("F8_E5M2", "float8_e5m2"), ("F8_E4M3", "float8_e4m3fn"),
        ("F16", "float16"), ("BF16", "bfloat16"), ("F32", "float32"), ("F64", "float64"),
    )
    if hasattr(torch, dtype)
}

# torch counts a tensor's elements, strides and bytes in int64: an empty tensor ([0, 2**40, 2**40]) takes no byte
# of the file, so only this bounds its other sizes (_makeable)
_MAX_TENSOR_BYTES = 2**63


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of a file's header: ``begin`` and ``end`` count bytes from the start of the data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(fh, max_bytes: int, refuse_repeats: bool = True) -> tuple[int, dict]:
    """(header length n, the header's JSON object) of the open binary file ``fh``, read from its start; ValueError
    saying what is wrong when it does not start like a safetensors file (8 bytes of little-endian length from 2 to
    ``max_bytes``, then that many bytes of a JSON object), or, unless ``refuse_repeats`` is False, when an object of
    the header gives a key twice (a tensor's name, a metadata field, a tensor's dtype...): JSON readers keep one of
    them without a word (Python's the last, as safetensors' own does for a tensor's name)."""
    n = int.from_bytes(fh.read(8), "little")
    if not 2 <= n <= max_bytes:
        raise ValueError(_NOT_LAID_OUT)
    repeats = []
    hook = functools.partial(_object_noting_repeats, repeats) if refuse_repeats else None
    try:
        header = json.loads(fh.read(n), object_pairs_hook=hook)
    except (ValueError, RecursionError):  # not JSON / UTF-8, or absurdly nested
        raise ValueError(_NOT_LAID_OUT) from None
    if not isinstance(header, dict):
        raise ValueError(_NOT_LAID_OUT)
    if repeats:  # the header's own object is the last to end: a tensor named twice is named first
        raise ValueError(_repeat_text(header, *repeats[-1]))
    return n, header


_NOT_LAID_OUT = "it must start with a header length and a JSON header"


def _object_noting_repeats(repeats: list, pairs: list) -> dict:
    """A JSON object's (key, value) pairs -> the dict JSON makes of them; a key given twice is noted in
    ``repeats`` as (that dict, the key)."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                repeats.append((obj, key))
                break
            seen.add(key)
    return obj


def _repeat_text(header: dict, obj: dict, key: str) -> str:
    """What is wrong with ``header`` whose object ``obj`` gives ``key`` twice, naming the tensor."""
    shown = shown_text(key)
    if obj is header:
        return "its header gives __metadata__ twice" if key == "__metadata__" else f"its header names tensor {shown} twice"
    if obj is header.get("__metadata__"):
        return f"its __metadata__ gives {shown} twice"
    owner = next((name for name, info in header.items() if info is obj), None)
    if owner is not None:
        return f"tensor {shown_text(owner)}: its header gives {shown} twice"
    return f"its header gives {shown} twice in one object"


def shown_shape(shape: list[int] | tuple[int, ...], first: int = 6) -> str:
    """A shape as an error message shows it: whole ('[1, 3, 4]') up to ``first`` + 2 sizes, else its first
    ``first`` sizes and how many there are ('[1, 1, 1, 1, 1, 1, ...] (100000 sizes)': a header may hold a
    million)."""
    if len(shape) <= first + 2:
        return str(shape)
    opening, closing = ("(", ")") if isinstance(shape, tuple) else ("[", "]")
    return f"{opening}{', '.join(map(str, shape[:first]))}, ...{closing} ({len(shape)} sizes)"


def header_metadata(header: dict) -> dict[str, str]:
    """The header's "__metadata__" (text -> text; {} when absent); ValueError saying what is wrong otherwise."""
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("its __metadata__ must map text to text")
    return metadata


def tensor_entries(header: dict, data_bytes: int) -> list[TensorEntry]:
    """The tensors a header describes, in the order of their bytes, checked against ``data_bytes`` (the file's
    size less 8 + n): a known dtype, a shape of sizes >= 0 that torch can make (below 2**63 bytes, a size of 0
    counted as 1), offsets holding exactly shape x dtype's bytes, and
    the tensors filling the data with no gap or overlap. ValueError saying what is wrong otherwise, naming the
    tensor."""
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        shown = shown_text(name)
        if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= info.keys()):
            raise ValueError(f"tensor {shown}: expected its dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ValueError(f"tensor {shown}: unknown dtype {shown_text(str(dtype))}")
        if not (isinstance(shape, list) and all(is_int(s) and s >= 0 for s in shape)):
            raise ValueError(f"tensor {shown}: shape {shown_text(str(shape))} is no list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(v) for v in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"tensor {shown}: data_offsets {shown_text(str(offsets))} are no [begin, end] of bytes")
        if not _makeable(shape, DTYPES[dtype].itemsize):
            raise ValueError(
                f"tensor {shown}: shape {shown_text(str(shape))} is larger than any tensor can be (its sizes other "
                f"than 0 multiply to 2**63 bytes or more)"
            )
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise ValueError(
                f"tensor {shown}: {offsets[1] - offsets[0]} bytes in the file, where shape {shown_shape(shape)} of {dtype} "
                f"takes {nbytes}"
            )
        entries.append(TensorEntry(name, DTYPES[dtype], tuple(shape), offsets[0], offsets[1]))
    entries.sort(key=lambda e: (e.begin, e.end))
    done = 0
    for entry in entries:
        if entry.begin != done:
            what = "overlaps the tensor before it" if entry.begin < done else f"leaves bytes {done} to {entry.begin} unused"
            raise ValueError(f"tensor {shown_text(entry.name)} {what}")
        done = entry.end
    if done != data_bytes:
        raise ValueError(f"its tensors take {done} bytes of data, the file holds {data_bytes}")
    return entries


def _makeable(shape: list[int], itemsize: int) -> bool:
    """Whether torch can make a tensor of ``shape``: its sizes, a 0 counted as 1 (an empty tensor's other sizes
    are bound by no byte of the file, but torch's strides count them), times ``itemsize`` stay below 2**63.
    Stops at the first product past it (a header of 16 MiB may hold a million sizes of 4000 digits)."""
    product = itemsize
    for size in shape:
        product *= max(size, 1)
        if product >= _MAX_TENSOR_BYTES:
            return False
    return True


def read_tensor(fh, data_start: int, entry: TensorEntry) -> torch.Tensor:
    """Tensor ``entry`` of the open binary file ``fh`` whose data starts at byte ``data_start``, read into a new
    tensor of its own (its bytes only: nothing of the file stays mapped or open through it). OSError when the
    system cannot read the file; EOFError when the file ends before the tensor does (cut shorter since its size
    was read)."""
    tensor = torch.empty(entry.shape, dtype=entry.dtype)
    if entry.end > entry.begin:
        fh.seek(data_start + entry.begin)
        buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        filled = 0
        while filled < len(buffer):  # a read may return fewer bytes than asked (2 GiB at most on Linux)
            got = fh.readinto(buffer[filled:])
            if not got:
                raise EOFError(f"the file ends {len(buffer) - filled} bytes before tensor {shown_text(entry.name)} does")
            filled += got
        if sys.byteorder != "little" and entry.dtype.itemsize > 1:  # the file's bytes are little-endian
            tensor = _swapped_bytes(tensor)
    return tensor


def _swapped_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with the bytes of each element in reverse order (a big-endian machine reading the file)."""
    size = tensor.dtype.itemsize
    as_bytes = tensor.reshape(-1).view(torch.uint8).reshape(-1, size).flip(1).contiguous()
    return as_bytes.view(tensor.dtype).reshape(tensor.shape)
