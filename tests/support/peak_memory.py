"""PeakBytes: the peak bytes of CPU tensors allocated by the torch ops run inside a block and alive at once.

A TorchDispatchMode sees every op's outputs: a storage seen for the first time, and not one of the
op's inputs (views of a tensor made before the block, in-place and out= results), counts from then
on until the tensor that brought it in is freed. Deterministic (no reading of the process's RSS), so
tests can bound what a node holds at its peak.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0  # bytes of the counted storages still alive
        self.peak = 0
        self._seen: set[int] = set()

    def _gone(self, ptr: int, n: int) -> None:
        self.live -= n
        self._seen.discard(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                ptr, n = storage.data_ptr(), storage.nbytes()
                if n and ptr not in self._seen and ptr not in inputs:
                    self._seen.add(ptr)
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._gone, ptr, n)
        return out
