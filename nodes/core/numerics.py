"""Floating-point facts and helpers shared by the stages: float16 and float32 limits, the dtypes features
may hold, exact power-of-two scaling before float32 products, full-float32 matrix products on CUDA, one
device per input, and a fast check for NaN and inf."""

from __future__ import annotations

import contextlib
import math

import torch

_FP16_MAX = torch.finfo(torch.float16).max
# Smallest magnitude float16 makes inf (65520): values below it round to at most float16's largest, 65504.
FP16_OVERFLOW = _FP16_MAX + 16.0
FP32_MAX = torch.finfo(torch.float32).max
FP16_TINY = torch.finfo(torch.float16).tiny  # smallest normal float16: a head below it would lose its digits
# The dtypes a recording, features and stacks may hold (float8 has too few digits and few kernels).
FEATURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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
