"""PeakBytes: the peak bytes of CPU tensors allocated by the torch ops run inside a block and alive at once.

A TorchDispatchMode sees every op's outputs: a storage seen for the first time, and not one of the
op's inputs (views of a tensor made before the block, in-place and out= results), counts from then
on until the last tensor seen to hold it is freed. Every later output that shares a counted storage
(a view, or the tensor a composite op such as ``reshape`` returns around the copy it made: the copy's
own tensor object dies at once) keeps it counted too. Deterministic (no reading of the process's
RSS), so tests can bound what a node holds at its peak. Only the calling thread's ops are seen (a
dispatch mode is thread-local): not those of worker threads.
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
        self._holders: dict[int, int] = {}  # data pointer of a counted storage -> its tensors still alive

    def _gone(self, ptr: int, n: int) -> None:
        self._holders[ptr] -= 1
        if self._holders[ptr] == 0:
            del self._holders[ptr]
            self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                ptr, n = storage.data_ptr(), storage.nbytes()
                if not n:
                    continue
                if ptr in self._holders:  # a counted storage: this tensor keeps it alive as well
                    self._holders[ptr] += 1
                elif ptr not in inputs:  # a new storage
                    self._holders[ptr] = 1
                    self.live += n
                    self.peak = max(self.peak, self.live)
                else:  # made before the block (or not by an op seen here): not counted
                    continue
                weakref.finalize(t, self._gone, ptr, n)
        return out
