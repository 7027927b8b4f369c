"""Recording next to the model patches, guidance nodes and guiders that artists chain with it: steps
where the model did not run say why (a cache node, a timestep range at cfg = 1)."""

import pytest

from comfy_extras import nodes_easycache

from headseg.nodes import recorder

HW = (16, 16)


@pytest.fixture(scope="module")
def sd2(tiny):
    return tiny.build("SD2", seed=0)


def easycache(end_percent):
    # a high threshold: most steps from start_percent to end_percent reuse an earlier output
    return lambda m: nodes_easycache.EasyCacheNode.execute(m, 3.0, 0.0, end_percent, False).result[0]


def lazycache(end_percent):
    return lambda m: nodes_easycache.LazyCacheNode.execute(m, 3.0, 0.0, end_percent, False).result[0]


@pytest.mark.parametrize("cache", [easycache, lazycache], ids=["EasyCache", "LazyCache"])
def test_a_cache_node_that_skips_the_last_step_is_named(tiny, sd2, cache):
    """EasyCache / LazyCache with end_percent 1 may reuse an earlier output at the last step: the
    sampler goes through it without running the model (it named dpm_fast's own sigmas instead)."""
    pos, neg = tiny.conditioning("SD2")
    model, live = recorder.attach_recorder(cache(1.0)(sd2))
    got = tiny.sample(model, pos, neg, latent_hw=HW, steps=10, seed=2)
    with pytest.raises(ValueError, match=r"steps: the sampler went through step 9 but the model did not run at "
                                         r"step\(s\) [0-9,-]*9 \(a node that reuses earlier model outputs .*EasyCache "
                                         r"or LazyCache.*\): choose steps 'mean', steps the model ran \(0-"):
        live.snapshot(got)
    model, live = recorder.attach_recorder(cache(1.0)(sd2), steps="mean")  # what the message suggests works
    assert live.snapshot(tiny.sample(model, pos, neg, latent_hw=HW, steps=10, seed=2)).layers


def test_a_range_over_steps_a_cache_node_skipped_says_so(tiny, sd2, caplog):
    pos, neg = tiny.conditioning("SD2")
    model, live = recorder.attach_recorder(easycache(1.0)(sd2), steps="0-9")
    with caplog.at_level("WARNING", logger="HeadSeg"):
        got = tiny.sample(model, pos, neg, latent_hw=HW, steps=10, seed=2)
    assert live.snapshot(got).steps.startswith("0-1")
    assert "the model did not run at step(s) " in caplog.text and "EasyCache or LazyCache" in caplog.text
    assert "timestep range" not in caplog.text


@pytest.mark.parametrize("steps", ["last", "6-9"])
def test_cfg1_with_a_positive_ended_by_its_timestep_range_is_named(tiny, sd2, steps):
    """At cfg = 1 nothing runs the model once the only conditioning's range ends (no uncond pass): the
    message names the timestep range (it named dpm_fast's own sigmas, or a range 'outside' 0-9)."""
    import nodes

    pos, neg = tiny.conditioning("SD2")
    early = nodes.ConditioningSetTimestepRange().set_range(pos, 0.0, 0.5)[0]
    model, live = recorder.attach_recorder(sd2, steps=steps)
    got = tiny.sample(model, early, neg, latent_hw=(8, 8), steps=10, seed=2, cfg=1.0)
    with pytest.raises(ValueError, match=r"steps: no conditioning entry was active at step\(s\) 5-9, so the model did "
                                         r"not run there \(a timestep range.*choose steps the model ran \(0-4\)"):
        live.snapshot(got)
