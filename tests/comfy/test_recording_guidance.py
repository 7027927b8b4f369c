"""Recording next to ComfyUI's guidance nodes and conditioning tools: PAG and SAG keep their effect and
their extra passes are not recorded; several positive entries count the same however ComfyUI batches
them; setups that cannot be recorded faithfully say why."""

import logging

import pytest
import torch

import comfy.sample
import comfy.samplers
import nodes
from comfy_extras import nodes_custom_sampler, nodes_pag, nodes_sag

from headseg.nodes import recorder
from headseg.nodes.core.recording import LayerKey

from .reference import AttentionProbe, chunk_outputs, grid_for, per_head

TOL = dict(rtol=3e-3, atol=3e-3)  # recorded float16 against float64
NAMES = ("input.1.0", "middle.0.0", "output.11.0")


@pytest.fixture(scope="module")
def sd2(tiny):
    return tiny.build("SD2", seed=0)


def main_pass_calls(probe, name):
    """Calls of ``name`` in CFG's main pass: both branches in one call (the guidance nodes' extra passes
    run one conditioning alone)."""
    return [c for c in probe.calls[name] if sorted(c.cond_or_uncond) == [0, 1]]


def entries_mean(call, grid, branch=0):
    """[b, heads, h, w, d] float64: per_head averaged over every chunk of ``call`` labelled ``branch``."""
    return torch.stack([out for _, out in chunk_outputs(call, grid, branch)]).mean(0)


def assert_last_main_pass(rec, probe, latent_hw):
    for name in NAMES:
        call = main_pass_calls(probe, name)[-1]
        want = per_head(call, grid_for(latent_hw, call.x.shape[1]))
        torch.testing.assert_close(rec.layers[LayerKey.parse(name)].double(), want, **TOL, msg=lambda m: f"{name}: {m}")


def pag(model):
    return nodes_pag.PerturbedAttentionGuidance.execute(model, 3.0).result[0]


def test_pag_keeps_its_effect_in_either_order_and_its_pass_is_not_recorded(tiny, sd2):
    """PAG adds a ("middle", 0) attn1 patch for its extra pass only; HeadSeg's ("middle", 0, 0) patch
    must not hide it (ComfyUI prefers the longer key)."""
    pos, neg = tiny.conditioning("SD2")
    want = tiny.sample(pag(sd2), pos, neg, latent_hw=(16, 16), steps=2, seed=2)
    plain = tiny.sample(sd2, pos, neg, latent_hw=(16, 16), steps=2, seed=2)
    assert (want - plain).abs().max() > 1e-2  # PAG changes the picture: the check below is not vacuous
    for order in ("record then PAG", "PAG then record"):
        if order == "record then PAG":
            patched, live = recorder.attach_recorder(sd2)
            model = pag(patched)
        else:
            model, live = recorder.attach_recorder(pag(sd2))
        with AttentionProbe(model) as probe:
            got = tiny.sample(model, pos, neg, latent_hw=(16, 16), steps=2, seed=2)
        assert (got - want).abs().max() <= 1e-5, order
        assert len(probe.calls["middle.0.0"]) > len(main_pass_calls(probe, "middle.0.0"))  # PAG's pass ran
        assert_last_main_pass(live.snapshot(got), probe, (16, 16))


@pytest.mark.parametrize("cfg", [1.0, 7.0])
def test_pag_over_two_chained_record_nodes_warns_neither(tiny, sd2, cfg, caplog):
    """PAG's perturbed pass drops the whole chain of HeadSeg patches of the middle layer (its ("middle", 0)
    patch must run): an extra pass, so no record node is told its layer was taken over; the second record
    node's wrapper has not run yet in that call and must read its own pass as the extra one it is."""
    pos, neg = tiny.conditioning("SD2")
    patched, first = recorder.attach_recorder(sd2)
    patched, second = recorder.attach_recorder(patched)
    model = pag(patched)
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        got = tiny.sample(model, pos, neg, latent_hw=(16, 16), steps=2, seed=2, cfg=cfg)
    assert "takes precedence" not in caplog.text and "not run through" not in caplog.text, caplog.text
    for live in (first, second):
        assert LayerKey.parse("middle.0.0") in live.snapshot(got).layers

