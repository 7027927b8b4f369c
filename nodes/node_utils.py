"""Input checks shared by HeadSeg's node classes, and ComfyUI values <-> core values: a node's inputs checked
and named in its errors (IMAGE, INT, recording, positions, combo choices), MASKs made from core masks, and which
item of a list and which outputs the running node is asked for.

Nothing here computes a stage of the pipeline; that is ``nodes/core``. The node modules' other helpers:
device_choice (the `device` input), memory_checks, previews (temporary PNGs) and output_files (Save nodes).
"""

from __future__ import annotations

import logging

import torch

from . import output_links
from .core.numerics import all_finite
from .core.recording import Recording
from .core.values import integer_index, shown_text

log = logging.getLogger("HeadSeg")

CATEGORY = "HeadSeg"


def expect(value, cls, name: str, what: str):
    """value -> value when it is a cls, else TypeError naming the input ``name`` and ``what`` it expects."""
    if not isinstance(value, cls):
        raise TypeError(f"{name}: expected {what}, got {type(value).__name__}")
    return value


def integer_input(value, name: str, what: str) -> int:
    """An INT input as given -> int; ValueError naming the input ``name`` (expected ``what``) when it is no
    integer: ComfyUI makes a widget's value an int, but hands a linked one over as it comes (None, a float)."""
    i = integer_index(value)
    if i is None:
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return i


POSITION_CHOICES = ["down+up", "down", "up", "middle", "down+middle", "middle+up", "down+middle+up"]


def as_recording(value, latent=None, name: str = "recording") -> Recording:
    """A core Recording from a Recording or a live recording handle (the run that produced ``latent``).

    A live recording must come with the sampler's LATENT: that link makes the node run after the
    sampler, re-run (not come from ComfyUI's cache) whenever a new image is sampled, and picks that
    image's run even when other samplers used the recorded MODEL afterwards.
    """
    if hasattr(value, "snapshot"):
        if latent is None:
            raise ValueError(
                "latent: connect the sampler's LATENT output here when the recording comes from Record "
                "Self-Attention, so that this node runs after sampling and again for every new image"
            )
        samples = latent.get("samples") if isinstance(latent, dict) else None
        if not isinstance(samples, torch.Tensor):
            raise ValueError(f"latent: expected a LATENT (a dict with 'samples'), got {type(latent).__name__}")
        value = value.snapshot(samples)  # the run that produced this LATENT
    elif latent is not None:  # a recording from a file: the LATENT only orders the nodes, so it must be of that image
        samples = latent.get("samples") if isinstance(latent, dict) else None
        if isinstance(value, Recording) and not (isinstance(samples, torch.Tensor) and samples.dim() >= 4):
            shape = f"samples of shape {tuple(samples.shape)}" if isinstance(samples, torch.Tensor) else type(latent).__name__
            raise ValueError(
                f"latent: expected a LATENT (a dict with 'samples' of shape [B, C, h, w]), got {shape}"
            )
        if isinstance(value, Recording) and value.layers:
            B, (h, w) = int(samples.shape[0]), tuple(int(n) for n in samples.shape[-2:])
            if (h, w) != value.latent_size or B != value.batch_size:
                H, W = value.image_size
                raise ValueError(
                    f"latent: the recording (from a file) is of {value.batch_size} image(s) of {W}x{H} pixels, but the "
                    f"LATENT is of {B} image(s) of {w * 8}x{h * 8}: the masks would be the file's, not this LATENT's "
                    "image. Disconnect latent, or load the recording of this image"
                )
    if not isinstance(value, Recording):
        raise TypeError(
            f"{name}: expected a HeadSeg recording (from Record Self-Attention or Load Recording), "
            f"got {type(value).__name__}"
        )
    return value


def parse_positions(text: str) -> tuple[str, ...]:
    """"down+up" -> ("down", "up"); ValueError naming `positions`."""
    parts = tuple(dict.fromkeys(p for p in str(text).replace(",", "+").replace(" ", "").split("+") if p))  # unique
    bad = [p for p in parts if p not in ("down", "middle", "up")]
    if not parts or bad:
        raise ValueError(f"positions: expected UNet positions joined by '+' such as 'down+up', got {shown_text(text, 80)}")
    return parts


