"""Several conditioning entries in the recorded branch are mixed as ComfyUI mixes their predictions:
by strength (ConditioningSetAreaStrength), by mask (ConditioningSetMask) and only while active
(ConditioningSetTimestepRange), however ComfyUI batches them.

The reference names each chunk's entry by its cross-attention context, recomputes every head from
the layer's own weights in float64 and mixes per evaluation (per sigma) with shares written out
here cell by cell: strength * mask per latent cell, normalised over the entries that ran, averaged
over the latent cells of each token's bin.
"""

import pytest
import torch

import nodes

from headseg.nodes import recorder
from headseg.nodes.core.recording import LayerKey
from headseg.nodes.entry_weights import entry_shares

from .reference import AttentionProbe, grid_for, per_head

TOL = dict(rtol=3e-3, atol=3e-3)  # recorded float16 against float64
NAMES = ("input.1.0", "input.4.0", "middle.0.0", "output.11.0")  # grids 6x10, 3x5, 2x3, 6x10
LATENT = (6, 10)


@pytest.fixture(scope="module")
def sd2(tiny):
    return tiny.build("SD2", seed=0)


@pytest.fixture(scope="module")
def prompts(tiny):
    (a, neg), (b, _) = tiny.conditioning("SD2", seed=1), tiny.conditioning("SD2", seed=11)
    return a, b, neg


def left_half() -> torch.Tensor:
    mask = torch.zeros(1, *LATENT)
    mask[..., :5] = 1.0  # columns 0-4 of 10: the 3x5 grid's middle column of tokens straddles the edge
    return mask