def sag(model):
    return nodes_sag.SelfAttentionGuidance.execute(model, 0.5, 2.0).result[0]


@pytest.mark.parametrize("order", ["SAG then record", "record then SAG"])
@pytest.mark.parametrize("steps", ["last", "mean"])
def test_sag_keeps_its_effect_and_its_extra_pass_is_not_recorded(tiny, sd2, steps, order):
    """SAG runs the negative prompt on a blurred latent after CFG, labelled as the first (cond) entry.
    Applied after the record node, it replaces the middle layer's patch: HeadSeg chains it at sampling."""
    pos, neg = tiny.conditioning("SD2")
    want = tiny.sample(sag(sd2), pos, neg, latent_hw=(16, 16), steps=2, seed=2)
    if order == "SAG then record":
        model, live = recorder.attach_recorder(sag(sd2), steps=steps)
    else:
        patched, live = recorder.attach_recorder(sd2, steps=steps)
        model = sag(patched)
    with AttentionProbe(model) as probe:
        got = tiny.sample(model, pos, neg, latent_hw=(16, 16), steps=2, seed=2)
    assert (got - want).abs().max() <= 1e-5
    assert probe.calls["output.11.0"][-1].cond_or_uncond == [0]  # the last call is SAG's pass
    rec = live.snapshot(got)
    assert set(k.name for k in rec.layers) == set(probe.modules)  # the middle layer too
    for name in NAMES:
        calls = main_pass_calls(probe, name)
        calls = calls[-1:] if steps == "last" else calls
        want = torch.stack([per_head(c, grid_for((16, 16), c.x.shape[1])) for c in calls]).mean(0)
        torch.testing.assert_close(rec.layers[LayerKey.parse(name)].double(), want, **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("steps", ["last", "mean"])
def test_several_positive_entries_count_the_same_however_batched(tiny, sd2, steps, monkeypatch):
    pos, neg = tiny.conditioning("SD2")
    pos2, _ = tiny.conditioning("SD2", seed=11)
    both = nodes.ConditioningCombine().combine(pos, pos2)[0]
    patched, live = recorder.attach_recorder(sd2, steps=steps)
    with AttentionProbe(patched) as probe:
        got = tiny.sample(patched, both, neg, latent_hw=(6, 6), steps=2, seed=4)
    batched = live.snapshot(got)
    calls = probe.calls["output.11.0"]
    assert sorted(calls[-1].cond_or_uncond) == [0, 0, 1]  # both entries in one call
    for name in NAMES:
        calls = probe.calls[name][-1:] if steps == "last" else probe.calls[name]
        want = torch.stack([entries_mean(c, grid_for((6, 6), c.x.shape[1])) for c in calls]).mean(0)
        torch.testing.assert_close(batched.layers[LayerKey.parse(name)].double(), want, **TOL)
    monkeypatch.setattr(sd2.model, "memory_required", lambda *a, **k: 1e30)  # short of memory: one call each
    patched, live = recorder.attach_recorder(sd2, steps=steps)
    with AttentionProbe(patched) as probe:
        got2 = tiny.sample(patched, both, neg, latent_hw=(6, 6), steps=2, seed=4)
    torch.testing.assert_close(got2, got, rtol=1e-4, atol=1e-2)  # ComfyUI's own batching rounds differently
    assert all(len(c.cond_or_uncond) == 1 for c in probe.calls["output.11.0"])
    separate = live.snapshot(got2)
    for key, t in batched.layers.items():
        torch.testing.assert_close(separate.layers[key].double(), t.double(), **TOL)


def test_area_only_conditioning_says_so(tiny, sd2):
    pos, neg = tiny.conditioning("SD2")
    area = nodes.ConditioningSetArea().append(pos, 40, 32, 8, 8, 1.0)[0]
    patched, live = recorder.attach_recorder(sd2)
    got = tiny.sample(patched, area, neg, latent_hw=(6, 10), steps=2, seed=4)
    with pytest.raises(ValueError, match=r"^recording: the sampling run recorded nothing: branch: the 'cond' conditioning "
                                         r"covered only part of the image.*whole image"):
        live.snapshot(got)


def test_an_area_entry_beside_a_whole_image_entry_is_left_out_with_one_line(tiny, sd2, caplog):
    """Regional prompting (ConditioningSetArea combined with a prompt for the whole image): every layer
    is recorded from the whole-image entry, and the log says once that the crop's calls are left out
    (it said 'not recording <layer>' for every one of the layers it recorded)."""
    pos, neg = tiny.conditioning("SD2")
    other, _ = tiny.conditioning("SD2", seed=7)
    both = nodes.ConditioningCombine().combine(pos, nodes.ConditioningSetArea().append(other, 40, 32, 8, 8, 1.0)[0])[0]
    patched, live = recorder.attach_recorder(sd2)
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        got = tiny.sample(patched, both, neg, latent_hw=(6, 10), steps=2, seed=4)
    assert len(live.snapshot(got).layers) == len(live.layers)
    lines = [r.getMessage() for r in caplog.records if "crop" in r.getMessage()]
    assert lines == ["HeadSeg: not recording the model calls on a 4x5 crop of the 6x10 latent (a conditioning entry "
                     "limited to an area: ConditioningSetArea, or a mask with 'set_cond_area: mask bounds'); the "
                     "recording holds the entries on the whole image"], lines


def test_guider_with_three_conditionings_is_refused(tiny, sd2):
    pos, neg = tiny.conditioning("SD2")
    middle, _ = tiny.conditioning("SD2", seed=7)
    patched, live = recorder.attach_recorder(sd2)
    guider = nodes_custom_sampler.Guider_DualCFG(patched)
    guider.set_conds(pos, middle, neg)
    guider.set_cfg(5.0, 3.0, nested=False)
    sigmas = comfy.samplers.calculate_sigmas(sd2.get_model_object("model_sampling"), "normal", 2)
    latent = torch.zeros(1, 4, 6, 6)
    with torch.inference_mode():
        out = guider.sample(comfy.sample.prepare_noise(latent, 1), latent, comfy.samplers.sampler_object("euler"),
                            sigmas, seed=1, disable_pbar=True)
    with pytest.raises(ValueError, match=r"branch: this guider passes more than two conditionings.*DualCFGGuider"):
        live.snapshot(out)


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")  # ComfyUI's dpm_fast itself
def test_last_step_never_evaluated_says_which_sigmas_ran(tiny, sd2):
    pos, neg = tiny.conditioning("SD2")
    patched, live = recorder.attach_recorder(sd2)
    got = tiny.sample(patched, pos, neg, latent_hw=(5, 7), steps=3, seed=1, sampler_name="dpm_fast")
    with pytest.raises(ValueError, match=r"steps: 'last' is step 2 .* only down to sigma .*dpm_fast.*'mean'"):
        live.snapshot(got)
    patched, live = recorder.attach_recorder(sd2, steps="mean")  # what the message suggests works
    got = tiny.sample(patched, pos, neg, latent_hw=(5, 7), steps=3, seed=1, sampler_name="dpm_fast")
    assert live.snapshot(got).layers


# Samplers that choose their own sigmas, with the options of their sampler node (None: KSampler's). dpm_adaptive at
# its defaults takes 129 model evaluations of the tiny model here (its error estimate keeps the steps small: half a
# minute); with SamplerDPMAdaptative's tolerances raised it takes 12, still in steps 0 and 1 and none in step 2.
OWN_SIGMAS = {"dpm_fast": None, "dpm_adaptive": {"rtol": 2.0, "atol": 2.0, "h_init": 1.0}}


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")  # ComfyUI's dpm_fast itself
@pytest.mark.parametrize("sampler", ["dpm_fast", "dpm_adaptive"])
def test_a_step_inside_the_run_that_the_sampler_never_evaluated_says_which_sigmas_ran(tiny, sd2, sampler, caplog):
    """dpm_fast and dpm_adaptive choose their own sigmas: with 3 steps none falls in step 2. A range there
    is inside the run (it said 'range 2 selected but the sampler ran 3 steps (0-2): choose steps within
    them, or 'last'', and 'last' fails the same way), and a range reaching it blamed a timestep range."""
    pos, neg = tiny.conditioning("SD2")
    patched, live = recorder.attach_recorder(sd2, steps="2")
    got = tiny.sample(patched, pos, neg, latent_hw=(5, 7), steps=3, seed=1, sampler_name=sampler,
                      sampler_options=OWN_SIGMAS[sampler])
    with pytest.raises(ValueError, match=r"steps: range 2 selected, but the sampler evaluated the model only down "
                                         r"to sigma [0-9.]+ \(in step 1 of its steps 0-2; samplers such as dpm_fast "
                                         r"and dpm_adaptive choose their own sigmas, .*LazyCache.*\): choose steps up "
                                         r"to 1, or 'mean'"):
        live.snapshot(got)
    patched, live = recorder.attach_recorder(sd2, steps="0-2")
    with caplog.at_level("WARNING", logger="HeadSeg"):
        got = tiny.sample(patched, pos, neg, latent_hw=(5, 7), steps=3, seed=1, sampler_name=sampler,
                          sampler_options=OWN_SIGMAS[sampler])
    assert live.snapshot(got).steps == "0-1"  # the steps the message suggests
    assert "at none of the sigmas of step(s) 2 (samplers such as dpm_fast" in caplog.text
    assert "timestep range" not in caplog.text


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")  # ComfyUI's dpm_fast itself
@pytest.mark.parametrize("sampler", ["dpm_fast", "dpm_adaptive"])
def test_a_range_past_the_run_of_a_sampler_that_never_reaches_its_last_step_suggests_steps_it_ran(tiny, sd2, sampler):
    """dpm_fast and dpm_adaptive choose their own sigmas: with 3 steps none falls in step 2. A range past the
    run said 'choose steps within them, or 'last'', and 'last' records nothing under them either; the
    message for 'last' itself said 'choose steps 'mean' or a range' where the others name the steps."""
    pos, neg = tiny.conditioning("SD2")
    own = (r"samplers such as dpm_fast and dpm_adaptive choose their own sigmas, .*LazyCache.*\): choose steps up to "
           r"1, or 'mean'$")
    for steps, said in (("5", r"range 5 selected but the sampler ran 3 steps \(0-2\) and evaluated the model only "
                               r"down to sigma [0-9.]+ \(in step 1; "),
                        ("last", r"'last' is step 2 \(sigma at most [0-9.]+\), but the sampler evaluated the model "
                                 r"only down to sigma [0-9.]+ \(in step 1 of its steps 0-2; ")):
        patched, live = recorder.attach_recorder(sd2, steps=steps)
        got = tiny.sample(patched, pos, neg, latent_hw=(5, 7), steps=3, seed=1, sampler_name=sampler,
                          sampler_options=OWN_SIGMAS[sampler])
        with pytest.raises(ValueError, match=rf"^recording: the sampling run recorded nothing: steps: {said}{own}"):
            live.snapshot(got)
    patched, live = recorder.attach_recorder(sd2, steps="0-1")  # what the messages suggest works
    got = tiny.sample(patched, pos, neg, latent_hw=(5, 7), steps=3, seed=1, sampler_name=sampler,
                      sampler_options=OWN_SIGMAS[sampler])
    assert live.snapshot(got).steps == "0-1"


def test_a_range_past_the_run_of_a_branch_ended_by_its_timestep_range_suggests_steps_it_ran(tiny, sd2):
    """The positive prompt's timestep range ends it at step 4 of 10 (the uncond pass runs every step): a
    range past the run suggested 'last', where the 'cond' branch did not run either."""
    import nodes

    pos, neg = tiny.conditioning("SD2")
    early = nodes.ConditioningSetTimestepRange().set_range(pos, 0.0, 0.5)[0]
    for steps in ("12", "last"):
        model, live = recorder.attach_recorder(sd2, steps=steps)
        got = tiny.sample(model, early, neg, latent_hw=(8, 8), steps=10, seed=2, cfg=5.0)
        with pytest.raises(ValueError) as err:
            live.snapshot(got)
        assert "timestep range" in str(err.value) and "up to 4" in str(err.value), str(err.value)
        assert "'last'" not in str(err.value).split("choose")[-1], str(err.value)


def test_pag_keeps_its_effect_when_nothing_is_being_recorded(tiny, sd2, monkeypatch):
    """Dropped recording, or a recording that failed part-way: the sampled image is still PAG's."""
    import gc

    pos, neg = tiny.conditioning("SD2")
    want = tiny.sample(pag(sd2), pos, neg, latent_hw=(16, 16), steps=2, seed=2)
    patched, live = recorder.attach_recorder(sd2)
    model = pag(patched)
    del live
    gc.collect()
    assert (tiny.sample(model, pos, neg, latent_hw=(16, 16), steps=2, seed=2) - want).abs().max() <= 1e-5
    patched, live = recorder.attach_recorder(sd2)
    calls = []

    def fails_on_the_third_call(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("planted failure")
        return real(self, *args, **kwargs)

    real = recorder._Store.observe
    monkeypatch.setattr(recorder._Store, "observe", fails_on_the_third_call)
    got = tiny.sample(pag(patched), pos, neg, latent_hw=(16, 16), steps=2, seed=2)
    assert (got - want).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="planted failure"):
        live.snapshot(got)


def test_block_number_patch_object_survives_later_clones(tiny, sd2):
    """A (block, number) patch that is a callable object is deep-copied by every later clone: it must
    still count as the patch the record node chained, so the layer stays recorded."""
    import comfy.ldm.modules.attention as comfy_attention

    class PlainAttention:
        def __call__(self, q, k, v, extra_options):
            return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"])

    base = sd2.clone()
    base.set_model_attn1_replace(PlainAttention(), "middle", 0)
    pos, neg = tiny.conditioning("SD2")
    want = tiny.sample(base, pos, neg, latent_hw=(16, 16), steps=2, seed=2)
    patched, live = recorder.attach_recorder(base)
    for model in (patched, patched.clone(), patched.clone().clone()):
        got = tiny.sample(model, pos, neg, latent_hw=(16, 16), steps=2, seed=2)
        assert (got - want).abs().max() <= 1e-5
        assert LayerKey.parse("middle.0.0") in live.snapshot(got).layers


def test_two_record_nodes_over_a_block_number_patch_both_record_its_layer(tiny, sd2):
    """A (block, number) patch set before two record nodes in a row: the second record node keeps the
    first one's note of the patch it stands in for, so neither takes it for a patch added after it (which
    would leave the layer unrecorded in both)."""
    import comfy.ldm.modules.attention as comfy_attention

    def plain_attention(q, k, v, extra_options):
        return comfy_attention.optimized_attention(q, k, v, extra_options["n_heads"])

    base = sd2.clone()
    base.set_model_attn1_replace(plain_attention, "middle", 0)  # the (block, number) key: every depth
    pos, neg = tiny.conditioning("SD2")
    want = tiny.sample(base, pos, neg, latent_hw=(16, 16), steps=2, seed=2)
    first, first_live = recorder.attach_recorder(base)
    second, second_live = recorder.attach_recorder(first)
    got = tiny.sample(second, pos, neg, latent_hw=(16, 16), steps=2, seed=2)
    assert (got - want).abs().max() <= 1e-5
    middle = LayerKey.parse("middle.0.0")
    a, b = first_live.snapshot(got).layers, second_live.snapshot(got).layers
    assert middle in a and middle in b
    assert torch.equal(a[middle], b[middle])


@pytest.mark.parametrize("branch", ["cond", "uncond"])
def test_cfg_run_as_two_calls_records_both_branches(tiny, sd2, branch):
    """A sampler_calc_cond_batch_function may run [cond, None] and [None, uncond] as two calls (ComfyUI's
    SkipLayerGuidanceDiTSimple does): both are the main pass."""
    def split(args):
        cond, uncond = args["conds"]
        model, x, sigma, options = args["model"], args["input"], args["sigma"], args["model_options"]
        if uncond is None:
            return comfy.samplers.calc_cond_batch(model, [cond, None], x, sigma, options)
        cond_out, _ = comfy.samplers.calc_cond_batch(model, [cond, None], x, sigma, options)
        _, uncond_out = comfy.samplers.calc_cond_batch(model, [None, uncond], x, sigma, options)
        return [cond_out, uncond_out]

    base = sd2.clone()
    base.set_model_sampler_calc_cond_batch_function(split)
    patched, live = recorder.attach_recorder(base, branch=branch)
    pos, neg = tiny.conditioning("SD2")
    with AttentionProbe(patched) as probe:
        got = tiny.sample(patched, pos, neg, latent_hw=(8, 8), steps=2, seed=2)
    rec = live.snapshot(got)
    b = recorder.BRANCHES[branch]
    for name in NAMES:
        call = [c for c in probe.calls[name] if c.cond_or_uncond == [b]][-1]
        want = per_head(call, grid_for((8, 8), call.x.shape[1]), b)
        torch.testing.assert_close(rec.layers[LayerKey.parse(name)].double(), want, **TOL)


def test_direct_model_call_after_cfg_is_not_recorded(tiny, sd2):
    """A post-CFG function that calls the model directly (no calc_cond_batch) is an extra pass too."""
    def extra_pass(args):
        model, x, sigma = args["model"], args["input"], args["sigma"]
        context = args["cond"][0]["model_conds"]["c_crossattn"].cond.to(x)
        options = dict(args["model_options"].get("transformer_options", {}))
        options.update(cond_or_uncond=[0], sigmas=sigma)
        model.apply_model(x * 0.5, sigma, c_crossattn=context, transformer_options=options)
        return args["denoised"]

    base = sd2.clone()
    base.set_model_sampler_post_cfg_function(extra_pass)
    pos, neg = tiny.conditioning("SD2")
    with_extra, live = recorder.attach_recorder(base)
    got = tiny.sample(with_extra, pos, neg, latent_hw=(8, 8), steps=2, seed=2)
    without, live2 = recorder.attach_recorder(sd2)
    got2 = tiny.sample(without, pos, neg, latent_hw=(8, 8), steps=2, seed=2)
    assert torch.equal(got, got2)
    a, b = live.snapshot(got), live2.snapshot(got2)
    for key, t in b.layers.items():
        assert torch.equal(a.layers[key], t), key.name


def test_context_windows_are_refused_by_name(tiny, sd2):
    from comfy_extras.nodes_context_windows import ContextWindowsManualNode

    pos, neg = tiny.conditioning("SD2")
    patched, live = recorder.attach_recorder(sd2)
    windowed = ContextWindowsManualNode.execute(patched, 2, 1, "standard_static", 1, False, "pyramid", 0).result[0]
    plain = tiny.sample(sd2, pos, neg, latent_hw=(6, 6), batch=3, steps=2, seed=4)
    got = tiny.sample(windowed, pos, neg, latent_hw=(6, 6), batch=3, steps=2, seed=4)
    assert got.shape == plain.shape  # sampling itself goes on
    with pytest.raises(ValueError, match=r"^recording: the sampling run recorded nothing: context windows \(Context "
                                         r"Windows node\) run the model on windows of the latent batch"):
        live.snapshot(got)
