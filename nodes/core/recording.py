"""Recorded self-attention heads: layer identity, validation, layer selection and the file format.

A recording holds, for each self-attention layer (attn1 of one transformer of the UNet), the
per-head outputs softmax(QK^T / sqrt(d)) V before the output projection, shape
[B, heads, h, w, d], where h x w is that layer's token grid.

File format (safetensors): one tensor per layer keyed "<block>.<number>.<depth>" (for example
"input.1.0", "middle.0.0", "output.11.0"), shape [B, heads, h, w, d], float16; metadata strings
"format" = "headseg-recording/1", "image_height", "image_width" (pixels), "model", "steps", "branch",
and any others a writer adds (Save Recording: ComfyUI's "prompt" and "workflow"), which a loaded recording
keeps in ``metadata`` so that a copy saved again still says how its heads were made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import operator
import os
import pathlib
import re
import stat
from dataclasses import dataclass

import torch

FORMAT = "headseg-recording/1"
BLOCK_POSITIONS = {"input": "down", "middle": "middle", "output": "up"}
POSITIONS = ("down", "middle", "up")
METADATA_KEYS = ("format", "image_height", "image_width", "model", "steps", "branch")
_BLOCK_ORDER = {"input": 0, "middle": 1, "output": 2}


def is_int(value) -> bool:
    """Whether value is an integer: a Python or numpy int, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer_index(value) -> int | None:
    """value as an int when it is one (a Python, numpy or 0-d torch integer: anything with __index__),
    else None; bools are not integers here."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def is_real(value) -> bool:
    """Whether value is a real number: a Python or numpy int or float, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_batch_index(batch_index, batch_size: int) -> None:
    """A ValueError naming ``batch_index`` unless it is an int (not a bool) in [0, batch_size)."""
    if not is_int(batch_index) or not 0 <= batch_index < batch_size:
        raise ValueError(f"batch_index must be an int in [0, {batch_size}), got {batch_index!r}")


def is_ascii_digits(text: str) -> bool:
    """Whether text is one or more ASCII digits 0-9 (str.isdecimal alone also takes other scripts' digits)."""
    return text.isascii() and text.isdecimal()


def shown_text(text: str, limit: int = 40) -> str:
    """text -> its repr, or the repr of its first half-limit characters and its length when longer than limit."""
    return repr(text) if len(text) <= limit else f"{text[:limit // 2]!r}... ({len(text)} characters)"


# The value ascii_int gives digits of a larger number: beyond any grid level, step or cluster count.
DIGITS_BEYOND = 10**9


def significant_digits(digits: str) -> str:
    """ASCII digits -> them without leading zeros ('0' for zeros only): '007' -> '7'."""
    return digits.lstrip("0") or "0"


def ascii_int(digits: str) -> int:
    """ASCII digits (is_ascii_digits) -> their value, or DIGITS_BEYOND when it is larger. Python's int()
    refuses text of more than 4300 digits (leading zeros too) with a ValueError in its own words, which
    would reach the user instead of the message naming the input."""
    digits = significant_digits(digits)
    return DIGITS_BEYOND if len(digits) > len(str(DIGITS_BEYOND)) else min(int(digits), DIGITS_BEYOND)


_FP16_MAX = torch.finfo(torch.float16).max
# Smallest magnitude float16 makes inf (65520): values below it round to at most float16's largest, 65504.
FP16_OVERFLOW = _FP16_MAX + 16.0
_FP32_MAX = torch.finfo(torch.float32).max
_FP16_TINY = torch.finfo(torch.float16).tiny  # smallest normal float16: a head below it would lose its digits
# The dtypes a recording, features and stacks may hold (float8 has too few digits and few kernels).
FEATURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
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