def bins(n_in: int, n_out: int) -> list[range]:
    """The latent cells each of n_out tokens covers: [floor(i n_in / n_out), ceil((i + 1) n_in / n_out))."""
    return [range(i * n_in // n_out, -(-(i + 1) * n_in // n_out)) for i in range(n_out)]


def token_means(cells: torch.Tensor, grid) -> torch.Tensor:
    """[H, W] per latent cell -> [h, w]: the mean over each token's bin, loop by loop."""
    (H, W), (h, w) = cells.shape, grid
    out = torch.empty(h, w, dtype=torch.float64)
    for i, rows in enumerate(bins(H, h)):
        for j, cols in enumerate(bins(W, w)):
            out[i, j] = cells[rows.start : rows.stop, cols.start : cols.stop].mean()
    return out


def chunk_outputs(call, grid, branch=0):
    """-> [(context [tokens, dim], per-head output [b, heads, h, w, d] float64)] of the branch's chunks."""
    chunks = len(call.cond_or_uncond)
    b = call.x.shape[0] // chunks
    found = []
    for j, label in enumerate(call.cond_or_uncond):
        if label == branch:
            one = type(call)([branch], call.sigma, call.x[j * b : (j + 1) * b], call.wq, call.wk, call.wv, call.heads)
            found.append((call.context[j * b], per_head(one, grid, branch)))
    return found


def mixed_reference(probe, name, entries, steps="last"):
    """entries: [(context [1, tokens, dim], strength, mask [1, H, W] or None)] -> [b, heads, h, w, d]."""
    calls = probe.branch_calls(name, 0)
    grid = grid_for(LATENT, calls[0].x.shape[1])
    by_sigma: dict[float, list] = {}
    for call in calls:
        for context, out in chunk_outputs(call, grid):
            (index,) = [i for i, e in enumerate(entries) if torch.equal(e[0][0], context)]
            by_sigma.setdefault(call.sigma, []).append((index, out))
    mixes = []
    for sigma in sorted(by_sigma, reverse=True):  # one evaluation per sigma (euler)
        ran = by_sigma[sigma]
        mult = [entries[i][1] * (entries[i][2][0].double() if entries[i][2] is not None else torch.ones(LATENT))
                for i, _ in ran]  # [H, W] per latent cell
        total = sum(mult)
        shares = [torch.where(total > 0, m / total.clamp(min=1e-300), 1.0 / len(ran)) for m in mult]
        mixes.append(sum(token_means(s, grid)[None, None, :, :, None] * out for s, (_, out) in zip(shares, ran)))
    return mixes[-1] if steps == "last" else torch.stack(mixes).mean(0)


def record(tiny, sd2, positive, negative, steps, monkeypatch, separate, sampling_steps=2):
    if separate:  # short of memory: ComfyUI runs each entry in its own call
        monkeypatch.setattr(sd2.model, "memory_required", lambda *a, **k: 1e30)
    patched, live = recorder.attach_recorder(sd2, steps=steps)
    with AttentionProbe(patched) as probe:
        got = tiny.sample(patched, positive, negative, latent_hw=LATENT, steps=sampling_steps, seed=4)
    monkeypatch.undo()
    return live.snapshot(got), probe


def assert_mixed(rec, probe, entries, steps):
    for name in NAMES:
        want = mixed_reference(probe, name, entries, steps)
        torch.testing.assert_close(rec.layers[LayerKey.parse(name)].double(), want, **TOL, msg=lambda m: f"{name}: {m}")


def last_calls(probe, name):
    """The calls of the last evaluation (the last sigma) that held the recorded branch."""
    calls = probe.branch_calls(name, 0)
    return [c for c in calls if c.sigma == calls[-1].sigma]


def assert_layout(probe, separate):
    """Both entries in one call, or (short of memory) one call each."""
    layouts = [sorted(c.cond_or_uncond) for c in last_calls(probe, "output.11.0")]
    assert layouts == ([[0], [0]] if separate else [[0, 0, 1]]), layouts


def equal_mean(probe, name, steps):
    """What counting every entry alike would record (the recorder before shares): discriminates the tests."""
    calls = last_calls(probe, name) if steps == "last" else probe.branch_calls(name, 0)
    grid = grid_for(LATENT, calls[0].x.shape[1])
    return torch.stack([out for call in calls for _, out in chunk_outputs(call, grid)]).mean(0)


@pytest.mark.parametrize("separate", [False, True], ids=["batched", "one-call-each"])
@pytest.mark.parametrize("steps", ["last", "mean"])
def test_strengths_weigh_the_entries(tiny, sd2, prompts, steps, separate, monkeypatch):
    a, b, neg = prompts
    strong = nodes.ConditioningSetAreaStrength().append(a, 3.0)[0]
    both = nodes.ConditioningCombine().combine(strong, b)[0]
    rec, probe = record(tiny, sd2, both, neg, steps, monkeypatch, separate)
    assert_layout(probe, separate)
    entries = [(a[0][0], 3.0, None), (b[0][0], 1.0, None)]
    assert_mixed(rec, probe, entries, steps)
    key = LayerKey.parse("output.11.0")
    assert not torch.allclose(rec.layers[key].double(), equal_mean(probe, "output.11.0", steps), **TOL)


@pytest.mark.parametrize("separate", [False, True], ids=["batched", "one-call-each"])
@pytest.mark.parametrize("steps", ["last", "mean"])
def test_a_masked_entry_counts_only_where_its_mask_is(tiny, sd2, prompts, steps, separate, monkeypatch):
    a, b, neg = prompts
    mask = left_half()
    masked = nodes.ConditioningSetMask().append(b, mask, "default", 1.0)[0]
    both = nodes.ConditioningCombine().combine(a, masked)[0]
    rec, probe = record(tiny, sd2, both, neg, steps, monkeypatch, separate)
    assert_layout(probe, separate)
    assert_mixed(rec, probe, [(a[0][0], 1.0, None), (b[0][0], 1.0, mask)], steps)
    # right of the mask only the whole-image entry counts
    key = LayerKey.parse("output.11.0")
    calls = last_calls(probe, "output.11.0")
    (only_a,) = [out for call in calls for ctx, out in chunk_outputs(call, LATENT) if torch.equal(ctx, a[0][0][0])]
    if steps == "last":
        torch.testing.assert_close(rec.layers[key][..., 5:, :].double(), only_a[..., 5:, :], **TOL)
    assert not torch.allclose(rec.layers[key].double(), equal_mean(probe, "output.11.0", steps), **TOL)


def test_mask_strength_and_strength_multiply(tiny, sd2, prompts, monkeypatch):
    a, b, neg = prompts
    mask = left_half() * 0.5
    masked = nodes.ConditioningSetMask().append(b, mask, "default", 3.0)[0]  # mask_strength 3
    masked = nodes.ConditioningSetAreaStrength().append(masked, 2.0)[0]
    both = nodes.ConditioningCombine().combine(a, masked)[0]
    rec, probe = record(tiny, sd2, both, neg, "last", monkeypatch, separate=False)
    assert_mixed(rec, probe, [(a[0][0], 1.0, None), (b[0][0], 6.0, mask)], "last")


def test_a_lone_masked_entry_is_recorded_as_it_is(tiny, sd2, prompts, monkeypatch):
    """Where its mask is 0 ComfyUI's prediction is 0; the recorder keeps the entry's own heads there."""
    a, _, neg = prompts
    masked = nodes.ConditioningSetMask().append(a, left_half(), "default", 1.0)[0]
    rec, probe = record(tiny, sd2, masked, neg, "last", monkeypatch, separate=False)
    for name in NAMES:
        call = probe.branch_calls(name)[-1]
        want = per_head(call, grid_for(LATENT, call.x.shape[1]))
        torch.testing.assert_close(rec.layers[LayerKey.parse(name)].double(), want, **TOL)


def test_an_entry_counts_only_at_the_steps_of_its_range(tiny, sd2, prompts, monkeypatch):
    a, b, neg = prompts
    early = nodes.ConditioningSetTimestepRange().set_range(b, 0.0, 0.5)[0]
    both = nodes.ConditioningCombine().combine(a, early)[0]
    rec, probe = record(tiny, sd2, both, neg, "mean", monkeypatch, separate=False, sampling_steps=4)
    ran = [sorted(c.cond_or_uncond) for c in probe.branch_calls("output.11.0")]
    assert [0, 0, 1] in ran and [0, 1] in ran  # both entries early, the first alone later
    assert_mixed(rec, probe, [(a[0][0], 1.0, None), (b[0][0], 1.0, None)], "mean")


# ----------------------------------------------------------------------------- the shares alone
def test_shares_sum_to_one_at_every_token_and_skip_area_and_inactive_entries():
    mask = torch.rand(2, 6, 10)
    entries = [
        {"uuid": "whole", "strength": 2.0},
        {"uuid": "masked", "mask": mask, "mask_strength": 0.5},
        {"uuid": "area", "area": (4, 4, 0, 0)},  # runs on a crop: not recorded, does not count
        {"uuid": "late", "timestep_start": 5.0},  # active only from sigma 5 down
        {"uuid": "whole-area", "area": (6, 10, 0, 0)},
    ]
    shares = entry_shares(entries, (2, 4, 6, 10), sigma=7.0)
    assert len(shares) == 3 and "area" not in shares and "late" not in shares
    for grid in ((6, 10), (3, 5), (2, 3), (1, 1)):
        total = sum(torch.as_tensor(shares.share(u, grid, "cpu")) for u in ("whole", "masked", "whole-area"))
        torch.testing.assert_close(total, torch.ones(2, *grid))
    cell = shares.share("masked", (6, 10), "cpu")
    torch.testing.assert_close(cell, 0.5 * mask / (2.0 + 0.5 * mask + 1.0))
    assert "late" in entry_shares(entries, (2, 4, 6, 10), sigma=4.0)


def test_shares_of_plain_strengths_are_numbers():
    shares = entry_shares([{"uuid": 1, "strength": 3.0}, {"uuid": 2}], (1, 4, 8, 8), sigma=1.0)
    assert shares.share(1, (4, 4), "cpu") == 0.75 and shares.share(2, (4, 4), "cpu") == 0.25
    zero = entry_shares([{"uuid": 1, "strength": 0.0}, {"uuid": 2, "strength": 0.0}], (1, 4, 8, 8), sigma=1.0)
    assert zero.share(1, (8, 8), "cpu") == zero.share(2, (8, 8), "cpu") == 0.5
    assert entry_shares([{"uuid": 1, "area": (2, 2, 0, 0)}], (1, 4, 8, 8), sigma=1.0) is None


def test_a_mask_of_another_form_is_refused_by_name():
    with pytest.raises(ValueError, match=r"^a conditioning mask of shape \(1, 1, 1, 6, 10\)"):
        entry_shares([{"uuid": 1, "mask": torch.ones(1, 1, 1, 6, 10)}], (1, 4, 6, 10), sigma=1.0)
