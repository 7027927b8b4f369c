"""Recorded self-attention heads: layer identity, validation and layer selection.

A recording holds, for each self-attention layer (attn1 of one transformer of the UNet), the
per-head outputs softmax(QK^T / sqrt(d)) V before the output projection, shape
[B, heads, h, w, d], where h x w is that layer's token grid. Its file (save_recording, load_recording) is
recording_file.py's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .numerics import FEATURE_DTYPES, all_finite, check_one_device
from .values import DIGITS_BEYOND, ascii_int, is_ascii_digits, is_int, shown_text

BLOCK_POSITIONS = {"input": "down", "middle": "middle", "output": "up"}
POSITIONS = ("down", "middle", "up")
_BLOCK_ORDER = {"input": 0, "middle": 1, "output": 2}


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
        return self._level_among(key, self.layers[key], grid_levels(self.latent_size))

    def _level_among(self, key: LayerKey, t: torch.Tensor, levels: list[tuple[int, int]]) -> int:
        """grid_level of layer ``key`` holding ``t``, ``levels`` being grid_levels(self.latent_size) (validate
        works them out once for all its layers: a file may hold ~170 000)."""
        if t.dim() != 5:
            raise ValueError(f"Recording: layer {key!s} must be 5-D [B, heads, h, w, d], got shape {tuple(t.shape)}")
        grid = (int(t.shape[2]), int(t.shape[3]))
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
        levels = grid_levels(self.latent_size)
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
            self._level_among(key, t, levels)
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



# The file format and its I/O, which README's core API placed in this module, are recording_file.py's now;
# their public names stay importable from here, loaded on first use (recording_file imports this module).
_FILE_NAMES = (
    "FORMAT", "METADATA_KEYS", "MAX_LABEL_CHARS", "MAX_STEPS_LABEL_CHARS", "save_recording", "file_version",
    "printable_path", "is_utf8_path", "is_recording_file", "load_recording",
)


def __getattr__(name: str):
    if name in _FILE_NAMES:
        from . import recording_file

        return getattr(recording_file, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