@dataclass(frozen=True)
class LayerKey:
    """One self-attention layer: attn1 of transformer ``depth`` in UNet block (``block``, ``number``)."""

    block: str
    number: int
    depth: int

    def __post_init__(self):
        if self.block not in BLOCK_POSITIONS:
            raise ValueError(f"LayerKey: block must be one of {sorted(BLOCK_POSITIONS)}, got {self.block!r}")
        for name in ("number", "depth"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                raise ValueError(f"LayerKey: {name} must be an int >= 0, got {value!r}")
            object.__setattr__(self, name, int(value))  # frozen: numpy ints become ints

    @property
    def name(self) -> str:
        """"input.1.0": the key of this layer in a recording file."""
        return f"{self.block}.{self.number}.{self.depth}"

    @property
    def position(self) -> str:
        """"down" | "middle" | "up"."""
        return BLOCK_POSITIONS[self.block]

    @property
    def sort_key(self) -> tuple:
        """UNet execution order: input blocks ascending, middle, output blocks ascending; then depth."""
        return (_BLOCK_ORDER[self.block], self.number, self.depth)

    @classmethod
    def parse(cls, name: str) -> LayerKey:
        """"input.1.0" -> LayerKey("input", 1, 0); ValueError on anything else."""
        if not isinstance(name, str):
            raise ValueError(f"layer name must be a string like 'input.1.0', got {type(name).__name__}")
        parts = name.split(".")
        if (
            len(parts) != 3
            or parts[0] not in BLOCK_POSITIONS
            or not is_ascii_digits(parts[1])
            or not is_ascii_digits(parts[2])
        ):
            raise ValueError(
                f"layer name must be '<block>.<number>.<depth>' with block in "
                f"{sorted(BLOCK_POSITIONS)} (e.g. 'input.1.0'), got {shown_text(name)}"
            )
        number, depth = ascii_int(parts[1]), ascii_int(parts[2])
        if max(number, depth) >= DIGITS_BEYOND:
            raise ValueError(
                f"layer name {shown_text(name)}: block number and depth must be below {DIGITS_BEYOND} "
                f"(a UNet has a few dozen blocks)"
            )
        return cls(parts[0], number, depth)

    def __str__(self) -> str:
        return self.name


def grid_levels(latent_size: tuple[int, int]) -> list[tuple[int, int]]:
    """(h, w) latent grid -> [(h, w), (ceil(h/2), ceil(w/2)), ...] down to (1, 1) inclusive."""
    if not isinstance(latent_size, (tuple, list)) or len(latent_size) != 2:
        raise ValueError(f"grid_levels: latent_size must be two ints >= 1 (h, w), got {latent_size!r}")
    h, w = latent_size
    if any(not is_int(v) or v < 1 for v in (h, w)):
        raise ValueError(f"grid_levels: latent_size must be two ints >= 1, got {tuple(latent_size)!r}")
    levels = [(h, w)]
    while (h, w) != (1, 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        levels.append((h, w))
    return levels


def parse_levels(text: str) -> list[int] | None:
    """"all" (or "*", "") -> None; "0, 1," -> [0, 1] sorted, duplicates dropped; ValueError naming `levels`.

    Level 0 = the latent grid, 1 = 1/2, 2 = 1/4, 3 = 1/8 (see grid_levels)."""
    if not isinstance(text, str):
        raise TypeError(f"levels: expected a string such as 'all' or '0,1', got {type(text).__name__}")
    t = text.strip().lower()
    if t in ("", "all", "*"):
        return None
    parts = [p.strip() for p in t.split(",") if p.strip()]
    if parts and all(is_ascii_digits(p) for p in parts):
        return sorted({ascii_int(p) for p in parts})
    raise ValueError(
        f"levels: expected 'all' or grid levels as comma-separated integers >= 0 "
        f"(0 = latent grid, 1 = 1/2, 2 = 1/4, 3 = 1/8), got {shown_text(text, 80)}"
    )


def _sorted_layers(layers: dict) -> dict:
    if all(isinstance(k, LayerKey) for k in layers):
        return dict(sorted(layers.items(), key=lambda item: item[0].sort_key))
    return dict(layers)


# The largest image side in pixels (ComfyUI's own limit for image sizes): a label map of
# 16384 x 16384 is already 2 GB per cluster count.
MAX_IMAGE_SIDE = 16384


def check_size(size, name: str = "size") -> tuple[int, int]:
    """(height, width) in pixels -> (int, int), or a ValueError starting with ``name``: two positive
    ints, each at most MAX_IMAGE_SIDE."""
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or any(not is_int(s) or s < 1 for s in size)
    ):
        raise ValueError(f"{name} must be (height, width) in pixels, two positive ints, got {size!r}")
    if max(size) > MAX_IMAGE_SIDE:
        raise ValueError(f"{name} must be at most {MAX_IMAGE_SIDE} pixels per side, got {tuple(size)!r}")
    return (int(size[0]), int(size[1]))


# Values whose largest |value| lies outside 2**-SCALE_EXP .. 2**SCALE_EXP are scaled by an exact power
# of two before float32 products (PCA covariances, k-means distances), so that their squares neither
# underflow nor overflow; results are scaled back.
SCALE_EXP = 30


def power_of_two_scale(peak: torch.Tensor) -> torch.Tensor:
    """[...] largest |values| -> [...] float64 scales: the power of two that brings each near 1 where it
    lies outside 2**-SCALE_EXP .. 2**SCALE_EXP, else 1 (also for 0, inf and NaN)."""
    exponent = torch.floor(torch.log2(peak.double()))  # -inf for 0, nan for nan
    far = torch.isfinite(exponent) & (exponent.abs() > SCALE_EXP)
    return torch.where(far, torch.exp2(-exponent.clamp(-1000, 1000)), 1.0)  # clamped: finite in float64


@contextlib.contextmanager
def full_float32_matmul():
    """Runs the block with float32 matrix products on CUDA in full float32, then restores the
    setting: a caller (or another node pack) may have allowed TF32, whose 10-bit mantissa would
    move k-means' distances and PCA's covariances by ~1e-3 of their size. The setting is changed
    through the API it was made with (torch refuses to read one after the other was used)."""
    matmul = torch.backends.cuda.matmul
    try:
        legacy = bool(matmul.allow_tf32)  # raises once the per-backend API (fp32_precision) set it
    except RuntimeError:
        legacy = None
    if legacy:
        matmul.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32 = True
    elif legacy is None and getattr(matmul, "fp32_precision", "ieee") == "tf32":
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = "tf32"
    else:
        yield


def check_one_device(first, label: str, t: torch.Tensor, what: str, noun: str):
    """first: (label, device) of the first tensor seen, or None -> the same for the next call; a
    ValueError when t (``label``, e.g. "layer input.1.0") sits on another device than the first.
    Every stage computes on the device of its input, so all its tensors must share one."""
    if first is None:
        return (label, t.device)
    if t.device != first[1]:
        raise ValueError(
            f"{what}: {label} is on {t.device} but {first[0]} is on {first[1]}: put all {noun}s on one device"
        )
    return first


def all_finite(t: torch.Tensor) -> bool:
    """Whether t holds no NaN or inf: one sum, finite exactly when none is there (unless the sum
    overflows); only then the element-wise check. A float16 or bfloat16 tensor is read by its smallest and
    largest values instead (NaN comes out of both): a float16 sum overflows past 65504 (in 15 of the 16
    layers of an SD2.1-shaped float16 recording of values about 0.3), and the element-wise check then took
    ten times as long, while a sum in float32 (dtype=float32) converts the whole tensor to float32 first on
    the CPU, a copy of twice its size."""
    t = t.detach()
    if t.dtype in (torch.float16, torch.bfloat16) and t.numel():
        return all(math.isfinite(v) for v in torch.stack(torch.aminmax(t)).tolist())  # [min, max]
    wide = torch.float32 if t.is_floating_point() and t.element_size() < 4 else None  # (float8)
    return math.isfinite(float(t.sum(dtype=wide))) or bool(torch.isfinite(t).all())


def nonfinite_layers(rec) -> list[LayerKey]:
    """The layers of ``rec`` (a Recording) holding NaN or inf values, in the recording's order."""
    return [key for key, t in rec.layers.items() if not all_finite(t)]


class NonFiniteLayerError(ValueError):
    """A layer of a recording holds NaN or inf values: a ValueError naming it; ``layer`` is its LayerKey."""

    def __init__(self, key: LayerKey):
        super().__init__(f"Recording: layer {key!s} contains NaN or inf values")
        self.layer = key


def layers_text(layers: dict) -> str:
    """{key: tensor} -> '{input.1.0: float16 [1, 5, 64, 64, 64], ...}': the layers of a text form, each by its
    name, dtype and shape (a value that is no tensor by its type), never by its values."""

    def one(t) -> str:
        if isinstance(t, torch.Tensor):
            where = "" if t.device.type == "cpu" else f" {t.device}"
            return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}{where}"
        return type(t).__name__

    return "{" + ", ".join(f"{key!s}: {one(t)}" for key, t in layers.items()) + "}"


