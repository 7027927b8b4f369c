"""Several conditioning entries in the recorded branch are mixed as ComfyUI mixes their predictions:
by strength (ConditioningSetAreaStrength), by mask (ConditioningSetMask), only while active
(ConditioningSetTimestepRange), and a default entry where the others leave room
(ConditioningSetDefaultCombine), however ComfyUI batches them.

The reference names each chunk's entry by its cross-attention context, recomputes every head from
the layer's own weights in float64 and mixes per evaluation (per sigma) the entries that ran, with
weights the tests write out from the nodes' documented meaning (strength * mask per latent cell;
a default entry: 1 - the others), normalised per latent cell and averaged, loop by loop, over each
token's block of cells (2^l x 2^l at level l, smaller at the right and bottom edges).
"""

import logging

import pytest
import torch

import nodes

from comfy_extras import nodes_hooks

from headseg.nodes import recorder
from headseg.nodes.core.recording import LayerKey
from headseg.nodes.entry_weights import EntryMult, entry_shares

from .reference import AttentionProbe, chunk_outputs, grid_for, per_head

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
    """The latent cells each of n_out tokens covers: n_out = n_in halved (rounding up) l times, and
    token i covers [i 2^l, (i + 1) 2^l), cut at n_in."""
    f, n = 1, n_in
    while n > n_out:
        f, n = 2 * f, -(-n // 2)
    assert n == n_out, (n_in, n_out)
    return [range(i * f, min((i + 1) * f, n_in)) for i in range(n_out)]


def token_means(cells: torch.Tensor, grid) -> torch.Tensor:
    """[b, H, W] per latent cell -> [b, h, w]: the mean over each token's block, loop by loop."""
    (b, H, W), (h, w) = cells.shape, grid
    out = torch.empty(b, h, w, dtype=torch.float64)
    for i, rows in enumerate(bins(H, h)):
        for j, cols in enumerate(bins(W, w)):
            out[:, i, j] = cells[:, rows.start : rows.stop, cols.start : cols.stop].mean((1, 2))
    return out


def mixed_reference(probe, name, entries, steps="last", branch=0):
    """entries: [(context [1, tokens, dim], weight: a number or [1 or b, H, W] per latent cell)] ->
    [b, heads, h, w, d]: per evaluation, the entries that ran mixed by their normalised weights."""
    calls = probe.branch_calls(name, branch)
    grid = grid_for(LATENT, calls[0].x.shape[1])
    by_sigma: dict[float, list] = {}
    for call in calls:
        for context, out in chunk_outputs(call, grid, branch):
            (index,) = [i for i, e in enumerate(entries) if torch.equal(e[0][0], context)]
            by_sigma.setdefault(call.sigma, []).append((index, out))
    mixes = []
    for sigma in sorted(by_sigma, reverse=True):  # one evaluation per sigma (euler)
        ran = by_sigma[sigma]
        b = ran[0][1].shape[0]
        mult = [torch.as_tensor(entries[i][1], dtype=torch.float64).expand(b, *LATENT) for i, _ in ran]  # [b, H, W]
        total = sum(mult)
        shares = [torch.where(total > 0, m / total.clamp(min=1e-300), 1.0 / len(ran)) for m in mult]
        mixes.append(sum(token_means(s, grid)[:, None, :, :, None] * out for s, (_, out) in zip(shares, ran)))
    return mixes[-1] if steps == "last" else torch.stack(mixes).mean(0)


def record(tiny, sd2, positive, negative, steps, monkeypatch, separate, sampling_steps=2, branch="cond", batch=1):
    if separate:  # short of memory: ComfyUI runs each entry in its own call
        monkeypatch.setattr(sd2.model, "memory_required", lambda *a, **k: 1e30)
    patched, live = recorder.attach_recorder(sd2, steps=steps, branch=branch)
    with AttentionProbe(patched) as probe:
        got = tiny.sample(patched, positive, negative, latent_hw=LATENT, steps=sampling_steps, seed=4, batch=batch)
    monkeypatch.undo()
    return live.snapshot(got), probe


def assert_mixed(rec, probe, entries, steps, branch=0):
    for name in NAMES:
        want = mixed_reference(probe, name, entries, steps, branch)
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
    entries = [(a[0][0], 3.0), (b[0][0], 1.0)]
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
    assert_mixed(rec, probe, [(a[0][0], 1.0), (b[0][0], mask)], steps)
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
    assert_mixed(rec, probe, [(a[0][0], 1.0), (b[0][0], 6.0 * mask)], "last")


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
    assert_mixed(rec, probe, [(a[0][0], 1.0), (b[0][0], 1.0)], "mean")


def test_a_default_entry_counts_where_the_others_leave_room(tiny, sd2, prompts, monkeypatch):
    """ConditioningSetDefaultCombine: the default entry weighs 1 - the others (its own strength and
    mask do not count)."""
    a, b, neg = prompts
    mask = left_half()
    masked = nodes.ConditioningSetMask().append(a, mask, "default", 1.0)[0]
    strong_default = nodes.ConditioningSetAreaStrength().append(b, 5.0)[0]  # ignored for a default entry
    (both,) = nodes_hooks.ConditioningSetDefaultAndCombine().set_default_and_combine(masked, strong_default)
    rec, probe = record(tiny, sd2, both, neg, "last", monkeypatch, separate=False)
    assert_layout(probe, separate=False)
    assert_mixed(rec, probe, [(a[0][0], mask), (b[0][0], 1.0 - mask)], "last")


def test_a_default_entry_left_no_room_does_not_dilute_the_recording(tiny, sd2, prompts, monkeypatch):
    """A whole-image entry leaves a default entry nothing: ComfyUI does not run it, and the recording is
    the whole-image entry alone (not half of it)."""
    a, b, neg = prompts
    (both,) = nodes_hooks.ConditioningSetDefaultAndCombine().set_default_and_combine(a, b)
    rec, probe = record(tiny, sd2, both, neg, "last", monkeypatch, separate=False)
    for name in NAMES:
        call = probe.branch_calls(name)[-1]
        assert sorted(call.cond_or_uncond) == [0, 1]  # the default entry did not run
        want = per_head(call, grid_for(LATENT, call.x.shape[1]))
        torch.testing.assert_close(rec.layers[LayerKey.parse(name)].double(), want, **TOL)


@pytest.mark.parametrize("mask_batch", [1, 2])
def test_masks_apply_to_each_image_of_a_batch(tiny, sd2, prompts, monkeypatch, mask_batch):
    a, b, neg = prompts
    mask = left_half().repeat(mask_batch, 1, 1)
    if mask_batch == 2:
        mask[1] = 1.0 - mask[1]  # the second image: the right half
    masked = nodes.ConditioningSetMask().append(b, mask, "default", 1.0)[0]
    both = nodes.ConditioningCombine().combine(a, masked)[0]
    rec, probe = record(tiny, sd2, both, neg, "last", monkeypatch, separate=False, batch=2)
    assert rec.batch_size == 2
    assert_mixed(rec, probe, [(a[0][0], 1.0), (b[0][0], mask)], "last")


def test_the_uncond_branch_mixes_its_own_entries(tiny, sd2, prompts, monkeypatch):
    a, b, neg = prompts
    (neg2, _) = tiny.conditioning("SD2", seed=21)
    strong = nodes.ConditioningSetAreaStrength().append(neg2, 3.0)[0]
    negatives = nodes.ConditioningCombine().combine(neg, strong)[0]
    rec, probe = record(tiny, sd2, a, negatives, "last", monkeypatch, separate=False, branch="uncond")
    assert_mixed(rec, probe, [(neg[0][0], 1.0), (neg2[0][0], 3.0)], "last", branch=1)


# ----------------------------------------------------------------------------- the shares alone
def whole(uuid, mult, default=False):
    return EntryMult(uuid, None if default else torch.as_tensor(mult, dtype=torch.float32), None, default)


def test_shares_sum_to_one_at_every_token_and_leave_area_entries_out():
    mask = torch.rand(2, 6, 10)
    entries = [
        whole("whole", torch.full((2, 6, 10), 2.0)),
        whole("masked", 0.5 * mask),
        EntryMult("area", torch.ones(2, 4, 4), (4, 4, 1, 2)),  # runs on a crop: not recorded, no share
        EntryMult("whole-area", torch.ones(2, 6, 10), (6, 10, 0, 0)),
    ]
    shares = entry_shares(entries, (2, 4, 6, 10))
    assert len(shares) == 3 and "area" not in shares
    for grid in ((6, 10), (3, 5), (2, 3), (1, 1)):
        total = sum(torch.as_tensor(shares.share(u, grid, "cpu")) for u in ("whole", "masked", "whole-area"))
        torch.testing.assert_close(total, torch.ones(2, *grid))
    torch.testing.assert_close(shares.share("masked", (6, 10), "cpu"), 0.5 * mask / (2.0 + 0.5 * mask + 1.0))
    # the 2x3 grid: token (0, 2) covers rows 0-3 and columns 8-9 of the 6x10 latent
    cells = 0.5 * mask / (2.0 + 0.5 * mask + 1.0)
    torch.testing.assert_close(shares.share("masked", (2, 3), "cpu")[:, 0, 2], cells[:, 0:4, 8:10].mean((1, 2)))


def test_a_default_entry_takes_what_the_others_leave_including_area_entries():
    mask = torch.zeros(1, 6, 10)
    mask[..., :5] = 0.75
    entries = [
        whole("masked", mask),
        EntryMult("area", torch.full((1, 2, 2), 0.125), (2, 2, 4, 3)),  # rows 4-5, columns 3-4: inside the mask
        whole("default", None, default=True),
    ]
    shares = entry_shares(entries, (1, 4, 6, 10))
    rest = 1.0 - mask
    rest[:, 4:6, 3:5] -= 0.125
    cells = shares.share("default", (6, 10), "cpu")
    torch.testing.assert_close(cells, rest / (rest + mask))
    # a mask weighing more than 1 leaves a default entry nothing there (not a negative share)
    strong = entry_shares([whole("masked", 2.0 * (mask > 0)), whole("default", None, default=True)], (1, 4, 6, 10))
    torch.testing.assert_close(strong.share("default", (6, 10), "cpu"), (mask == 0).float())
    no_room = entry_shares([whole("a", torch.ones(1, 6, 10)), whole("d", None, True)], (1, 4, 6, 10))
    assert "d" not in no_room and no_room.share("a", (3, 5), "cpu") == 1.0  # ComfyUI does not run it


def test_cells_no_entry_weighs_count_every_entry_alike():
    left, right = torch.zeros(1, 6, 10), torch.zeros(1, 6, 10)
    left[..., :4], right[..., 6:] = 1.0, 3.0  # columns 4-5 in no mask
    shares = entry_shares([whole("l", left), whole("r", right)], (1, 4, 6, 10))
    cells = shares.share("l", (6, 10), "cpu")
    assert torch.all(cells[..., :4] == 1.0) and torch.all(cells[..., 4:6] == 0.5) and torch.all(cells[..., 6:] == 0.0)


def test_shares_of_plain_weights_are_numbers():
    ones = torch.ones(1, 8, 8)
    shares = entry_shares([whole(1, 3.0 * ones), whole(2, ones)], (1, 4, 8, 8))
    assert shares.share(1, (4, 4), "cpu") == 0.75 and shares.share(2, (4, 4), "cpu") == 0.25
    zero = entry_shares([whole(1, 0 * ones), whole(2, 0 * ones)], (1, 4, 8, 8))
    assert zero.share(1, (8, 8), "cpu") == zero.share(2, (8, 8), "cpu") == 0.5
    assert entry_shares([EntryMult(1, torch.ones(1, 2, 2), (2, 2, 0, 0))], (1, 4, 8, 8)) is None
    assert entry_shares([whole(1, 0.2 * ones)], (1, 4, 8, 8)).share(1, (2, 2), "cpu") == 1.0


def test_a_weight_of_another_form_is_refused_by_name():
    with pytest.raises(ValueError, match=r"^a conditioning weight of shape \(1, 1, 6, 10\) \(expected \[1, h, w\]\)"):
        entry_shares([whole(1, torch.ones(1, 1, 6, 10))], (1, 4, 6, 10))


# ----------------------------------------------------------------------------- the store's bookkeeping
KEY = LayerKey("output", 11, 0)
B, HEADS, D, GRID = 1, 2, 4, (6, 10)


@pytest.fixture
def store():
    """A recorder store of one layer on the 6x10 latent, 'last' step of a one-step run, cond branch."""
    from headseg.nodes.recorder import LayerInfo
    from headseg.nodes.recorder_store import _Store
    from headseg.nodes.step_selection import parse_steps

    store = _Store([LayerInfo(KEY, HEADS, D, 0)], None, parse_steps("last"), "cond", "test")
    store.begin_run(torch.zeros(B, 4, *GRID), torch.tensor([1.0, 0.0]))
    return store


def heads_of(seed):
    """One chunk's attn1 output [B, N, heads*d] and the same as [B, heads, h, w, d]."""
    x = torch.randn(B, GRID[0] * GRID[1], HEADS * D, generator=torch.Generator().manual_seed(seed))
    return x, x.reshape(B, *GRID, HEADS, D).permute(0, 3, 1, 2, 4)


def call(store, shares, chunks, new_eval=True, with_uncond=False):
    """One calc_cond_batch call of the cond branch over ``chunks`` [(uuid, out [B, N, heads*d])] (the
    uncond branch listed too with ``with_uncond``, as in CFG's [cond, uncond] after a [cond, None])."""
    if new_eval:
        store.begin_eval()
    conds = [[{"uuid": u} for u in shares], [{"uuid": "negative"}] if with_uncond else None]
    main = store.begin_batch(conds, lambda branch: entry_shares([whole(u, m) for u, m in shares.items()], (B, 4, *GRID)))
    assert main
    store.batch_main = main
    options = {
        "cond_or_uncond": [0] * len(chunks), "uuids": [u for u, _ in chunks], "n_heads": HEADS,
        "activations_shape": (B, 320, *GRID), "original_shape": (B, 4, *GRID), "sigmas": torch.tensor([1.0]),
    }
    store.observe(KEY, torch.cat([x for _, x in chunks]), options)
    store.batch_main = None


def recorded(store):
    store.end_run()
    rec, failure = store.latest()
    assert rec is not None, failure
    return rec.layers[KEY].double()


def test_an_entry_that_never_ran_does_not_scale_the_recording(store):
    """Shares for a and b, but only a's call is recorded: the recording is a's heads, per token."""
    mask = torch.zeros(1, *GRID)
    mask[..., :5] = 1.0
    xa, want = heads_of(1)
    call(store, {"a": 1.0 - 0.5 * mask, "b": mask}, [("a", xa)])
    torch.testing.assert_close(recorded(store), want.double(), rtol=2e-3, atol=2e-3)


def test_the_branch_in_two_calls_of_one_evaluation_is_one_mix(store):
    (xa, want_a), (xb, want_b) = heads_of(1), heads_of(2)
    shares = {"a": torch.full((1, *GRID), 3.0), "b": torch.ones(1, *GRID)}
    call(store, shares, [("a", xa)])
    call(store, shares, [("b", xb)], new_eval=False, with_uncond=True)  # the same evaluation, a second main call
    torch.testing.assert_close(recorded(store), (0.75 * want_a + 0.25 * want_b).double(), rtol=2e-3, atol=2e-3)


def test_an_entry_without_a_share_counts_nothing(store):
    """ComfyUI may run a default entry that its own rounding left a sliver of room for."""
    (xa, want_a), (xc, _) = heads_of(1), heads_of(3)
    call(store, {"a": torch.ones(1, *GRID)}, [("a", xa), ("c", xc)])
    torch.testing.assert_close(recorded(store), want_a.double(), rtol=2e-3, atol=2e-3)


def test_a_latent_side_that_reaches_one_early_still_pools_by_blocks():
    """A 1 x 15 latent: rows stop halving at 1 while columns go 15 -> 8 -> 4; token j of the 1 x 4 grid
    stands for cells [4j, 4j + 4) (the last one for 3 cells), not for an adaptive pool's windows."""
    ramp = torch.arange(15, dtype=torch.float32).reshape(1, 1, 15)
    shares = entry_shares([whole("ramp", ramp), whole("rest", 14.0 - ramp)], (1, 4, 1, 15))
    cells = ramp / 14.0
    want = torch.stack([cells[..., 4 * j : 4 * j + 4].mean(-1) for j in range(4)], -1)  # [1, 1, 4]
    torch.testing.assert_close(shares.share("ramp", (1, 4), "cpu"), want)


def test_a_weight_of_another_batch_is_refused():
    with pytest.raises(ValueError, match=r"expected \[2, h, w\]"):
        entry_shares([whole(1, torch.ones(1, 6, 10)), whole(2, torch.rand(1, 6, 10))], (2, 4, 6, 10))


def test_a_default_entry_limited_to_an_area_gets_no_share():
    entries = [whole("plain", torch.full((1, 6, 10), 0.5)), EntryMult("d", None, (2, 2, 0, 0), default=True)]
    shares = entry_shares(entries, (1, 4, 6, 10))
    assert "d" not in shares and shares.share("plain", (3, 5), "cpu") == 1.0


def test_low_precision_weights_are_mixed_in_float32():
    a = torch.tensor([[[0.3, 1.0]]], dtype=torch.bfloat16)
    b = torch.tensor([[[0.7, 0.1]]], dtype=torch.bfloat16)
    share = entry_shares([EntryMult("a", a, None), EntryMult("b", b, None)], (1, 4, 1, 2)).share("a", (1, 2), "cpu")
    want = a.double() / (a.double() + b.double())
    assert share.dtype == torch.float32
    torch.testing.assert_close(share.double(), want, rtol=1e-6, atol=1e-7)


def test_pooled_shares_land_on_the_asked_device():
    """The recorder asks for the device of the head outputs (a GPU while sampling); 'meta' stands in."""
    shares = entry_shares([whole("l", torch.rand(1, 4, 4)), whole("r", torch.rand(1, 4, 4))], (1, 4, 4, 4))
    assert shares.share("l", (2, 2), torch.device("meta")).device.type == "meta"


def test_a_call_whose_batch_is_no_multiple_of_the_latents_chunks_is_left_out_with_a_warning(store, caplog):
    """A call of 4 images labelled as two chunks (cond, uncond) of a 1-image latent: its chunks hold 2 images
    each, not the latent's 1, so the layer is not recorded from it (nothing is made up for the batch)."""
    x, _ = heads_of(1)
    store.begin_eval()
    store.batch_main = store.begin_batch([[{"uuid": "a"}], [{"uuid": "b"}]])
    options = {
        "cond_or_uncond": [0, 1], "n_heads": HEADS, "activations_shape": (4, 320, *GRID),
        "original_shape": (4, 4, *GRID), "sigmas": torch.tensor([1.0]),
    }
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        store.observe(KEY, torch.cat([x] * 4), options)
    store.batch_main = None
    store.end_run()
    rec, failure = store.latest()
    assert rec is None and "batch 4 does not split into 2 chunks of the latent batch 1" in caplog.text


def test_without_a_guider_a_repeated_sigma_still_counts_as_two_steps():
    """Model calls with no guider evaluation around them (a custom sampling path) each count as one: on a
    schedule that repeats 0.5 (steps 1 and 2), the second call at 0.5 is step 2, the last."""
    from headseg.nodes.recorder import LayerInfo
    from headseg.nodes.recorder_store import _Store
    from headseg.nodes.step_selection import parse_steps

    store = _Store([LayerInfo(KEY, HEADS, D, 0)], None, parse_steps("last"), "cond", "test")
    store.begin_run(torch.zeros(B, 4, *GRID), torch.tensor([1.0, 0.5, 0.5, 0.0]))
    for seed, sigma in ((1, 1.0), (2, 0.5), (3, 0.5)):
        options = {
            "cond_or_uncond": [0], "n_heads": HEADS, "activations_shape": (B, 320, *GRID),
            "original_shape": (B, 4, *GRID), "sigmas": torch.tensor([sigma]),
        }
        store.observe(KEY, heads_of(seed)[0], options)
    torch.testing.assert_close(recorded(store), heads_of(3)[1].double(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("own_inf", [False, True])
def test_a_float32_layer_beyond_float16_is_kept_in_float32_unless_the_model_made_inf_itself(store, own_inf):
    """The recorder keeps a float32 (or bfloat16) UNet's head outputs beyond float16's range in float32, finite;
    where the model itself made an inf (a head output of its own), the layer stays float16 as recorded, its
    values beyond 65504 becoming inf with it: the layer is the model's overflow either way, and not held at
    twice the memory."""
    x, want = heads_of(1)
    x, want = x * 1e5, want * 1e5  # planted: values far beyond float16's 65504, in float32
    if own_inf:
        x[0, 0, 0] = float("inf")  # the same element as want[0, 0, 0, 0, 0]
    call(store, {"a": torch.ones(1, *GRID)}, [("a", x)])
    store.end_run()
    rec, failure = store.latest()
    layer = rec.layers[KEY]
    if own_inf:
        assert layer.dtype == torch.float16 and bool(layer[0, 0, 0, 0, 0].isinf())
    else:
        assert layer.dtype == torch.float32
        torch.testing.assert_close(layer, want, rtol=0, atol=0)


@pytest.mark.parametrize("peak, kept", [(65510.0, torch.float16), (-65519.0, torch.float16), (65520.0, torch.float32)])
def test_values_float16_rounds_to_its_largest_finite_value_stay_float16(store, peak, kept):
    """float16 rounds a value below 65520 (its largest finite value 65504 plus half its step there) to +-65504,
    as near as it rounds any value: such a layer is kept in float16 as 0.5.5 kept it, not in float32 at twice the
    memory (which Save Recording then refused); from 65520 on, float16 makes inf and the layer stays float32."""
    x, _ = heads_of(1)
    x = x * (abs(peak) / float(x.abs().max()))
    x.view(-1)[x.abs().argmax()] = peak
    call(store, {"a": torch.ones(1, *GRID)}, [("a", x)])
    layer = recorded(store)
    assert store.latest()[0].layers[KEY].dtype == kept
    assert bool(layer.isfinite().all())


def test_a_float64_models_value_float32_rounds_to_65520_is_kept_in_float32(store):
    """A float64 UNet (--fp64-unet): torch casts float64 to float16 through float32, so 65519.999 (below 65520 in
    float64) is 65520.0 on the way, which float16 makes inf: the layer is kept in float32, finite. It was kept in
    float16, that value made inf, and Head PCA refused the layer as a float16 overflow."""
    x, _ = heads_of(1)
    x = x.double() * (65000.0 / float(x.abs().max()))
    x.view(-1)[x.abs().argmax()] = 65519.999
    assert bool(x.to(torch.float16).isinf().any())  # what a float16 copy holds
    call(store, {"a": torch.ones(1, *GRID)}, [("a", x)])
    layer = recorded(store)
    assert store.latest()[0].layers[KEY].dtype == torch.float32
    assert bool(layer.isfinite().all()) and float(layer.abs().max()) == 65520.0
