"""tests/support/peak_memory.PeakBytes, which the memory tests of the nodes and the core rely on."""

import torch

from headseg.tests.support.peak_memory import PeakBytes


def test_a_copy_made_by_reshape_counts_while_its_result_lives():
    """reshape of a non-contiguous tensor copies it inside a composite op: the copy's own tensor dies at
    once while the view reshape returns keeps its storage alive, and it must stay counted."""
    x = torch.randn(4, 100, 100)
    with PeakBytes() as mem:
        kept = [x.permute(0, 2, 1).reshape(4, -1) for _ in range(3)]  # 3 copies of 160 kB, all alive
        joined = torch.cat(kept)  # [12, 10000]: 480 kB more
    assert mem.peak == 2 * 3 * x.numel() * 4, mem.peak
    assert mem.live == mem.peak
    del kept
    assert mem.live == joined.numel() * 4  # the copies are gone, the joined tensor lives
    del joined
    assert mem.live == 0


def test_views_in_place_results_and_earlier_tensors_are_not_counted_twice():
    x = torch.randn(1000)
    with PeakBytes() as mem:
        y = x * 2  # 4 kB
        v = y[10:20]  # a view of it
        y.add_(1.0)  # in place
        x.mul_(3.0)  # in place on a tensor made before the block
    assert mem.peak == 4000 and mem.live == 4000
    del y
    assert mem.live == 4000  # the view v still holds the storage
    del v
    assert mem.live == 0
