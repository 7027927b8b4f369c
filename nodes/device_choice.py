"""The `device` input of the nodes that compute on a GPU: which device a choice picks (ComfyUI's own when it
is a CUDA or ROCm GPU) and running a stage there, handing it to the CPU when the GPU runs out of memory."""

from __future__ import annotations

import gc
import logging
import traceback

import torch
from comfy_api.latest import io

log = logging.getLogger("HeadSeg")


# Choices of a node's `device` input: where its stage computes (inputs and outputs stay on the CPU).
DEVICE_CHOICES = ["auto", "gpu", "cpu"]


def device_input(tooltip: str):
    """The `device` combo of a node whose stage runs through run_on_device: DEVICE_CHOICES, 'auto' by
    default, optional so that workflows saved before the input existed still run (as 'auto')."""
    return io.Combo.Input("device", options=DEVICE_CHOICES, default="auto", optional=True, tooltip=tooltip)


# Errors of a GPU that is out of memory but not raised as torch.cuda.OutOfMemoryError: a library
# handle that cannot be created (cuBLAS in a thread's first GPU product, cuSOLVER) when the driver is full.
_OUT_OF_MEMORY_TEXTS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUSOLVER_STATUS_ALLOC_FAILED")


def compute_device(choice, name: str = "device") -> torch.device:
    """A `device` input -> the torch.device to compute on.

    'cpu': the CPU. 'gpu': ComfyUI's device when it is a CUDA GPU (ROCm GPUs present themselves to
    torch as CUDA), else ValueError naming the input. 'auto': that GPU when ComfyUI runs on one, the
    CPU otherwise (--cpu, Apple MPS, DirectML, Intel XPU: untested there, so HeadSeg stays on the CPU).
    """
    if choice not in DEVICE_CHOICES:
        raise ValueError(f"{name}: expected one of {DEVICE_CHOICES}, got {choice!r}")
    if choice == "cpu":
        return torch.device("cpu")
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    kind = getattr(device, "type", str(device))
    if kind == "cuda":
        return device
    if choice == "auto":
        return torch.device("cpu")
    why = " (started with --cpu, or no GPU found)" if kind == "cpu" else ""
    raise ValueError(
        f"{name}: 'gpu' runs HeadSeg on CUDA or ROCm GPUs only, but ComfyUI computes on {kind} here{why}; "
        "choose 'auto' or 'cpu'"
    )


def _release_workspaces() -> None:
    """Frees the cuBLAS workspaces torch keeps for every thread that multiplied on a GPU (32 MiB each
    on an H200): those of the thread that ran the node's GPU work, and of every other thread of the
    process too (ComfyUI runs nodes one at a time, so none is multiplying now), each made again at
    that thread's next GPU product."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)  # private: absent in some builds
    if clear is not None:
        clear()


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _OUT_OF_MEMORY_TEXTS)


def run_on_device(choice, work, what: str, name: str = "device"):
    """work(device) on the device that `choice` picks (see compute_device) -> its result.

    With 'auto', a GPU that runs out of memory hands the work to the CPU (a warning is logged), so
    a busy GPU costs time, never the result. With 'gpu' the error stays a torch.cuda.OutOfMemoryError
    (ComfyUI then unloads its models, so a second try can fit), its message naming the input.
    """
    device = compute_device(choice, name)
    if device.type == "cpu":
        return work(device)
    try:
        return work(device)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        # torch's message is a paragraph: its first two sentences say what did not fit
        reason = ". ".join(str(exc).strip().split(". ")[:2]).rstrip(".") or "out of memory"
        # the failed attempt's tensors are held by its frames, which the traceback keeps (and any
        # cycle through thread pools' futures): let them go before anything else runs
        traceback.clear_frames(exc.__traceback__)
        if choice != "auto":
            raise torch.cuda.OutOfMemoryError(
                f"{name}: the GPU ({device}) ran out of memory in {what} ({reason}); choose 'auto' to fall "
                "back to the CPU, or 'cpu'"
            ) from exc
    finally:
        _release_workspaces()
    import comfy.model_management

    gc.collect()  # anything else of the failed attempt caught in a reference cycle
    comfy.model_management.soft_empty_cache()
    log.warning("HeadSeg: %s ran out of GPU memory on %s (%s); running it on the CPU instead", what, device, reason)
    return work(torch.device("cpu"))
