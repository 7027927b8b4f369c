"""The memory check of the nodes' large allocations: a refusal naming the input before the work, instead of
ComfyUI running out of memory part-way."""

from __future__ import annotations


# Without psutil (ComfyUI ships it), the nodes allow this many bytes for each of their large allocations.
FALLBACK_MEMORY_BYTES = 4 << 30


def available_memory() -> int | None:
    """Bytes of memory free for new allocations (psutil's 'available'), or None when unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # no psutil, or a platform where it cannot tell
        return None


def check_memory(need: int, name: str, what: str, advice: str) -> None:
    """ValueError naming the input ``name`` when allocating ``need`` bytes for ``what`` would take more
    than 80 % of the free memory (or FALLBACK_MEMORY_BYTES when that is unknown): a clear refusal
    before the work instead of ComfyUI running out of memory part-way."""
    available = available_memory()
    limit = 0.8 * available if available else FALLBACK_MEMORY_BYTES
    if need > limit:
        room = f"80 % of the {available / 2**30:.1f} GiB free" if available else f"{limit / 2**30:.1f} GiB"
        raise ValueError(f"{name}: {what} would take {need / 2**30:.1f} GiB, more than {room}. {advice}")