@dataclass
class Recording:
    """Per-head self-attention outputs of several layers: layers[key] is [B, heads, h, w, d].

    ``metadata``: for a recording read from a file, the file's string metadata other than the format's own
    fields (ComfyUI's "prompt" and "workflow" that made it, as Save Recording writes them; {} when it has
    none); None for one recorded while sampling. ``file``: the name Load Recording was given for that file
    (its ``file`` or ``path`` value), None when unknown (not written into a saved copy)."""

    layers: dict[LayerKey, torch.Tensor]
    image_size: tuple[int, int]
    model: str = "unknown"
    steps: str = "last"
    branch: str = "cond"
    # left out of the text form (__repr__): ComfyUI puts its inputs' text in every error report, and a workflow is large
    metadata: dict[str, str] | None = dataclasses.field(default=None, repr=False)
    file: str | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        if not isinstance(self.layers, dict):
            raise TypeError(f"Recording: layers must be a dict LayerKey -> Tensor, got {type(self.layers).__name__}")
        bad = [str(k) for k, t in self.layers.items() if not isinstance(t, torch.Tensor)]
        if bad:
            raise TypeError(
                f"Recording: every layer must be a torch.Tensor [B, heads, h, w, d]; not one: {', '.join(bad)}"
            )
        self.layers = _sorted_layers(self.layers)
        self.image_size = check_size(self.image_size, "Recording: image_size")

    def __repr__(self) -> str:
        # ComfyUI writes this text of every input of a node that fails into its error report (websocket and
        # /history): the tensors' printed values took about 19 kB per layer (320 kB for SD2.1, 1.3 MB for SDXL)
        return (
            f"Recording(layers={layers_text(self.layers)}, image_size={self.image_size!r}, model={self.model!r}, "
            f"steps={self.steps!r}, branch={self.branch!r})"
        )

    # ----------------------------------------------------------------- shape facts
    @property
    def latent_size(self) -> tuple[int, int]:
        """(h, w) of the latent = image_size // 8."""
        H, W = self.image_size
        return (max(1, H // 8), max(1, W // 8))

    @property
    def batch_size(self) -> int:
        if not self.layers:
            raise ValueError("Recording: layers is empty (no self-attention layer recorded)")
        return int(next(iter(self.layers.values())).shape[0])

    @property
    def num_heads(self) -> int:
        """Total number of heads over all layers."""
        return sum(int(t.shape[1]) for t in self.layers.values())

    def to(self, device) -> Recording:
        """The same recording with every layer on ``device`` (layers already there are shared)."""
        return dataclasses.replace(self, layers={key: t.to(device) for key, t in self.layers.items()})

    def source(self) -> dict[str, str]:
        """What sampled these heads, for the files made from them (Save Label Maps' headseg entry): model, steps
        and branch; for a recording read from a file also ``file`` (the name Load Recording was given, when
        known) and the file's metadata other than its workflow, as the file has them (strings: its ``prompt``,
        which names the seed, model and text that sampled it, as JSON text, and its ``list_index``)."""
        about = {"model": self.model, "steps": self.steps, "branch": self.branch}
        if self.metadata is not None:
            if self.file is not None:
                about["file"] = self.file
            about.update((key, text) for key, text in self.metadata.items() if key != "workflow" and key not in about)
        return about

    def grid_level(self, key: LayerKey) -> int:
        """0 = latent grid, 1 = 1/2, 2 = 1/4, ... (ceil halving); ValueError if the grid fits no level."""
        if key not in self.layers:
            raise ValueError(f"Recording: no layer {key!s}; layers: {[k.name for k in self.layers]}")
        t = self.layers[key]
        if t.dim() != 5:
            raise ValueError(f"Recording: layer {key!s} must be 5-D [B, heads, h, w, d], got shape {tuple(t.shape)}")
        grid = (int(t.shape[2]), int(t.shape[3]))
        levels = grid_levels(self.latent_size)
        if grid not in levels:
            H, W = self.image_size
            raise ValueError(  # sizes spelled out: the nodes write an image's size as width x height
                f"Recording: layer {key!s} has a token grid of {grid[0]} rows x {grid[1]} columns, which fits no "
                f"level of an image {W} px wide and {H} px high (its grids, rows x columns: "
                f"{', '.join(f'{h}x{w}' for h, w in levels)})"
            )
        return levels.index(grid)

    # ----------------------------------------------------------------- checks
    def validate(self, check_finite: bool = True) -> Recording:
        """Checks layers, shapes, batch, grids and (unless check_finite is False) finiteness; returns self,
        else ValueError naming the layer."""
        if not self.layers:
            raise ValueError("Recording: layers is empty (no self-attention layer recorded)")
        batch = first = None
        for key, t in self.layers.items():
            if not isinstance(key, LayerKey):
                raise ValueError(f"Recording: layer keys must be LayerKey, got {key!r}")
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"Recording: layer {key!s} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 5:
                raise ValueError(f"Recording: layer {key!s} must be 5-D [B, heads, h, w, d], got shape {tuple(t.shape)}")
            if t.dtype not in FEATURE_DTYPES:
                raise ValueError(
                    f"Recording: layer {key!s} must be float16, bfloat16, float32 or float64, got {t.dtype}"
                )
            first = check_one_device(first, f"layer {key!s}", t, "Recording", "layer")
            if t.is_meta:
                raise ValueError(f"Recording: layer {key!s} is on the meta device: it holds no values")
            B, heads, h, w, d = t.shape
            if min(B, heads, h, w, d) < 1:
                raise ValueError(f"Recording: layer {key!s} has an empty dimension, shape {tuple(t.shape)}")
            if batch is None:
                batch = (key, B)
            elif B != batch[1]:
                raise ValueError(
                    f"Recording: batch mismatch: layer {key!s} has batch {B} but layer {batch[0]!s} has {batch[1]}"
                )
            self.grid_level(key)
            if check_finite and not all_finite(t):
                raise NonFiniteLayerError(key)
        return self

    # ----------------------------------------------------------------- selection
    def select(self, positions=("down", "up"), levels=None) -> Recording:
        """Keeps the layers whose position is in ``positions`` and grid level in ``levels`` (None = all).

        positions: iterable of "down" | "middle" | "up", or one string such as "down,up".
        levels: iterable of ints (0 = latent grid, 1 = 1/2, ...), or None for all levels.
        """
        if isinstance(positions, str):
            positions = [p for p in positions.replace("+", ",").replace(" ", ",").split(",") if p]
        try:
            positions = tuple(positions)
        except TypeError:
            raise ValueError(
                f"select: positions must be a non-empty subset of {list(POSITIONS)} (or a string such as "
                f"'down+up'), got {positions!r}"
            ) from None
        bad = [p for p in positions if p not in POSITIONS]
        if bad or not positions:
            raise ValueError(f"select: positions must be a non-empty subset of {list(POSITIONS)}, got {list(positions)}")
        if isinstance(levels, str):
            levels = parse_levels(levels)
        if levels is not None:
            if is_int(levels):
                levels = [levels]
            try:
                levels = tuple(levels)
            except TypeError:
                raise ValueError(
                    f"select: levels must be ints >= 0 (0 = latent grid, 1 = 1/2, ...), 'all' or None, got {levels!r}"
                ) from None
            if any(not is_int(v) or v < 0 for v in levels):
                raise ValueError(f"select: levels must be ints >= 0 (0 = latent grid, 1 = 1/2, ...), got {list(levels)}")
        level_of = {key: self.grid_level(key) for key in self.layers}
        kept = {
            key: t
            for key, t in self.layers.items()
            if key.position in positions and (levels is None or level_of[key] in levels)
        }
        if not kept:
            available_pos = sorted({k.position for k in self.layers}, key=POSITIONS.index)
            available_lv = sorted(set(level_of.values()))
            raise ValueError(
                f"positions / levels: no layer left for positions={list(positions)} levels="
                f"{'all' if levels is None else list(levels)}; the recording has positions {available_pos} "
                f"and levels {available_lv}"
            )
        return Recording(kept, self.image_size, self.model, self.steps, self.branch, self.metadata, self.file)


# --------------------------------------------------------------------- file I/O
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
            if float(top) > _FP32_MAX:
                raise ValueError(f"{name}: layer {key!s} has values beyond the float32 range")
            # read as float32 holds them: torch casts float64 to float16 through float32, so 65519.999 is inf
            if float(top.to(torch.float32)) >= FP16_OVERFLOW:  # float16 would make them inf: float32 keeps them
                kept = torch.float32
            else:  # float16 would lose the digits of a head below its normal numbers
                small = ((peaks > 0) & (peaks < _FP16_TINY)).nonzero().flatten().tolist()
                if small:
                    raise ValueError(
                        f"{name}: layer {key!s}, head {small[0]}: values at most {float(peaks[small[0]]):.3g}, below "
                        f"float16's smallest normal number {_FP16_TINY:.3g}: the file would keep few or none of their digits"
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
    start like a safetensors file (8 bytes of little-endian length, then that many bytes of JSON)."""
    import json

    n = int.from_bytes(fh.read(8), "little")
    if not 2 <= n <= _MAX_HEADER_BYTES:
        return None
    try:
        header = json.loads(fh.read(n))
    except (ValueError, RecursionError):  # not JSON / UTF-8, or absurdly nested
        return None
    return (n, header) if isinstance(header, dict) else None


def file_version(path, st: os.stat_result) -> tuple:
    """(path, inode, size, mtime, ctime) of ``path`` from its stat: changes whenever the file is rewritten
    or replaced, also by a file of the same size and time (another inode or change time)."""
    return (os.fspath(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def printable_path(path) -> str:
    """``path`` as text that can be printed and logged, also when its name is not valid UTF-8."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_utf8_path(path) -> bool:
    """Whether ``path`` is valid UTF-8: safetensors cannot open a file whose name is not."""
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


def _check_readable(path: str) -> None:
    """FileNotFoundError when ``path`` does not exist; ValueError naming it when it is a folder, not a regular
    file, unreadable, not laid out as safetensors, shorter than its header says, or named so that
    safetensors cannot open it (not UTF-8)."""
    shown = printable_path(path)
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
    try:
        with open(path, "rb") as fh:
            found = _read_header(fh)
    except OSError as exc:
        raise ValueError(f"{shown}: cannot read the file ({exc.strerror or exc})") from None
    if found is None:
        raise ValueError(f"{shown}: not a safetensors file (it must start with a header length and a JSON header)")
    n, header = found
    ends = [v["data_offsets"][1] for v in header.values() if isinstance(v, dict) and _is_offsets(v.get("data_offsets"))]
    if 8 + n + max(ends, default=0) > st.st_size:
        raise ValueError(
            f"{shown}: damaged or truncated: its header describes {8 + n + max(ends)} bytes, the file has {st.st_size}"
        )
    if not is_utf8_path(path):
        raise ValueError(f"{shown}: the file name is not valid UTF-8, which safetensors cannot open: rename the file")


def _is_offsets(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(is_int(v) and v >= 0 for v in value)


def _copied_tensor(f, name: str) -> torch.Tensor:
    """Tensor ``name`` of an open safetensors file ``f``, copied into memory. get_tensor's tensor reads the
    file's pages mapped into memory: held, it would change with a file written over in place, end the process
    (SIGBUS) once the file is cut shorter, and (Windows) keep the file from being replaced or deleted. No frame
    keeps it, also when the copy fails: a frame held by an error's traceback (ComfyUI's executor holds a node's
    error until Python's cycle collector runs) would keep the file mapped."""
    mapped = f.get_tensor(name)
    try:
        return mapped.clone()
    finally:
        del mapped


def load_recording(path) -> Recording:
    """Reads a headseg-recording/1 safetensors file; ValueError naming the file and field on bad content."""
    from safetensors import safe_open

    path = os.fspath(path)
    _check_readable(path)
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        if re.search(r"\(os error \d+\)", str(exc)):  # the system refused to read or map it: not its content
            raise ValueError(f"{path}: could not be read ({exc})") from exc
        raise ValueError(f"{path}: not a safetensors file ({exc})") from exc
    with handle as f:
        metadata = f.metadata() or {}
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
        layers, names = {}, {}
        for name in f.keys():
            try:
                key = LayerKey.parse(name)
            except ValueError as exc:
                raise ValueError(f"{path}: tensor {shown_text(name)}: {exc}") from None
            if key in names:
                raise ValueError(f"{path}: tensors {shown_text(names[key])} and {shown_text(name)} are the same layer {key}")
            names[key] = name
            shape = tuple(f.get_slice(name).get_shape())  # from the header: nothing of the file mapped
            if len(shape) != 5:
                raise ValueError(f"{path}: layer {name!r} must be 5-D [B, heads, h, w, d], got shape {shape}")
            layers[key] = _copied_tensor(f, name)
    if not layers:
        raise ValueError(f"{path}: the file holds no layer tensor")
    try:
        extra = {key: text for key, text in metadata.items() if key not in METADATA_KEYS}  # e.g. prompt, workflow
        rec = Recording(layers, (size[0], size[1]), metadata["model"], metadata["steps"], metadata["branch"], extra)
        rec.validate(check_finite=False)  # a layer with NaN / inf is named by Head PCA when it is selected
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return rec