def combo_error(name: str, value, choices) -> str | None:
    """For validate_inputs: ComfyUI 0.3.75 checks no V3 combo's value itself (its input type is the
    string 'COMBO'), so an API prompt could carry any string into the run. A message, or None."""
    if isinstance(value, str) and value not in choices:
        return f"{name}: expected one of {list(choices)}, got {value!r}"
    return None


def mask_bytes(masks: torch.Tensor) -> torch.Tensor:
    """[..., H, W] bool masks -> the same 0/1 values as uint8 (a view; a mask of another dtype as it is), to
    copy into float32 MASKs: torch converts uint8 to float32 about 1.3 - 1.4 times as fast as bool (a bool is
    stored as one byte, 0 or 1), which is most of Mask Merge's time after the merge (all_masks)."""
    return masks.view(torch.uint8) if masks.dtype == torch.bool else masks


def mask_to_comfy(masks: torch.Tensor) -> torch.Tensor:
    """[M, H, W] bool -> MASK [M, H, W] float32 0..1 on the CPU (a fresh tensor), from the masks' bytes."""
    return mask_bytes(masks.detach()).to("cpu", torch.float32)


def image_batch(image, name: str = "image", first_only: bool = False) -> torch.Tensor:
    """Checks an IMAGE input [B, H, W, C] (C = 1, 3 or 4; B, H, W >= 1; floats, 0..1) -> [B, H, W, 3] float32
    on the CPU ([1, H, W, 3] with first_only), NaN drawn as black and +-inf clamped to white / black."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[-1] not in (1, 3, 4):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{name}: expected an IMAGE [B, H, W, 3], got {shape}")
    if not image.dtype.is_floating_point:  # e.g. 0..255 bytes from another pack: drawn, they would be white
        raise ValueError(
            f"{name}: expected an IMAGE of floats from 0 to 1 (ComfyUI's IMAGE), got {image.dtype} values; "
            "convert the picture to a float IMAGE first"
        )
    if 0 in image.shape[:3]:
        raise ValueError(f"{name}: expected at least one image of at least 1x1 pixels, got {tuple(image.shape)}")
    if image.is_meta:
        raise ValueError(f"{name}: expected an IMAGE holding pixels, got a tensor on the meta device (no values)")
    if first_only:
        image = image[:1]  # [1, H, W, C]: only this one is moved and checked
    image = image[..., :3].to("cpu", torch.float32)  # [B, H, W, 3] (a view or a copy; never written to)
    if image.shape[-1] == 1:
        image = image.expand(-1, -1, -1, 3)
    if not all_finite(image):  # e.g. a half-precision VAE that overflowed: still show it
        log.warning("HeadSeg: %s holds NaN or inf values; drawn as black (NaN, -inf) and white (+inf)", name)
        image = torch.nan_to_num(image, nan=0.0, posinf=1.0, neginf=0.0)
    return image


def list_index() -> int:
    """The item of a list input the running node is at (ComfyUI runs a node once per item of a list, e.g. of
    latents from Rebatch Latents, each item a batch of its own): ComfyUI's executing context; 0 outside a list."""
    from comfy_execution.utils import get_executing_context

    context = get_executing_context()
    return int(getattr(context, "list_index", None) or 0)


def outputs_to_make(node_class, class_type: str) -> set[str]:
    """The names of the outputs the running node must make: output_links.outputs_to_keep on ComfyUI's hidden
    PROMPT (declared in the node's schema: io.Hidden.prompt) and the executing node's id, all of the node's
    outputs where that says None (as outside ComfyUI's executor: no hidden PROMPT, no executing node)."""
    from comfy_execution.utils import get_executing_context

    context = get_executing_context()
    hidden = getattr(node_class, "hidden", None)
    prompt = None if hidden is None else hidden.prompt
    keep = output_links.outputs_to_keep(prompt, None if context is None else context.node_id, class_type)
    return set(output_links.OUTPUT_NAMES[class_type]) if keep is None else keep
