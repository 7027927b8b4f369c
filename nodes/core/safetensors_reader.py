"""The tensors of a safetensors file read straight into memory: each tensor's bytes into a tensor of its own,
with no mapping of the file and no second copy (safetensors' own reader maps the whole file, and a copy out of
its pages held the heads twice at the peak).

Layout (https://huggingface.co/docs/safetensors): 8 bytes of little-endian header length n, n bytes of a JSON
object (optional "__metadata__": text -> text; per tensor {"dtype", "shape", "data_offsets": [begin, end]}),
then the data, the tensors' bytes little-endian, from byte 8 + n: together they fill it, with no gap or
overlap, as safetensors itself requires. A key given twice in an object of the header is refused (read_header).
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Iterator
from typing import NamedTuple

import torch

from .values import shown_text

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

# what a tensor's entry in the header gives (more is ignored, as safetensors does)
_FIELDS = frozenset(("dtype", "shape", "data_offsets"))

# torch counts a tensor's elements, strides and bytes in int64: an empty tensor ([0, 2**40, 2**40]) takes no byte
# of the file, so only this bounds its other sizes (_makeable)
_MAX_TENSOR_BYTES = 2**63


class TensorEntry(NamedTuple):
    """One tensor of a file's header: ``begin`` and ``end`` count bytes from the start of the data. (A named
    tuple: made three times as fast as a frozen dataclass, for a header of ~170 000 tensors.)"""

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
    """The tensors a header (as JSON reads it) describes, in the order of their bytes, checked against
    ``data_bytes`` (the file's size less 8 + n): a known dtype, a shape of sizes >= 0 that torch can make (below
    2**63 bytes, a size of 0 counted as 1), offsets holding exactly shape x dtype's bytes, and
    the tensors filling the data with no gap or overlap. ValueError saying what is wrong otherwise, naming the
    tensor. A few calls per tensor, none per size: a header of 16 MiB holds ~170 000 tensors."""
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(info, dict) and _FIELDS <= info.keys()):
            raise ValueError(f"tensor {shown_text(name)}: expected its dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        torch_dtype = DTYPES.get(dtype) if isinstance(dtype, str) else None
        if torch_dtype is None:
            raise ValueError(f"tensor {shown_text(name)}: unknown dtype {shown_text(str(dtype))}")
        if not (isinstance(shape, list) and _are_sizes(shape)):
            raise ValueError(f"tensor {shown_text(name)}: shape {shown_text(str(shape))} is no list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and _are_sizes(offsets) and offsets[0] <= offsets[1]):
            raise ValueError(
                f"tensor {shown_text(name)}: data_offsets {shown_text(str(offsets))} are no [begin, end] of bytes"
            )
        nbytes = _tensor_bytes(shape, torch_dtype.itemsize)
        if nbytes is None:
            raise ValueError(
                f"tensor {shown_text(name)}: shape {shown_text(str(shape))} is larger than any tensor can be (its "
                f"sizes other than 0 multiply to 2**63 bytes or more)"
            )
        begin, end = offsets
        if end - begin != nbytes:
            raise ValueError(
                f"tensor {shown_text(name)}: {end - begin} bytes in the file, where shape {shown_shape(shape)} of "
                f"{dtype} takes {nbytes}"
            )
        entries.append(TensorEntry(name, torch_dtype, tuple(shape), begin, end))
    entries.sort(key=_byte_order)
    done = 0
    for entry in entries:
        if entry.begin != done:
            what = "overlaps the tensor before it" if entry.begin < done else f"leaves bytes {done} to {entry.begin} unused"
            raise ValueError(f"tensor {shown_text(entry.name)} {what}")
        done = entry.end
    if done != data_bytes:
        raise ValueError(f"its tensors take {done} bytes of data, the file holds {data_bytes}")
    return entries


def _byte_order(entry: TensorEntry) -> tuple[int, int]:
    return entry.begin, entry.end


def _are_sizes(values: list) -> bool:
    """Whether ``values`` (a JSON list) are all integers >= 0 (JSON's: exactly int, so no bool), by calls of
    C code alone, none per value."""
    return not values or (set(map(type, values)) <= _INT_ONLY and min(values) >= 0)


_INT_ONLY = frozenset((int,))


def _tensor_bytes(shape: list[int], itemsize: int) -> int | None:
    """The bytes of a tensor of ``shape`` (sizes >= 0) and ``itemsize``, or None when torch cannot make it
    (_makeable). A shape of a few sizes below 2**32 (any tensor's) is multiplied at once; any other is first
    walked by _makeable, which stops where the product passes 2**63."""
    if len(shape) <= 8 and max(shape, default=0) < 2**32:
        numel = math.prod(shape)  # below 2**256
        if numel:  # no size 0: the bytes bound every size
            return numel * itemsize if numel * itemsize < _MAX_TENSOR_BYTES else None
    return math.prod(shape) * itemsize if _makeable(shape, itemsize) else None


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


def read_tensors(fh, data_start: int, entries: list[TensorEntry]) -> Iterator[tuple[TensorEntry, torch.Tensor]]:
    """(entry, tensor) for each of ``entries`` (tensor_entries': in the order of their bytes, with no gap) of the
    open binary file ``fh`` whose data starts at byte ``data_start``, each in a new tensor of its own, as
    read_tensor reads it. A tensor of _SMALL_TENSOR_BYTES or more is read straight into its tensor; a run of
    smaller ones next to each other, up to _RUN_BYTES, in one read, each then copied out of it: a file of
    ~170 000 tensors of a few bytes took ~10 calls and a read per tensor. The memory held at once is the tensors
    read and at most one run. OSError / EOFError as read_tensor's."""
    start = 0
    while start < len(entries):
        stop = start + 1
        if entries[start].end - entries[start].begin < _SMALL_TENSOR_BYTES:
            while (stop < len(entries) and entries[stop].begin == entries[stop - 1].end
                   and entries[stop].end - entries[stop].begin < _SMALL_TENSOR_BYTES
                   and entries[stop].end - entries[start].begin <= _RUN_BYTES):
                stop += 1
        if stop - start == 1:
            yield entries[start], read_tensor(fh, data_start, entries[start])
        else:
            yield from _read_run(fh, data_start, entries[start:stop])
        start = stop


# read_tensors: a tensor of fewer bytes is read with its neighbours, in runs of at most _RUN_BYTES (what a run
# adds to the memory; a recording's layers are larger, so its file is read as before, a layer at a time)
_SMALL_TENSOR_BYTES = 64 << 10
_RUN_BYTES = 1 << 20


def _read_run(fh, data_start: int, run: list[TensorEntry]) -> Iterator[tuple[TensorEntry, torch.Tensor]]:
    """(entry, tensor) for each of ``run`` (entries whose bytes follow each other), read in one read."""
    begin, end = run[0].begin, run[-1].end
    block = bytearray(end - begin)
    fh.seek(data_start + begin)
    filled = _read_into(fh, memoryview(block))
    if filled < len(block):
        cut = next(entry for entry in run if entry.end > begin + filled)
        raise EOFError(f"the file ends {cut.end - begin - filled} bytes before tensor {shown_text(cut.name)} does")
    for entry in run:
        itemsize = entry.dtype.itemsize
        if entry.end == entry.begin:
            tensor = torch.empty(entry.shape, dtype=entry.dtype)
        else:  # a copy (clone) of the bytes in the block: a storage of its own, no view of another tensor
            numel = (entry.end - entry.begin) // itemsize
            tensor = torch.frombuffer(block, dtype=entry.dtype, count=numel, offset=entry.begin - begin)
            tensor = tensor.view(entry.shape).clone()
            if sys.byteorder != "little" and itemsize > 1:  # the file's bytes are little-endian
                tensor = _swapped_bytes(tensor)
        yield entry, tensor


def read_tensor(fh, data_start: int, entry: TensorEntry) -> torch.Tensor:
    """Tensor ``entry`` of the open binary file ``fh`` whose data starts at byte ``data_start``, read into a new
    tensor of its own (its bytes only: nothing of the file stays mapped or open through it). OSError when the
    system cannot read the file; EOFError when the file ends before the tensor does (cut shorter since its size
    was read)."""
    tensor = torch.empty(entry.shape, dtype=entry.dtype)
    if entry.end > entry.begin:
        fh.seek(data_start + entry.begin)
        buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        filled = _read_into(fh, buffer)
        if filled < len(buffer):
            raise EOFError(f"the file ends {len(buffer) - filled} bytes before tensor {shown_text(entry.name)} does")
        if sys.byteorder != "little" and entry.dtype.itemsize > 1:  # the file's bytes are little-endian
            tensor = _swapped_bytes(tensor)
    return tensor


def _read_into(fh, buffer: memoryview) -> int:
    """Fills ``buffer`` from ``fh``'s position; the bytes read: fewer only where the file ends."""
    filled = 0
    while filled < len(buffer):  # a read may return fewer bytes than asked (2 GiB at most on Linux)
        got = fh.readinto(buffer[filled:])
        if not got:
            break
        filled += got
    return filled


def _swapped_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` with the bytes of each element in reverse order (a big-endian machine reading the file)."""
    size = tensor.dtype.itemsize
    as_bytes = tensor.reshape(-1).view(torch.uint8).reshape(-1, size).flip(1).contiguous()
    return as_bytes.view(tensor.dtype).reshape(tensor.shape)
