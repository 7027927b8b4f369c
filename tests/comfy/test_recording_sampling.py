"""Recording through ComfyUI's real sampler against an independent float64 recomputation per layer."""

import copy
import logging
import os

import pytest
import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.samplers

from headseg.nodes import live_recording, recorder, recorder_store, run_history, step_selection, step_tracker
from headseg.nodes.core.recording import LayerKey, Recording

from .reference import AttentionProbe, grid_for, per_head, reference, self_attention_modules

TOL = dict(rtol=3e-3, atol=3e-3)  # recorded float16 against float64
POSITIONS = ("down", "middle", "up")


@pytest.fixture(scope="module")
def sd2(tiny):
    return tiny.build("SD2", seed=0)


def run(tiny, model, layout="SD2", latent_hw=(8, 8), batch=1, **kwargs):
    pos, neg = tiny.conditioning(layout, batch=1)
    return tiny.sample(model, pos, neg, latent_hw=latent_hw, batch=batch, **kwargs)


def assert_matches(rec, probe, latent_hw, steps="last", branch=0, sigmas=None, names=None):
    names = names or [k.name for k in rec.layers]
    for name in names:
        got = rec.layers[LayerKey.parse(name)]
        assert got.dtype == torch.float16 and got.device.type == "cpu"
        want = reference(probe, name, latent_hw, steps, branch, sigmas)
        assert got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("layout,latent_hw", [("SD2", (8, 8)), ("SD2", (8, 12)), ("SD15", (12, 8)), ("SDXL", (8, 12))])
def test_recorded_heads_equal_recomputation_from_layer_weights(tiny, layout, latent_hw):
    model = tiny.build(layout, seed=3)
    patched, live = recorder.attach_recorder(model)
    with AttentionProbe(patched) as probe:
        run(tiny, patched, layout, latent_hw)
    rec = live.snapshot()
    assert set(k.name for k in rec.layers) == set(probe.modules)
    assert rec.image_size == (latent_hw[0] * 8, latent_hw[1] * 8)
    assert (rec.steps, rec.branch) == ("last", "cond")
    assert all(rec.grid_level(layer.key) == layer.level for layer in live.layers)  # levels read from the UNet
    assert_matches(rec, probe, latent_hw)
    # the planted check is not vacuous: attention is far from uniform and heads differ
    t = rec.layers[LayerKey.parse(next(iter(probe.modules)))].float()
    assert (t[:, 0] - t[:, 1]).abs().max() > 1e-2


def test_fp16_model_records_fp16_matching_recomputation(tiny):
    model = tiny.build("SD2", seed=4, dtype=torch.float16)
    patched, live = recorder.attach_recorder(model)
    with AttentionProbe(patched) as probe:
        run(tiny, patched, "SD2", (8, 8), steps=2)
    rec = live.snapshot()
    for name in ("input.1.0", "middle.0.0", "output.11.0"):
        got = rec.layers[LayerKey.parse(name)].double()
        want = reference(probe, name, (8, 8))
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_recording_does_not_change_the_sampled_latent(tiny, sd2):
    plain = run(tiny, sd2, latent_hw=(8, 12), seed=7)
    patched, live = recorder.attach_recorder(sd2, steps="mean")
    recorded = run(tiny, patched, latent_hw=(8, 12), seed=7)
    assert live.runs == 1
    assert (plain - recorded).abs().max().item() <= 1e-4


def test_a_patched_model_whose_recording_was_dropped_samples_as_before(tiny, sd2):
    """The store lives as long as the RECORDING output: a MODEL clone that outlives it (a LoRA node's
    output still cached after ComfyUI dropped the record node's) samples normally and records nothing."""
    import gc

    plain = run(tiny, sd2, latent_hw=(8, 12), seed=7)
    patched, live = recorder.attach_recorder(sd2)
    store_id = live.store_id
    del live
    gc.collect()
    assert recorder._REGISTRY.get(store_id) is None
    got = run(tiny, patched.clone(), latent_hw=(8, 12), seed=7)
    assert isinstance(got, torch.Tensor) and (plain - got).abs().max().item() <= 1e-4


def test_mean_never_asks_which_step_a_call_is(tiny, sd2, monkeypatch):
    """Reading a call's sigma waits for the GPU: 'mean' records every step, so it must not ask; 'last'
    asks at every model call."""
    asked = []
    step_of = step_tracker.StepTracker._step_of
    monkeypatch.setattr(step_tracker.StepTracker, "_step_of", lambda self, o: asked.append(1) or step_of(self, o))
    patched, live = recorder.attach_recorder(sd2, steps="mean")
    with AttentionProbe(patched) as probe:
        run(tiny, patched, latent_hw=(8, 8), steps=3)
    assert not asked
    assert_matches(live.snapshot(), probe, (8, 8), steps="mean")
    patched, live = recorder.attach_recorder(sd2, steps="last")
    run(tiny, patched, latent_hw=(8, 8), steps=3)
    assert len(asked) >= 3 * len(live.layers)


def _count_sigma_reads(monkeypatch) -> list:
    reads = []
    read = step_tracker._sigma_value
    monkeypatch.setattr(step_tracker, "_sigma_value", lambda sig: reads.append(1) or read(sig))
    return reads


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "heun", "dpm_2", "dpmpp_2m", "lcm", "uni_pc"])
def test_last_reads_the_sigma_only_near_the_end_of_samplers_that_report_steps(tiny, sd2, sampler, monkeypatch):
    """Reading a call's sigma waits for the GPU. k-diffusion's samplers report each step after its
    evaluations, so 'last' reads only the sigmas of the last steps' calls (and of second-order
    correctors); others (UniPC) are read at every model call. The recording is the same either way."""
    reads = _count_sigma_reads(monkeypatch)
    steps_seen = []
    patched, live = recorder.attach_recorder(sd2, steps="last")
    pos, neg = tiny.conditioning("SD2")
    with AttentionProbe(patched) as probe:
        tiny.sample(patched, pos, neg, latent_hw=(8, 8), steps=8, sampler_name=sampler,
                    callback=lambda step, x0, x, total: steps_seen.append(step))
    assert_matches(live.snapshot(), probe, (8, 8), steps="last")
    assert steps_seen == list(range(8)) or sampler == "uni_pc"  # the callback given still hears every step
    evaluations = len(probe.branch_calls("input.1.0", 0))
    if sampler == "uni_pc":
        assert len(reads) == evaluations
    else:
        assert 2 <= len(reads) <= evaluations - 4, (len(reads), evaluations)


def test_a_sampler_run_without_a_callback_still_reports_its_steps(tiny, sd2, monkeypatch):
    reads = _count_sigma_reads(monkeypatch)
    patched, live = recorder.attach_recorder(sd2, steps="last")
    with AttentionProbe(patched) as probe:
        run(tiny, patched, latent_hw=(8, 8), steps=8)  # comfy.sample.sample with no callback
    assert_matches(live.snapshot(), probe, (8, 8), steps="last")
    assert len(reads) <= 4


def _recorded_or_message(live):
    try:
        rec = live.snapshot()
    except ValueError as exc:
        return str(exc)
    return {k.name: v for k, v in rec.layers.items()}


def _same(a, b):
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sigmas", ["flipped", "rising_again"])
def test_last_on_a_schedule_that_rises_records_what_reading_every_sigma_records(tiny, sd2, sigmas, monkeypatch):
    """FlipSigmas (unsampling) gives an ascending schedule; a hand-made one may rise again. A call the
    step reports place early can then be one that reading its sigma files under 'last'."""
    import comfy_extras.nodes_custom_sampler as custom

    schedule = comfy.samplers.calculate_sigmas(sd2.get_model_object("model_sampling"), "normal", 6)
    if sigmas == "flipped":
        schedule = custom.FlipSigmas().get_sigmas(schedule)[0]
    else:
        schedule = torch.tensor([14.6, 5.0, 1.0, 10.0, 2.0, 0.0])
    pos, neg = tiny.conditioning("SD2")
    got = []
    for reports in (True, False):
        if not reports:
            monkeypatch.setattr(recorder, "_reports_schedule_steps", lambda sampler: False)
        patched, live = recorder.attach_recorder(sd2, steps="last")
        tiny.sample(patched, pos, neg, latent_hw=(8, 8), steps=len(schedule) - 1, sigmas=schedule.clone())
        got.append(_recorded_or_message(live))
    assert _same(*got), got


@pytest.mark.parametrize("steps", ["last", "0", "1-2", "mean"])
def test_an_ascending_schedule_records_the_steps_asked(tiny, sd2, steps):
    """FlipSigmas' ascending schedule (unsampling a photo): step i evaluates the model at sigmas[i], on
    its way up to sigmas[i + 1]. Steps read from the sigma must follow the schedule upwards ('last' held
    step 1's call and '0' recorded nothing, every call above sigmas[1] being counted as step 0)."""
    import comfy_extras.nodes_custom_sampler as custom

    schedule = comfy.samplers.calculate_sigmas(sd2.get_model_object("model_sampling"), "normal", 4)
    schedule = custom.FlipSigmas().get_sigmas(schedule)[0]
    patched, live = recorder.attach_recorder(sd2, steps=steps)
    with AttentionProbe(patched) as probe:
        latent = run(tiny, patched, latent_hw=(8, 8), steps=4, sigmas=schedule.clone())
    rec = live.snapshot(latent)
    assert rec.steps == steps
    assert_matches(rec, probe, (8, 8), steps=steps, sigmas=schedule.tolist(), names=["input.1.0", "output.11.0"])


def _calls_of_steps(probe, name, latent_hw, steps, n_steps):
    """Reference for a first-order sampler (one model call per step): 'last' = the last call, 'A-B' = the
    mean of calls A..B in the order they ran, whatever their sigma."""
    calls = probe.branch_calls(name, 0)
    assert len(calls) == n_steps, (name, len(calls))
    first, _, last = (str(n_steps - 1) if steps == "last" else steps).partition("-")
    picked = calls[int(first) : int(last or first) + 1]
    grid = grid_for(latent_hw, calls[0].x.shape[1])
    return torch.stack([per_head(c, grid) for c in picked]).mean(0)


@pytest.mark.parametrize("steps", ["0", "1", "0-1", "2", "last"])
def test_a_repeated_sigma_counts_as_two_steps(tiny, sd2, steps, caplog):
    """The `simple` scheduler at a denoise below steps / 1000 repeats a sigma: [s, s, s, 0] at 3 steps and
    denoise 0.001. Each step is still one model call at s; steps 0 and 1 were both counted as step 2, so
    '0' or '1' recorded nothing and blamed a cache node, and '0-1' did too."""
    schedule = comfy.samplers.calculate_sigmas(sd2.get_model_object("model_sampling"), "simple", 3000)[-4:]
    assert schedule[0] == schedule[1] == schedule[2] > 0  # what KSampler samples at denoise 0.001
    patched, live = recorder.attach_recorder(sd2, steps=steps)
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        with AttentionProbe(patched) as probe:
            # lcm renoises at every step, so that the three calls at s differ
            latent = run(tiny, patched, steps=3, scheduler="simple", denoise=0.001, sampler_name="lcm")
    rec = live.snapshot(latent)
    assert rec.steps == steps
    assert "HeadSeg" not in caplog.text
    for name in ("input.1.0", "output.11.0"):
        want = _calls_of_steps(probe, name, (8, 8), steps, 3)
        torch.testing.assert_close(rec.layers[LayerKey.parse(name)].double(), want, **TOL)


@pytest.mark.parametrize("sampler", ["euler", "uni_pc"])
@pytest.mark.parametrize("steps", ["last", "1", "3", "2-4"])
def test_a_schedule_that_goes_back_up_numbers_its_steps_in_order(tiny, sd2, sampler, steps):
    """A hand-made schedule that restarts (SamplerCustom with sigmas that fall, rise and fall again) holds
    the sigmas of later steps in earlier steps too: step 3's call at 10 was counted as step 0 and step
    4's at 2 as step 1, so 'last' recorded nothing (the sampler 'never reached' step 4)."""
    schedule = torch.tensor([14.6, 5.0, 1.0, 10.0, 2.0, 0.0])
    patched, live = recorder.attach_recorder(sd2, steps=steps)
    with AttentionProbe(patched) as probe:
        latent = run(tiny, patched, steps=5, sigmas=schedule.clone(), sampler_name=sampler)
    rec = live.snapshot(latent)
    assert rec.steps == steps
    for name in ("input.1.0", "middle.0.0"):
        want = _calls_of_steps(probe, name, (8, 8), steps, 5)
        torch.testing.assert_close(rec.layers[LayerKey.parse(name)].double(), want, **TOL)


@pytest.mark.filterwarnings("ignore:Should have tb<=t1")  # torchsde's, under ComfyUI's dpmpp_sde
@pytest.mark.parametrize("sampler", ["dpmpp_sde", "sa_solver_pece", "seeds_3"])
def test_a_branch_ended_early_names_its_last_step_under_a_corrector_sampler(tiny, sd2, sampler):
    """These samplers evaluate again within step i after reporting it: the message must name the step
    the branch was last called at (the one a range can still record), not the step after."""
    import nodes as comfy_nodes

    pos, neg = tiny.conditioning("SD2")
    early = comfy_nodes.ConditioningSetTimestepRange().set_range(pos, 0.0, 0.5)[0]
    patched, live = recorder.attach_recorder(sd2, steps="last")
    tiny.sample(patched, early, neg, latent_hw=(8, 8), steps=8, sampler_name=sampler)
    with pytest.raises(ValueError, match=r"its model calls stopped at step (\d+)") as info:
        live.snapshot()
    stopped = int(info.value.args[0].split("stopped at step ")[1].split(" ")[0])
    patched, live = recorder.attach_recorder(sd2, steps=str(stopped))  # what the message advises
    tiny.sample(patched, early, neg, latent_hw=(8, 8), steps=8, sampler_name=sampler)
    assert live.snapshot().steps == str(stopped)


@pytest.mark.parametrize("layout", ["batched", "cfg1", "separate"])
def test_cfg_layouts_record_the_cond_chunk(tiny, sd2, layout, monkeypatch):
    cfg = 1.0 if layout == "cfg1" else 5.0
    if layout == "separate":  # low free memory: ComfyUI runs cond and uncond as separate model calls
        monkeypatch.setattr(sd2.model, "memory_required", lambda *a, **k: 1e30)
    patched, live = recorder.attach_recorder(sd2)
    with AttentionProbe(patched) as probe:
        run(tiny, patched, latent_hw=(8, 8), cfg=cfg)
    layouts = {tuple(c.cond_or_uncond) for c in probe.calls["input.1.0"]}
    expected = {"batched": lambda s: any(len(x) == 2 for x in s), "cfg1": lambda s: s == {(0,)},
                "separate": lambda s: s == {(0,), (1,)}}
    assert expected[layout](layouts), layouts
    assert_matches(live.snapshot(), probe, (8, 8))


def test_uncond_branch_and_cfg1_without_uncond(tiny, sd2):
    patched, live = recorder.attach_recorder(sd2, branch="uncond")
    with AttentionProbe(patched) as probe:
        run(tiny, patched, latent_hw=(8, 8), cfg=5.0)
    rec = live.snapshot()
    assert rec.branch == "uncond"
    assert_matches(rec, probe, (8, 8), branch=1)
    run(tiny, patched, latent_hw=(8, 8), cfg=1.0)  # ComfyUI skips the uncond pass at cfg = 1
    with pytest.raises(ValueError, match="^recording: the sampling run recorded nothing: branch: .*cfg = 1.*'cond'"):
        live.snapshot()


def test_batch_of_two(tiny, sd2):
    patched, live = recorder.attach_recorder(sd2)
    with AttentionProbe(patched) as probe:
        run(tiny, patched, latent_hw=(8, 12), batch=2)
    rec = live.snapshot()
    assert rec.batch_size == 2
    assert_matches(rec, probe, (8, 12))
    first = rec.layers[LayerKey.parse("input.1.0")]
    assert (first[0].float() - first[1].float()).abs().max() > 1e-3  # two different images


@pytest.mark.parametrize("steps", ["mean", "1-2", "0"])
def test_step_selection(tiny, sd2, steps):
    patched, live = recorder.attach_recorder(sd2, steps=steps)
    with AttentionProbe(patched) as probe:
        run(tiny, patched, latent_hw=(8, 8), steps=3)
    sigmas = comfy.samplers.calculate_sigmas(sd2.get_model_object("model_sampling"), "normal", 3).tolist()
    rec = live.snapshot()
    assert rec.steps == steps
    assert_matches(rec, probe, (8, 8), steps=steps, sigmas=sigmas)


def test_last_step_of_a_second_order_sampler(tiny, sd2):
    patched, live = recorder.attach_recorder(sd2)
    with AttentionProbe(patched) as probe:
        run(tiny, patched, latent_hw=(8, 8), steps=3, sampler_name="heun")
    assert len(probe.calls["input.1.0"]) == 5  # heun: 2 evaluations per step, Euler on the last
    assert_matches(live.snapshot(), probe, (8, 8))


def test_last_of_a_schedule_that_ends_above_zero_is_its_final_corrector(tiny, sd2):
    """SplitSigmas' high_sigmas ends above sigma 0, so heun's last step has a corrector, run at the
    schedule's final sigma (in no step's open interval): 'last' holds that call, the run's last one, not
    the predictor before it nor a mix of the two."""
    schedule = comfy.samplers.calculate_sigmas(sd2.get_model_object("model_sampling"), "normal", 4)[:3]
    patched, live = recorder.attach_recorder(sd2, steps="last")
    pos, neg = tiny.conditioning("SD2")
    with AttentionProbe(patched) as probe:
        tiny.sample(patched, pos, neg, latent_hw=(8, 8), steps=2, sampler_name="heun", sigmas=schedule.clone())
    calls = probe.branch_calls("input.1.0")
    assert len(calls) == 4 and abs(calls[-1].sigma - float(schedule[-1])) <= 1e-5 * float(schedule[-1])
    assert_matches(live.snapshot(), probe, (8, 8))  # reference: the last call


def test_range_beyond_the_run_explains(tiny, sd2):
    patched, live = recorder.attach_recorder(sd2, steps="5-9")
    run(tiny, patched, latent_hw=(8, 8), steps=3)
    with pytest.raises(ValueError, match="^recording: the sampling run recorded nothing: steps: range 5-9 .* ran 3 steps"):
        live.snapshot()


def test_each_run_starts_a_fresh_recording(tiny, sd2):
    patched, live = recorder.attach_recorder(sd2)
    with pytest.raises(ValueError, match="nothing recorded yet"):
        live.snapshot()
    run(tiny, patched, latent_hw=(8, 8), seed=1)
    first = live.snapshot()
    with AttentionProbe(patched) as probe:
        run(tiny, patched, latent_hw=(8, 12), seed=2)
    second = live.snapshot()
    assert live.runs == 2
    assert first.image_size == (64, 64) and second.image_size == (64, 96)
    assert_matches(second, probe, (8, 12))
    assert first.layers[LayerKey.parse("input.1.0")].shape[2:4] == (8, 8)  # the old snapshot is untouched


def test_survives_later_clones_lora_and_output_block_patch(tiny, sd2):
    patched, live = recorder.attach_recorder(sd2)
    run(tiny, patched, latent_hw=(8, 8), seed=3)
    before = live.snapshot().layers[LayerKey.parse("output.9.0")]

    later = patched.clone()  # what a LoRA loader does, then adds weight patches
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    w = sd2.model.state_dict()[key]
    later.add_patches({key: (torch.full_like(w, 0.05),)}, strength_patch=1.0)
    later = later.clone()  # what FreeU does, then an output block patch
    later.set_model_output_block_patch(lambda h, hsp, opts: (h * 1.1, hsp))
    with AttentionProbe(later) as probe:
        run(tiny, later, latent_hw=(8, 8), seed=3)
    rec = live.snapshot()
    assert live.runs == 2
    assert_matches(rec, probe, (8, 8))
    assert (rec.layers[LayerKey.parse("output.9.0")].float() - before.float()).abs().max() > 1e-3


def test_chains_an_existing_attn1_patch(tiny, sd2):
    seen = {"calls": 0}

    def other(q, k, v, extra_options):  # another pack's attn1 replace: changes the attention output
        seen["calls"] += 1
        heads = extra_options["n_heads"]
        out = comfy_attention.optimized_attention(q, k, v, heads, attn_precision=extra_options["attn_precision"])
        return 0.5 * out + 0.1

    others = sd2.clone()
    others.set_model_attn1_replace(other, "input", 1, 0)  # full key
    others.set_model_attn1_replace(other, "middle", 0)  # ComfyUI's (block, number) fallback key
    plain = run(tiny, sd2, latent_hw=(8, 8), seed=5)
    expected = run(tiny, others, latent_hw=(8, 8), seed=5)
    assert (plain - expected).abs().max() > 1e-3  # the other patch matters
    calls_alone = seen["calls"]

    patched, live = recorder.attach_recorder(others)
    with AttentionProbe(patched) as probe:
        got = run(tiny, patched, latent_hw=(8, 8), seed=5)
    assert seen["calls"] == 2 * calls_alone  # still called, once per layer call
    assert (got - expected).abs().max().item() <= 1e-4  # its output is what the model gets
    rec = live.snapshot()
    for name in ("input.1.0", "middle.0.0"):  # recorded = what the other patch returned
        want = 0.5 * reference(probe, name, (8, 8)) + 0.1
        torch.testing.assert_close(rec.layers[LayerKey.parse(name)].double(), want, **TOL)
    assert_matches(rec, probe, (8, 8), names=["input.2.0", "output.11.0"])


def _tiled(model, tiles):
    """A clone of ``model`` with a HyperTile-like attn1 patch: the token rows of the self-attention
    calls whose token count N passes tiles(N) are split into 2 tiles (and joined again after)."""

    def tile(n, context, value, extra_options):
        B, N, C = n.shape
        extra_options["tiled"] = tiles(N)
        if not extra_options["tiled"]:
            return n, context, value
        return n.reshape(B * 2, N // 2, C), context.reshape(B * 2, N // 2, C), value.reshape(B * 2, N // 2, C)

    def untile(n, extra_options):
        B2, N2, C = n.shape
        return n.reshape(B2 // 2, N2 * 2, C) if extra_options["tiled"] else n

    tiled = model.clone()
    tiled.set_model_attn1_patch(tile)
    tiled.set_model_attn1_output_patch(untile)
    return tiled


def test_token_count_changed_by_another_patch_is_skipped_with_warning(tiny, sd2, caplog):
    tiled = _tiled(sd2, lambda N: N % 2 == 0)
    patched, live = recorder.attach_recorder(tiled, positions=("down",), levels="0")
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        run(tiny, patched, latent_hw=(8, 8))
    assert "HyperTile" in caplog.text and "input.1.0" in caplog.text
    with pytest.raises(ValueError, match="token count"):
        live.snapshot()


def test_a_token_count_changed_at_some_calls_leaves_out_those_calls_and_says_so(tiny, sd2, caplog):
    """HyperTile picks its tiling at random per call (one tile, i.e. none, is one of its choices by
    default): with 'mean', the layer is recorded from the calls it left alone, and the log must not say
    that the layer is not recorded."""
    calls = []
    tiled = _tiled(sd2, lambda N: N == 64 and calls.append(N) is None and len(calls) % 2 == 0)  # every other call
    patched, live = recorder.attach_recorder(tiled, positions=("down",), levels="0", steps="mean")
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        with AttentionProbe(patched) as probe:
            latent = run(tiny, patched, latent_hw=(8, 8))
    rec = live.snapshot(latent)
    for name in ("input.1.0", "input.2.0"):
        whole = [c for c in probe.branch_calls(name) if c.x.shape[1] == 64]  # the calls left untiled
        assert 0 < len(whole) < len(probe.branch_calls(name))
        want = torch.stack([per_head(c, (8, 8)) for c in whole]).mean(0)
        torch.testing.assert_close(rec.layers[LayerKey.parse(name)].double(), want, **TOL)
    lines = sorted(r.getMessage() for r in caplog.records if "HyperTile" in r.getMessage())
    assert lines == [  # the layers are recorded: no line may say they are not
        f"HeadSeg: leaving out the calls of {name} whose token count another patch changed (such as HyperTile or "
        "ToMe): 32 tokens but a 8x8 grid" for name in ("input.1.0", "input.2.0")
    ], lines


def test_head_pca_names_the_layers_a_run_skipped(tiny, sd2, caplog):
    """A patch that changes the token count of the latent-grid layers only (as HyperTile does above a
    tile size): those layers are skipped while sampling, and Head PCA says which heads it lacks."""
    from headseg.nodes.head_pca_node import HeadPCA

    tiled = _tiled(sd2, lambda N: N == 64)  # the 8x8 latent grid: level 0
    level_0 = "input.1.0, input.2.0, output.9.0, output.10.0, output.11.0"
    patched, live = recorder.attach_recorder(tiled)
    latent = {"samples": run(tiny, patched, latent_hw=(8, 8))}
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        text = HeadPCA.execute(live, "down+up", "all", 4, latent=latent).ui["text"][0]
    assert text.endswith(f"; layer(s) {level_0} not recorded in this run (see the log): their heads are left out")
    assert f"HeadSeg Head PCA: layer(s) {level_0} not recorded" in caplog.text
    for asked in (("down", "1,2"), ("middle", "all")):  # none of the skipped layers asked for: no note
        text = HeadPCA.execute(live, asked[0], asked[1], 4, latent=latent).ui["text"][0]
        assert "not recorded" not in text, asked
    with pytest.raises(ValueError, match=r"^positions / levels: no layer left .*; layer\(s\) input.1.0, input.2.0 were "
                                         r"not recorded in this run: see the log$"):
        HeadPCA.execute(live, "down", "0", 4, latent=latent)  # only skipped layers asked for
    patched, live = recorder.attach_recorder(tiled, levels="1,2")  # level 0 not asked of the record node
    latent = {"samples": run(tiny, patched, latent_hw=(8, 8))}
    assert "not recorded" not in HeadPCA.execute(live, "down+up", "all", 4, latent=latent).ui["text"][0]


def test_positions_and_levels_select_what_is_recorded(tiny, sd2):
    patched, live = recorder.attach_recorder(sd2, positions=("down", "up"), levels="0,2")
    run(tiny, patched, latent_hw=(8, 12))
    rec = live.snapshot()
    names = {k.name for k in rec.layers}
    assert names == {"input.1.0", "input.2.0", "output.9.0", "output.10.0", "output.11.0",
                     "input.7.0", "input.8.0", "output.3.0", "output.4.0", "output.5.0"}
    assert {rec.grid_level(k) for k in rec.layers} == {0, 2}


def test_layers_found_match_the_module_tree(tiny):
    for layout in ("SD2", "SD15", "SDXL"):
        model = tiny.build(layout)
        found = recorder.find_self_attention_layers(model.get_model_object("diffusion_model"))
        modules = self_attention_modules(model.model.diffusion_model)
        assert [layer.key.name for layer in found] == list(modules)  # same set, UNet order
        for layer in found:
            assert layer.heads == modules[layer.key.name].heads


def test_blocks_whose_attn1_attends_to_the_text_are_not_recorded(tiny):
    """The SD 2.x x4 upscaler and SD-XS switch attn1 to cross-attention over the text at some levels
    (disable_self_attentions): those blocks hold no self-attention to record."""
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.ops

    config = dict(tiny.LAYOUTS["SD2"], disable_self_attentions=[True, False, False, False], num_heads=-1,
                  num_head_channels=8, operations=comfy.ops.disable_weight_init)
    found = recorder.find_self_attention_layers(openaimodel.UNetModel(**config))
    # SD2's 16 layers less the five on the latent grid (level 0: input 1, 2 and output 9, 10, 11)
    assert {layer.key.name for layer in found} == {
        "input.4.0", "input.5.0", "input.7.0", "input.8.0", "middle.0.0",
        "output.3.0", "output.4.0", "output.5.0", "output.6.0", "output.7.0", "output.8.0",
    }


def test_a_recording_error_never_breaks_sampling(tiny, sd2, monkeypatch):
    patched, live = recorder.attach_recorder(sd2)
    plain = run(tiny, sd2, latent_hw=(8, 8), seed=9)

    def broken(self, *args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(recorder._Store, "observe", broken)
    got = run(tiny, patched, latent_hw=(8, 8), seed=9)
    assert (got - plain).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="recording failed: RuntimeError: planted failure"):
        live.snapshot()


def test_a_patch_set_after_the_recorder_is_chained_at_sampling(tiny, sd2, caplog):
    """A (block, number, depth) patch set on a later clone replaces HeadSeg's own (SAG applied after the
    record node does this to the middle layer): HeadSeg runs it and records what it returns."""
    patched, live = recorder.attach_recorder(sd2)
    later = patched.clone()
    later.set_model_attn1_replace(lambda q, k, v, extra: comfy_attention.optimized_attention(q, k, v, extra["n_heads"]),
                                  "middle", 0, 0)
    plain = run(tiny, sd2, latent_hw=(8, 8))
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        with AttentionProbe(later) as probe:
            got = run(tiny, later, latent_hw=(8, 8))
    assert (got - plain).abs().max().item() <= 1e-4
    assert "not recorded" not in caplog.text
    assert_matches(live.snapshot(got), probe, (8, 8), names=["middle.0.0", "input.1.0"])


@pytest.mark.parametrize("steps", ["last", "mean"])
@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "functools.wraps"])
def test_a_later_patch_that_chains_the_recorders_own_is_recorded_once_as_it_returns(tiny, sd2, steps, wrapped):
    """A pack applied after the record node that chains the (block, number, depth) patch it replaces
    (calls HeadSeg's, then changes its output) runs HeadSeg's patch inside the one HeadSeg wraps around
    it: the recording holds what the model goes on with, not a mean of that and HeadSeg's inner output.
    functools.wraps copies the wrapped function's __dict__, so such a wrapper carried HeadSeg's markers
    and was taken for HeadSeg's own: it was not chained, and the recording held HeadSeg's inner output."""
    import functools

    patched, live = recorder.attach_recorder(sd2, steps=steps)
    later = patched.clone()
    inner = later.model_options["transformer_options"]["patches_replace"]["attn1"][("middle", 0, 0)]

    def doubled(q, k, v, extra):
        return inner(q, k, v, extra) * 2.0

    later.set_model_attn1_replace(functools.wraps(inner)(doubled) if wrapped else doubled, "middle", 0, 0)
    with AttentionProbe(later) as probe:
        got = run(tiny, later, latent_hw=(8, 8))
    rec = live.snapshot(got)
    want = reference(probe, "middle.0.0", (8, 8), steps)
    torch.testing.assert_close(rec.layers[LayerKey.parse("middle.0.0")].double(), 2.0 * want, **TOL)
    assert_matches(rec, probe, (8, 8), steps=steps, names=["input.1.0", "output.11.0"])


def test_latent_finds_its_own_run_among_the_last_ones(tiny, sd2):
    """A second sampler on the recorded MODEL (an inpainting pass) does not hide the first run: the
    sampler's output LATENT picks its run; a LATENT no kept run produced is refused, naming `latent`."""
    patched, live = recorder.attach_recorder(sd2)
    with pytest.raises(ValueError, match="^recording: nothing recorded yet.*its cache .*--cache-ram.*seed"):
        live.snapshot(torch.zeros(1, 4, 8, 8))  # no run yet: says so rather than blaming the latent,
    with pytest.raises(ValueError, match="^recording: nothing recorded yet") as no_latent:
        live.snapshot()  # and the cache is named only where a sampler's LATENT came
    assert "cache" not in str(no_latent.value)
    with AttentionProbe(patched) as probe:
        first_latent = run(tiny, patched, latent_hw=(8, 8), seed=1)
    first = live.snapshot()
    second_latent = run(tiny, patched, latent_hw=(8, 8), seed=2)
    assert not torch.equal(first_latent, second_latent)
    got = live.snapshot(first_latent)
    assert_matches(got, probe, (8, 8))
    for key, t in first.layers.items():
        assert torch.equal(got.layers[key], t)
    assert not torch.equal(live.snapshot(second_latent).layers[key], t)
    assert live.snapshot(first_latent.clone()).layers.keys() == first.layers.keys()  # values, not identity
    with pytest.raises(ValueError, match=r"^latent: this LATENT \(1x4x8x8\) is not the output of any of the last 2"):
        live.snapshot(torch.randn(1, 4, 8, 8))
    for seed in range(3, 3 + run_history.HISTORY - 1):
        run(tiny, patched, latent_hw=(8, 8), seed=seed)
    live.snapshot(second_latent)  # still kept
    newest = run(tiny, patched, latent_hw=(8, 8), seed=99)
    live.snapshot(second_latent)  # past HISTORY newer runs, but the run read last stays
    live.snapshot(newest)  # now the newest run is the one read last
    run(tiny, patched, latent_hw=(8, 8), seed=100)
    with pytest.raises(ValueError, match="^latent: "):
        live.snapshot(second_latent.clone())  # forgotten after HISTORY newer runs
    # ... except for the very tensor it was read for, while that lives (ComfyUI's cache hands it over again)
    assert live.snapshot(second_latent).layers.keys() == first.layers.keys()


def test_samplercustoms_denoised_output_finds_its_run(tiny, sd2):
    """SamplerCustom (and SamplerCustomAdvanced) give a second LATENT, denoised_output: the model's last
    prediction of the clean latent. Two-stage sampling (SplitSigmas) decodes the first stage's; read by
    Head PCA it found no run ('not the output of any of the last sampling runs')."""
    import comfy_extras.nodes_custom_sampler as custom

    schedule = comfy.samplers.calculate_sigmas(sd2.get_model_object("model_sampling"), "normal", 6)
    high, low = custom.SplitSigmas.execute(schedule, 3).result
    sampler = comfy.samplers.sampler_object("euler")
    pos, neg = tiny.conditioning("SD2")
    patched, live = recorder.attach_recorder(sd2, steps="last")
    with torch.inference_mode():
        out1, denoised1 = custom.SamplerCustom.execute(
            patched, True, 0, 5.0, pos, neg, sampler, high, {"samples": torch.zeros(1, 4, 8, 8)}).result
        out2, denoised2 = custom.SamplerCustom.execute(patched, False, 0, 5.0, pos, neg, sampler, low, out1).result
    assert not torch.equal(denoised1["samples"], out1["samples"])
    first, second = live.snapshot(out1["samples"]), live.snapshot(out2["samples"])
    for denoised, run_rec in ((denoised1, first), (denoised2, second)):
        got = live.snapshot(denoised["samples"])
        assert got.layers.keys() == run_rec.layers.keys()
        assert all(torch.equal(got.layers[k], run_rec.layers[k]) for k in got.layers)
    assert not torch.equal(first.layers[LayerKey.parse("input.1.0")], second.layers[LayerKey.parse("input.1.0")])


def test_the_run_read_last_outlasts_any_number_of_later_runs(tiny, sd2):
    """An image sampled with the recorded MODEL, read by Head PCA, then an inpainting pass that also
    uses the recorded MODEL, re-run click after click: the image's run stays readable (Head PCA runs
    again when one of its inputs changes), while unread runs beyond the last HISTORY go."""
    from headseg.nodes.head_pca_node import HeadPCA

    patched, live = recorder.attach_recorder(sd2)
    image = run(tiny, patched, latent_hw=(8, 8), seed=1)
    before = HeadPCA.execute(live, "down+up", "all", 4, latent={"samples": image}).args[0]
    passes = [run(tiny, patched, latent_hw=(8, 8), seed=10 + i) for i in range(run_history.HISTORY + 2)]
    after = HeadPCA.execute(live, "down+up", "all", 3, latent={"samples": image}).args[0]
    assert after.layers.keys() == before.layers.keys()
    for key, b in before.layers.items():
        torch.testing.assert_close(after.layers[key], b[..., :3])  # the same run: its first 3 components
    live.snapshot(passes[-1])
    with pytest.raises(ValueError, match=r"and 2 older one\(s\) are gone") as info:
        live.snapshot(passes[0])  # neither among the last HISTORY nor read last
    assert "inpainting pass" in str(info.value)
    assert len(live._store.history) == run_history.HISTORY + 1  # the image's run kept besides them


def test_every_run_of_the_prompt_that_sampled_last_is_kept(tiny, sd2):
    """ComfyUI samples a list of latents (RebatchLatents) item after item, all in one prompt, before
    Head PCA reads any: every item's run stays readable, however many; a later prompt's run leaves
    the last HISTORY runs and the run read last."""
    from comfy_execution.utils import CurrentNodeContext

    patched, live = recorder.attach_recorder(sd2)
    with CurrentNodeContext("prompt-1", "6", 0):
        items = [run(tiny, patched, latent_hw=(8, 8), seed=s) for s in range(run_history.HISTORY + 2)]
    for latent in items:
        assert live.snapshot(latent).layers
    assert live._store.dropped == 0
    with CurrentNodeContext("prompt-2", "6", 0):
        later = run(tiny, patched, latent_hw=(8, 8), seed=99)
    assert live.snapshot(later).layers
    for latent in items[-(run_history.HISTORY - 1):]:
        assert live.snapshot(latent).layers
    with pytest.raises(ValueError, match=r"and 3 older one\(s\) are gone"):
        live.snapshot(items[0].clone())
    assert live.snapshot(items[0]).layers  # the tensor it was read for keeps it while it lives


@pytest.mark.parametrize("keep", [1, 5])
def test_keep_runs_sets_how_many_latest_runs_stay(tiny, sd2, keep):
    patched, live = recorder.attach_recorder(sd2, keep_runs=keep)
    latents = [run(tiny, patched, latent_hw=(8, 8), seed=s) for s in range(keep + 1)]  # outside any prompt
    for latent in latents[1:]:
        assert live.snapshot(latent).layers
    with pytest.raises(ValueError, match=rf"Only the last {keep} run\(s\) \(Record Self-Attention's keep_runs\).*Raise keep_runs: Record Self-Attention then runs again, and so does the sampler"):
        live.snapshot(latents[0])


def test_a_latent_read_before_keeps_its_run_while_it_lives(tiny, sd2):
    """--cache-lru N hands a sampler's LATENT of an earlier prompt over again after newer runs pushed its run
    out of the history: the very tensor read before finds its run, unless it was changed in place since; the
    run is held no longer than that tensor lives."""
    import gc

    patched, live = recorder.attach_recorder(sd2, keep_runs=1)
    image = run(tiny, patched, latent_hw=(8, 8), seed=1)
    first = live.snapshot(image)
    for seed in (2, 3):  # seed 2 is read last (pinned), seed 3 is the last run: seed 1's run leaves the history
        live.snapshot(run(tiny, patched, latent_hw=(8, 8), seed=seed))
    with pytest.raises(ValueError, match="^latent: .*older one"):
        live.snapshot(image.clone())
    again = live.snapshot(image)
    assert all(torch.equal(again.layers[k], first.layers[k]) for k in first.layers)
    with torch.inference_mode():
        image.add_(1)  # changed in place: no longer that run's output
    with pytest.raises(ValueError, match="^latent: "):
        live.snapshot(image)
    key = id(image)
    assert key in live_recording._HELD
    del image
    gc.collect()
    assert key not in live_recording._HELD  # gone with its tensor


def _held_runs(store_id: int) -> int:
    return sum(store_id in runs for _ref, runs in list(live_recording._HELD.values()))


def test_the_runs_held_for_cached_latents_are_bounded():
    """Every LATENT read holds its run while it lives (ComfyUI's cache), but at most HELD_RUNS of them, the
    ones read last: --cache-lru N, --cache-ram or a list of latents must not hold a recording per cached
    LATENT without bound (keep_runs 1 kept 80 runs alive for 80 latents read)."""
    store = recorder_store._Store([], None, step_selection.parse_steps("last"), "cond", "SD2", keep_runs=1)
    live = live_recording.LiveRecording(store, next(recorder._IDS), [])
    key = LayerKey("input", 1, 0)
    latents = []
    for seed in range(live_recording.HELD_RUNS + 5):
        latent = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(seed))
        rec = Recording(layers={key: torch.full((1, 1, 2, 2, 2), float(seed))}, image_size=(16, 16))
        store._remember(latent.clone(), rec)
        live.snapshot(latent)
        latents.append(latent)
    assert _held_runs(live.store_id) == live_recording.HELD_RUNS
    for latent in latents[:5]:  # read first: let go
        with pytest.raises(ValueError, match="^latent: .*older one"):
            live.snapshot(latent)
    assert float(live.snapshot(latents[5]).layers[key][0, 0, 0, 0, 0]) == 5  # the oldest held, read again ...
    newest = torch.full((1, 4, 2, 2), 7.0)
    store._remember(newest.clone(), rec)
    live.snapshot(newest)  # ... is not the one a newer read pushes out
    assert float(live.snapshot(latents[5]).layers[key][0, 0, 0, 0, 0]) == 5
    with pytest.raises(ValueError, match="^latent: .*older one"):
        live.snapshot(latents[6])
    assert _held_runs(live.store_id) == live_recording.HELD_RUNS


@pytest.mark.parametrize("bad", [0, 65, 2.0, True, "3", None])
def test_keep_runs_out_of_range_is_named(sd2, bad):
    with pytest.raises(ValueError, match=r"^keep_runs: expected an integer from 1 to 64, got "):
        recorder.attach_recorder(sd2, keep_runs=bad)


def test_node_reads_the_run_of_its_latent(tiny, sd2):
    from headseg.nodes.head_pca_node import HeadPCA

    patched, live = recorder.attach_recorder(sd2)
    a = run(tiny, patched, latent_hw=(8, 8), seed=5)
    b = run(tiny, patched, latent_hw=(8, 12), seed=6)  # e.g. a later pass at another size
    feats_a = HeadPCA.execute(live, "down+up", "all", 4, latent={"samples": a}).args[0]
    feats_b = HeadPCA.execute(live, "down+up", "all", 4, latent={"samples": b}).args[0]
    assert feats_a.image_size == (64, 64) and feats_b.image_size == (64, 96)
    with pytest.raises(ValueError, match="^latent: .*directly"):
        HeadPCA.execute(live, "down+up", "all", 4, latent={"samples": a * 0.5})


def test_a_block_number_patch_set_after_the_recorder_takes_precedence_and_is_reported(tiny, sd2, caplog):
    """A (block, number) patch set on a later clone would be hidden by HeadSeg's longer key: it runs
    instead (the picture is what it would be without HeadSeg), and the layer is reported unrecorded."""
    def halved(q, k, v, extra):
        return comfy_attention.optimized_attention(q, k, v, extra["n_heads"]) * 0.5

    patched, live = recorder.attach_recorder(sd2)
    later = patched.clone()
    later.set_model_attn1_replace(halved, "middle", 0)
    alone = sd2.clone()
    alone.set_model_attn1_replace(halved, "middle", 0)
    want = run(tiny, alone, latent_hw=(8, 8))
    assert (want - run(tiny, sd2, latent_hw=(8, 8))).abs().max() > 1e-3  # the patch changes the picture
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        got = run(tiny, later, latent_hw=(8, 8))
    assert (got - want).abs().max().item() <= 1e-4
    assert "not recording middle.0.0: a (middle, 0) attn1 patch of another node takes precedence" in caplog.text
    rec = live.snapshot(got)
    assert "middle.0.0" not in {k.name for k in rec.layers} and "input.1.0" in {k.name for k in rec.layers}


@pytest.mark.parametrize("nodes", [1, 2])
def test_a_run_whose_layers_a_later_block_number_patch_took_over_says_so(tiny, sd2, nodes, caplog):
    """A (block, number) attn1 patch set after the record node takes its layers over (ComfyUI calls it in
    their place): a run with no other layer said 'nothing recorded yet: connect the sampler's LATENT ...,
    sample with the MODEL from HeadSeg_RecordSelfAttention ... (the self-attention layers were never
    called)', which it had done; with two record nodes chained, the second was not even warned. Each names
    the patch, and placing that node before the record node (as the message says) records the layer."""
    def halved(q, k, v, extra):
        return comfy_attention.optimized_attention(q, k, v, extra["n_heads"]) * 0.5

    model, lives = sd2, []
    for _ in range(nodes):
        model, live = recorder.attach_recorder(model, positions=["middle"])
        lives.append(live)
    later = model.clone()
    later.set_model_attn1_replace(halved, "middle", 0)
    alone = sd2.clone()
    alone.set_model_attn1_replace(halved, "middle", 0)
    want = run(tiny, alone, latent_hw=(8, 8))
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        got = run(tiny, later, latent_hw=(8, 8))
    assert (got - want).abs().max().item() <= 1e-4
    assert caplog.text.count("not recording middle.0.0: a (middle, 0) attn1 patch of another node takes precedence") == nodes
    for live in lives:
        with pytest.raises(ValueError, match=r"^recording: the sampling run recorded nothing: the recorded layers "
                                             r"\(middle\.0\.0\) were taken over by another node's attn1 patch set after "
                                             r"Record Self-Attention under their \(block, number\) key.*place that node "
                                             r"before Record Self-Attention"):
            live.snapshot(got)
    before, live = recorder.attach_recorder(alone, positions=["middle"])  # the remedy the message names
    got = run(tiny, before, latent_hw=(8, 8))
    assert (got - want).abs().max().item() <= 1e-4 and LayerKey.parse("middle.0.0") in live.snapshot(got).layers


def test_a_layer_a_later_block_number_patch_took_over_is_warned_about_once(tiny, sd2, caplog):
    """With other layers recorded, the layer a later (block, number) patch takes over is named once, by the
    warning that says which patch took it; the end of the run no longer names it again as a layer 'not run
    through HeadSeg's patch (another node's (block, number) attn1 patch took precedence, or removed HeadSeg's?)'."""
    def halved(q, k, v, extra):
        return comfy_attention.optimized_attention(q, k, v, extra["n_heads"]) * 0.5

    model, live = recorder.attach_recorder(sd2, positions=["middle", "up"])
    later = model.clone()
    later.set_model_attn1_replace(halved, "middle", 0)
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        got = run(tiny, later, latent_hw=(8, 8))
    rec = live.snapshot(got)
    assert LayerKey.parse("middle.0.0") not in rec.layers and any(k.position == "up" for k in rec.layers)
    assert caplog.text.count("not recording middle.0.0: a (middle, 0) attn1 patch of another node takes precedence") == 1
    assert "not run through HeadSeg's patch" not in caplog.text


@pytest.mark.parametrize("how", ["forward hook", "forward pre hook", "object patch", "another module's forward"])
def test_a_self_attention_module_running_another_nodes_code_is_left_to_it(tiny, sd2, how, caplog):
    """An attn1 replace patch makes ComfyUI skip the attn1 module's own call (it runs to_q, to_k, to_v,
    the patch, to_out): a forward hook another node put on the module, or a forward it swapped in through
    an object patch, never ran under HeadSeg's patch, and the picture changed. The layer is left to the
    module (not recorded, with a warning, and a run with no other layer says why); the others are recorded.
    Once ComfyUI undoes the object patch, the module's own bound forward it leaves set is no other code."""
    module = self_attention_modules(sd2.model.diffusion_model)["middle.0.0"]
    plain = run(tiny, sd2, latent_hw=(8, 8))
    base, handle = sd2.clone(), None
    if how == "forward hook":
        handle = module.register_forward_hook(lambda mod, args, out: out * 0.5)
    elif how == "forward pre hook":
        handle = module.register_forward_pre_hook(lambda mod, args: (args[0] * 0.5, *args[1:]))
    elif how == "another module's forward":  # CrossAttention.forward itself, bound to another module's weights
        other = copy.deepcopy(module)
        other.to_v.weight.data.mul_(0.5)
        base.add_object_patch("diffusion_model.middle_block.1.transformer_blocks.0.attn1.forward", other.forward)
    else:
        own = comfy_attention.CrossAttention.forward.__get__(module)
        base.add_object_patch("diffusion_model.middle_block.1.transformer_blocks.0.attn1.forward",
                              lambda *args, **kwargs: own(*args, **kwargs) * 0.5)
    try:
        want = run(tiny, base.clone(), latent_hw=(8, 8))
        assert (want - plain).abs().max() > 1e-3  # the module's code changes the picture
        patched, live = recorder.attach_recorder(base)
        with caplog.at_level(logging.WARNING, logger="HeadSeg"):
            got = run(tiny, patched, latent_hw=(8, 8))
        middle_only, live_middle = recorder.attach_recorder(base, positions=["middle"])
        got_middle = run(tiny, middle_only, latent_hw=(8, 8))
    finally:
        if handle is not None:
            handle.remove()
    assert (got - want).abs().max().item() <= 1e-4
    assert (got_middle - want).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match=r"^recording: the sampling run recorded nothing: the self-attention modules "
                                         r"of the recorded layers run another node's code"):
        live_middle.snapshot(got_middle)
    assert "middle.0.0" in caplog.text and "forward" in caplog.text
    assert "were not run through HeadSeg's patch" not in caplog.text  # left to the module, said once
    names = {k.name for k in live.snapshot(got).layers}
    assert "middle.0.0" not in names and "input.1.0" in names and "output.11.0" in names
    # gone again (ComfyUI undoes an object patch by setting the module's own bound forward on it): all recorded
    caplog.clear()
    patched, live = recorder.attach_recorder(sd2)
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        got = run(tiny, patched, latent_hw=(8, 8))
    assert torch.equal(got, plain)
    assert len(live.snapshot(got).layers) == 16 and "forward" not in caplog.text


def test_a_forward_replaced_for_every_attention_module_leaves_the_layers_recorded(tiny, sd2, caplog, monkeypatch):
    """A pack that replaces CrossAttention.forward on the class (every module of every model; any attn1
    replace patch skips it, HeadSeg's or another node's) is not another node's code on one layer: the
    layers stay recorded, whether the pack loaded before or after HeadSeg."""
    plain_forward = comfy_attention.CrossAttention.forward

    def faster_forward(self, *args, **kwargs):
        return plain_forward(self, *args, **kwargs)

    monkeypatch.setattr(comfy_attention.CrossAttention, "forward", faster_forward)
    for module in self_attention_modules(sd2.model.diffusion_model).values():
        if "forward" in vars(module):  # the bound forward an undone object patch (an earlier test) leaves set
            monkeypatch.delitem(vars(module), "forward")
    patched, live = recorder.attach_recorder(sd2)
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        got = run(tiny, patched, latent_hw=(8, 8))
    assert len(live.snapshot(got).layers) == 16 and "another node's code" not in caplog.text


def test_a_forward_replaced_for_every_module_after_an_undone_object_patch_leaves_the_layer_recorded(
    tiny, sd2, caplog, monkeypatch
):
    """ComfyUI undoes an object patch of an attn1 forward by setting the module's own bound forward on it,
    which stays for the session. A pack that replaces CrossAttention.forward on the class later (when its
    node runs) made that bound forward, ComfyUI's own code, read as another node's: the layer was left
    unrecorded with a warning, in every later run."""
    module = self_attention_modules(sd2.model.diffusion_model)["middle.0.0"]
    comfy_forward = comfy_attention.CrossAttention.forward
    own = comfy_forward.__get__(module)
    base = sd2.clone()
    base.add_object_patch("diffusion_model.middle_block.1.transformer_blocks.0.attn1.forward",
                          lambda *args, **kwargs: own(*args, **kwargs))
    run(tiny, base, latent_hw=(8, 8))
    run(tiny, sd2.clone(), latent_hw=(8, 8))  # another clone loaded: ComfyUI undoes the object patch
    assert getattr(vars(module).get("forward"), "__func__", None) is comfy_forward

    def faster_forward(self, *args, **kwargs):
        return comfy_forward(self, *args, **kwargs)

    monkeypatch.setattr(comfy_attention.CrossAttention, "forward", faster_forward)
    patched, live = recorder.attach_recorder(sd2)
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        got = run(tiny, patched, latent_hw=(8, 8))
    assert len(live.snapshot(got).layers) == 16 and "another node's code" not in caplog.text



def test_the_attention_modules_of_a_model_without_a_unet_are_none(sd2):
    """The check for modules running another node's code reads the UNet's attn1 modules at every model call:
    a model without one (no diffusion model found, or no input_blocks) has none to check, and no error."""
    assert recorder._attn1_modules(None) == {}
    assert recorder._attn1_modules(torch.nn.Linear(2, 2)) == {}
    modules = self_attention_modules(sd2.model.diffusion_model)  # found by module name
    found = recorder._attn1_modules(sd2.model.diffusion_model)
    assert len(found) == len(modules) == 16
    for name, module in modules.items():
        key = LayerKey.parse(name)
        assert found[(key.block, key.number, key.depth)].attn1 is module, name

def test_a_module_running_other_code_under_another_nodes_patch_stays_under_that_patch(tiny, sd2, caplog):
    """A (block, number, depth) patch of another node set before the record node, which HeadSeg's patch chains:
    ComfyUI calls that patch in place of the layer's attn1 module with or without HeadSeg, so a forward hook
    on the module never runs either way. The layer is recorded under the chained patch, not left to the module
    (which would drop the other node's patch with HeadSeg's and run the hook: another picture)."""
    module = self_attention_modules(sd2.model.diffusion_model)["middle.0.0"]

    def quartered(q, k, v, extra):
        return comfy_attention.optimized_attention(q, k, v * 0.25, extra["n_heads"])

    base = sd2.clone()
    base.set_model_attn1_replace(quartered, "middle", 0, 0)
    handle = module.register_forward_hook(lambda mod, args, out: out * 0.5)
    try:
        hooked = run(tiny, sd2.clone(), latent_hw=(8, 8))  # the hook alone, no patch
        want = run(tiny, base.clone(), latent_hw=(8, 8))  # the patch: the hook skipped
        assert (want - hooked).abs().max() > 1e-3
        patched, live = recorder.attach_recorder(base)
        with caplog.at_level(logging.WARNING, logger="HeadSeg"):
            got = run(tiny, patched, latent_hw=(8, 8))
    finally:
        handle.remove()
    assert (got - want).abs().max().item() <= 1e-4
    assert len(live.snapshot(got).layers) == 16 and "another node's code" not in caplog.text


@pytest.mark.parametrize("middle_only", ["first", "second"])
def test_a_module_left_to_its_code_is_named_by_every_record_node_chained_on_the_model(tiny, sd2, middle_only, caplog):
    """Two record nodes chained on one MODEL, a forward hook on one attn1 module: the first of their
    CALC_COND_BATCH wrappers to run drops the layer's whole chain of patches (both nodes'), and only its own
    node heard why. The other node's run of that layer alone said 'nothing recorded yet: ... sample with the
    MODEL from HeadSeg_RecordSelfAttention ... (the self-attention layers were never called)', and one with
    other layers logged that another node's (block, number) patch took precedence."""
    module = self_attention_modules(sd2.model.diffusion_model)["middle.0.0"]
    handle = module.register_forward_hook(lambda mod, args, out: out * 0.5)
    try:
        want = run(tiny, sd2.clone(), latent_hw=(8, 8))
        first, live_first = recorder.attach_recorder(sd2, positions=["middle"] if middle_only == "first" else POSITIONS)
        second, live_second = recorder.attach_recorder(
            first, positions=["middle"] if middle_only == "second" else POSITIONS)
        with caplog.at_level(logging.WARNING, logger="HeadSeg"):
            got = run(tiny, second, latent_hw=(8, 8))
    finally:
        handle.remove()
    assert (got - want).abs().max().item() <= 1e-4
    alone, other = (live_first, live_second) if middle_only == "first" else (live_second, live_first)
    with pytest.raises(ValueError, match=r"^recording: the sampling run recorded nothing: the self-attention modules "
                                         r"of the recorded layers run another node's code"):
        alone.snapshot(got)
    names = {k.name for k in other.snapshot(got).layers}
    assert "middle.0.0" not in names and len(names) == 15
    assert "were not run through HeadSeg's patch" not in caplog.text


def test_a_module_left_to_its_code_does_not_hide_why_the_other_layers_recorded_nothing(tiny, sd2):
    """One layer left to its attn1 module (a forward hook) while the others ran through HeadSeg's patches: a
    run that recorded nothing for another reason (the uncond branch at cfg = 1) names that reason; the
    module message is for a run in which no layer ran through a patch."""
    module = self_attention_modules(sd2.model.diffusion_model)["middle.0.0"]
    patched, live = recorder.attach_recorder(sd2, branch="uncond")
    handle = module.register_forward_hook(lambda mod, args, out: out * 0.5)
    try:
        run(tiny, patched, latent_hw=(8, 8), cfg=1.0)  # ComfyUI skips the uncond pass at cfg = 1
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="^recording: the sampling run recorded nothing: branch: .*cfg = 1.*'cond'"):
        live.snapshot()


def test_a_forward_replaced_for_every_module_before_an_object_patch_is_undone_leaves_the_layer_recorded(
    tiny, sd2, caplog, monkeypatch
):
    """Once a pack has replaced CrossAttention.forward on the class, ComfyUI undoes an object patch of an attn1
    forward by setting the module's bound forward of the pack's (the class's) function on it: the code every
    other module runs, not another node's code on this layer."""
    module = self_attention_modules(sd2.model.diffusion_model)["middle.0.0"]
    comfy_forward = comfy_attention.CrossAttention.forward

    def faster_forward(self, *args, **kwargs):
        return comfy_forward(self, *args, **kwargs)

    monkeypatch.setattr(comfy_attention.CrossAttention, "forward", faster_forward)
    monkeypatch.setitem(vars(module), "forward", None)  # as it was after the test (set or not)
    del vars(module)["forward"]  # the bound forward an undone object patch (an earlier test) leaves set
    base = sd2.clone()
    base.add_object_patch("diffusion_model.middle_block.1.transformer_blocks.0.attn1.forward",
                          lambda *args, **kwargs: faster_forward(module, *args, **kwargs))
    run(tiny, base, latent_hw=(8, 8))
    run(tiny, sd2.clone(), latent_hw=(8, 8))  # another clone loaded: ComfyUI undoes the object patch
    assert getattr(vars(module).get("forward"), "__func__", None) is faster_forward
    patched, live = recorder.attach_recorder(sd2)
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        got = run(tiny, patched, latent_hw=(8, 8))
    assert len(live.snapshot(got).layers) == 16 and "another node's code" not in caplog.text

def test_deep_shrink_steps_are_left_out_of_the_mean(tiny, sd2, caplog):
    """Kohya Deep Shrink (ComfyUI's PatchModelAddDownscale) halves the grids of the inner layers at the
    first steps: those calls are left out with a warning; the mean is that of the steps at the layer's
    own grid, and the layers it never resizes keep every step."""
    from comfy_extras.nodes_model_downscale import PatchModelAddDownscale

    patched, live = recorder.attach_recorder(sd2, steps="mean")
    shrunk = PatchModelAddDownscale.execute(patched, 3, 2.0, 0.0, 0.35, True, "bicubic", "bicubic").result[0]
    with AttentionProbe(shrunk) as probe, caplog.at_level(logging.WARNING, logger="HeadSeg"):
        run(tiny, shrunk, latent_hw=(16, 16), steps=4)
    assert "Deep Shrink" in caplog.text and "input.4.0" in caplog.text
    assert "not recording input.4.0" not in caplog.text  # it is recorded, from the other steps
    assert "HeadSeg: leaving out the steps at which input.4.0's token grid is 4x4 instead of its own 8x8" in caplog.text
    rec = live.snapshot()
    inner = [c for c in probe.branch_calls("input.4.0") if c.x.shape[1] == 8 * 8]  # level 1 of 16x16: 8x8
    assert 0 < len(inner) < len(probe.branch_calls("input.4.0"))  # some steps were shrunk, some not
    want = torch.stack([per_head(c, (8, 8)) for c in inner]).mean(0)
    torch.testing.assert_close(rec.layers[LayerKey.parse("input.4.0")].double(), want, **TOL)
    assert_matches(rec, probe, (16, 16), steps="mean", names=["input.1.0", "output.9.0"])  # never resized


@pytest.mark.parametrize("factor", [2.0, 1.5])  # 1.5: 16x16 -> 5x5 grids, which fit no level at all
def test_deep_shrink_at_every_chosen_step_says_so(tiny, sd2, factor):
    from comfy_extras.nodes_model_downscale import PatchModelAddDownscale

    patched, live = recorder.attach_recorder(sd2, steps="0", positions=("down",), levels="1")
    shrunk = PatchModelAddDownscale.execute(patched, 3, factor, 0.0, 0.35, True, "bicubic", "bicubic").result[0]
    run(tiny, shrunk, latent_hw=(16, 16), steps=4)
    with pytest.raises(ValueError, match=r"steps: at every chosen step a patch such as Kohya Deep Shrink"):
        live.snapshot()


def test_a_latent_with_nan_still_finds_its_run(tiny, sd2):
    """An fp16 overflow can leave NaN in the sampler's output: the LATENT is still its own run's."""
    patched, live = recorder.attach_recorder(sd2)
    out = run(tiny, patched, latent_hw=(8, 8))
    store = live._store
    latent = out.clone()
    latent[0, 0, 0, 0] = float("nan")
    store.history[-1] = store.history[-1]._replace(latent=latent.clone())  # as if the sampler had produced the NaN
    assert live.snapshot(latent) is not None
    other = latent.clone()
    other[0, 0, 0, 1] += 1.0
    with pytest.raises(ValueError, match="is not the output of any"):
        live.snapshot(other)


@pytest.mark.parametrize("steps", ["last", "3", "3-3"])
def test_a_branch_ended_by_its_timestep_range_is_named(tiny, sd2, steps):
    import nodes as comfy_nodes

    patched, live = recorder.attach_recorder(sd2, steps=steps)
    pos, neg = tiny.conditioning("SD2")
    early = comfy_nodes.ConditioningSetTimestepRange().set_range(pos, 0.0, 0.7)[0]  # no cond call at the last step
    tiny.sample(patched, early, neg, latent_hw=(8, 8), steps=4)
    with pytest.raises(ValueError, match=r"steps: the 'cond' conditioning was not active at step 3: its model calls stopped at step 2"):
        live.snapshot()


def test_a_range_past_the_run_records_the_steps_there_and_says_so(tiny, sd2, caplog):
    patched, live = recorder.attach_recorder(sd2, steps="1-9")
    with AttentionProbe(patched) as probe, caplog.at_level(logging.WARNING, logger="HeadSeg"):
        run(tiny, patched, latent_hw=(8, 8), steps=3)
    assert "steps 1-9: the sampling run had 3 steps (0-2): recorded steps 1-2" in caplog.text
    rec = live.snapshot()
    assert rec.steps == "1-2"
    sigmas = comfy.samplers.calculate_sigmas(sd2.get_model_object("model_sampling"), "normal", 3).tolist()
    assert_matches(rec, probe, (8, 8), steps="1-2", sigmas=sigmas)


def test_a_range_to_a_huge_step_records_the_steps_there_in_no_time(tiny, sd2, caplog):
    """'0-999999999' (a range up to the end, as the tooltip invites: a range partly past the run keeps the steps
    it has) made a set of a billion steps when the run ended: tens of GB, the server killed or stalled. The
    run gets 4 GB more address space than the process holds, so that any container of every step of the range
    fails here with a MemoryError rather than take the machine's memory."""
    resource = pytest.importorskip("resource")
    with open("/proc/self/statm") as f:
        held = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")  # bytes of address space now
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = held + (4 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        patched, live = recorder.attach_recorder(sd2, steps="0-999999999")
        with caplog.at_level(logging.WARNING, logger="HeadSeg"):
            run(tiny, patched, latent_hw=(8, 8), steps=2)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert "steps 0-999999999: the sampling run had 2 steps (0-1): recorded steps 0-1" in caplog.text
    assert live.snapshot().steps == "0-1"


@pytest.mark.parametrize(
    "typed,named",
    [("1-99999999999", "1-99999999999"), ("01-0" + "7" * 5000, "1-777777777777... (5000 digits)")],
    ids=["11-digits", "5000-digits"],
)
def test_a_range_past_a_billion_is_named_as_typed(tiny, sd2, caplog, typed, named):
    """An end past 10**9 is read as 10**9 (no step reaches it), but the warning named the range by that value,
    '1-1000000000', which the user never typed."""
    patched, live = recorder.attach_recorder(sd2, steps=typed)
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        run(tiny, patched, latent_hw=(8, 8), steps=2)
    assert f"steps {named}: the sampling run had 2 steps (0-1): recorded steps 1" in caplog.text
    assert live.snapshot().steps == "1"


def test_steps_read_the_same_whatever_zeros_or_digits_they_were_typed_with():
    parse = step_selection.parse_steps
    assert parse("03-0007") == parse("3-7") and parse("03-0007").label == "3-7"
    assert parse("2-" + "9" * 20) == parse("2-1000000000") and parse("2-" + "9" * 20).label != parse("2-1000000000").label
    # up to 15 digits an end is named whole; past that by its first 12 digits and their count
    assert parse("1-" + "9" * 15).label == "1-999999999999999"
    assert parse("1-" + "9" * 16).label == "1-999999999999... (16 digits)"


def test_a_range_ending_one_past_the_last_step_says_how_many_steps_ran(tiny, sd2, caplog):
    patched, live = recorder.attach_recorder(sd2, steps="1-3")  # 3 is one past a 3-step run's last step, 2
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        run(tiny, patched, latent_hw=(8, 8), steps=3)
    assert "steps 1-3: the sampling run had 3 steps (0-2): recorded steps 1-2" in caplog.text
    assert live.snapshot().steps == "1-2"


def test_a_run_dropped_from_the_history_is_named(tiny, sd2):
    patched, live = recorder.attach_recorder(sd2)
    first = run(tiny, patched, latent_hw=(8, 8), seed=0)
    for seed in range(1, run_history.HISTORY + 1):
        run(tiny, patched, latent_hw=(8, 8), seed=seed)
    with pytest.raises(ValueError, match=rf"Only the last {run_history.HISTORY} run\(s\) \(Record Self-Attention's keep_runs\), the newest 64 runs of the prompt"):
        live.snapshot(first)


def test_of_two_runs_with_the_same_latent_the_newest_is_read():
    store = recorder_store._Store([], None, step_selection.parse_steps("last"), "cond", "SD2")
    latent = torch.zeros(1, 4, 2, 2)
    store.history.append(run_history._Run(latent.clone(), "older", "", None))
    store.history.append(run_history._Run(latent.clone(), "newer", "", None))
    assert store.run_of(latent)[0] == "newer"


def test_a_latent_of_4x4_records_every_layer(tiny, sd2, caplog):
    """The UNet keeps downsampling a 1x1 grid to 1x1: the middle layer (level 3) runs at 1x1 = level 2
    of a 4x4 latent, which is its own grid, not a resized one."""
    patched, live = recorder.attach_recorder(sd2)
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        run(tiny, patched, latent_hw=(4, 4), steps=2)
    assert len(live.snapshot().layers) == len(live.layers) == 16
    assert "not recording" not in caplog.text


@pytest.mark.parametrize("factor", [2.0, 1.5])
def test_deep_shrink_warns_only_of_the_layers_selected(tiny, sd2, caplog, factor):
    from comfy_extras.nodes_model_downscale import PatchModelAddDownscale

    patched, live = recorder.attach_recorder(sd2, steps="mean", levels="0")
    shrunk = PatchModelAddDownscale.execute(patched, 3, factor, 0.0, 0.35, True, "bicubic", "bicubic").result[0]
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        run(tiny, shrunk, latent_hw=(16, 16), steps=4)
    assert "not recording" not in caplog.text  # the resized layers are at levels 1 and 2
    assert {k.name for k in live.snapshot().layers} == {"input.1.0", "input.2.0", "output.9.0", "output.10.0", "output.11.0"}


def test_a_range_past_the_branchs_last_call_is_labelled_by_the_steps_recorded(tiny, sd2, caplog):
    import nodes as comfy_nodes

    patched, live = recorder.attach_recorder(sd2, steps="1-3")
    pos, neg = tiny.conditioning("SD2")
    early = comfy_nodes.ConditioningSetTimestepRange().set_range(pos, 0.0, 0.7)[0]  # no cond call at step 3
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        tiny.sample(patched, early, neg, latent_hw=(8, 8), steps=4)
    assert "steps 1-3: the 'cond' conditioning was not called at step(s) 3 (a timestep range" in caplog.text
    assert "recorded steps 1-2" in caplog.text
    assert live.snapshot().steps == "1-2"


def test_a_sampler_that_took_no_step_after_a_good_run_is_named(tiny, sd2):
    """denoise 0 returns the input LATENT without calling the model: the message says so, rather than
    only blaming the wiring; a LATENT of another shape gets no such hint."""
    patched, live = recorder.attach_recorder(sd2)
    run(tiny, patched, latent_hw=(8, 8), seed=1)  # a good run first, then one of another size
    run(tiny, patched, latent_hw=(16, 8), seed=1)
    photo = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    pos, neg = tiny.conditioning("SD2")
    import comfy.sample

    with torch.inference_mode():
        noise = comfy.sample.prepare_noise(photo, 0)
        out = comfy.sample.sample(patched, noise, 2, 5.0, "euler", "normal", pos, neg, photo, denoise=0.0,
                                  disable_pbar=True, seed=0)  # fmt: skip
    assert torch.equal(out, photo) and live.runs == 2  # ComfyUI took no step
    with pytest.raises(ValueError, match="is not the output of any") as info:
        live.snapshot(out)  # the shape of the earlier run, not of the last one
    assert "takes no step (denoise 0, or a start step at or past its last step)" in str(info.value)
    for shape in [(1, 4, 8, 16), (2, 4, 8, 8)]:  # no kept run had this shape: a wiring mistake, no hint
        with pytest.raises(ValueError, match="is not the output of any") as info:
            live.snapshot(torch.randn(*shape))
        assert "no step" not in str(info.value)


def test_a_run_whose_layers_never_ran_through_the_patches_gets_the_wiring_hints(tiny, sd2):
    """A run of the recorded MODEL whose attn1 patches another node removed: its LATENT gets the hints
    of 'nothing recorded yet' (sample with the record node's MODEL), with the reason, not a bare
    'recorded nothing'."""
    patched, live = recorder.attach_recorder(sd2)
    stripped = patched.clone()
    stripped.model_options["transformer_options"]["patches_replace"]["attn1"].clear()
    got = run(tiny, stripped, latent_hw=(8, 8), steps=2)
    with pytest.raises(ValueError, match=r"^recording: nothing recorded yet: .*sample with the MODEL from "
                       r"HeadSeg_RecordSelfAttention.*\(the self-attention layers were never called"):
        live.snapshot(got)


def test_an_empty_latent_of_another_shape_is_named(tiny, sd2):
    """A sampler with denoise 0 on a fresh Empty Latent Image of a new size (no kept run has its shape)
    returns the all-zero LATENT: the message says no sampler changed it, rather than only blaming a node
    in between."""
    patched, live = recorder.attach_recorder(sd2)
    run(tiny, patched, latent_hw=(8, 8), seed=1)
    with pytest.raises(ValueError, match="is not the output of any") as info:
        live.snapshot(torch.zeros(1, 4, 16, 8))
    assert "all zeros, as Empty Latent Image makes it" in str(info.value)
    assert "takes no step (denoise 0" in str(info.value)


def test_the_history_message_only_when_a_run_was_dropped(tiny, sd2):
    patched, live = recorder.attach_recorder(sd2)
    for seed in range(run_history.HISTORY):
        run(tiny, patched, latent_hw=(8, 8), seed=seed)
    with pytest.raises(ValueError, match="is not the output of any") as info:
        live.snapshot(torch.zeros(1, 4, 8, 8))
    assert "Only the last" not in str(info.value)



def _store_run(store, seed, refuse=None):
    """One sampling run through a bare _Store (no model): its output latent."""
    noise = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(seed))
    store.begin_run(noise, torch.tensor([1.0, 0.0]))
    if refuse:
        store.refuse(refuse)
    store.end_run(noise * 2)
    return noise * 2


def test_the_runs_of_one_prompt_are_bounded(caplog):
    """A prompt that samples the recorded MODEL again and again (a loop, a tiled upscaler), or an API
    client that sends one prompt id with every queue (ComfyUI takes the client's prompt_id as it is),
    keeps at most MAX_KEEP_RUNS runs of it, not all."""
    from comfy_execution.utils import CurrentNodeContext

    store = recorder_store._Store([], None, step_selection.parse_steps("last"), "cond", "SD2", keep_runs=1)
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        for queue in range(run_history.MAX_KEEP_RUNS + 10):
            with CurrentNodeContext("the-same-id", "3", 0):
                _store_run(store, queue)
    assert len(store.history) == run_history.MAX_KEEP_RUNS
    assert caplog.text.count(f"sampled the recorded MODEL more than {run_history.MAX_KEEP_RUNS} times") == 1


def _prompt_ids_held(obj, seen=None) -> set:
    """The 'prompt-...' strings reachable from ``obj`` through its attributes, dicts, lists, sets and tuples."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return set()
    seen.add(id(obj))
    if isinstance(obj, str):
        return {obj} if obj.startswith("prompt-") else set()
    if isinstance(obj, dict):
        items = [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.Tensor)):
        items = list(vars(obj).values())
    else:
        return set()
    return set().union(*(_prompt_ids_held(item, seen) for item in items))


def test_a_long_session_of_prompts_past_the_cap_holds_no_id_of_the_prompts_gone(caplog, monkeypatch):
    """A dataset session queues one prompt after another, each sampling the cached record node's MODEL more
    than MAX_KEEP_RUNS times (a list of latents, a tiled upscaler): the store said so once per prompt and kept
    every such prompt's id for good, so its memory grew with the session. It holds the ids of the prompts of
    its kept runs only, and still warns once per prompt."""
    from comfy_execution.utils import CurrentNodeContext

    monkeypatch.setattr(run_history, "MAX_KEEP_RUNS", 2)
    store = recorder_store._Store([], None, step_selection.parse_steps("last"), "cond", "SD2", keep_runs=1)
    prompts = [f"prompt-{n}" for n in range(30)]
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        for n, prompt in enumerate(prompts):
            for item in range(run_history.MAX_KEEP_RUNS + 3):
                with CurrentNodeContext(prompt, "3", 0):
                    _store_run(store, 100 * n + item)
    assert caplog.text.count("sampled the recorded MODEL more than 2 times") == len(prompts)
    kept = {run.prompt for run in store.history}
    assert kept == {prompts[-1]}
    assert _prompt_ids_held(store) == kept


def test_a_refused_run_keeps_its_prompt_and_the_runs_before_it():
    """A run that records nothing (refused part-way) belongs to its prompt too: it neither drops the
    earlier runs of that prompt (a list of latents) nor goes itself when more runs of it follow."""
    from comfy_execution.utils import CurrentNodeContext

    store = recorder_store._Store([], None, step_selection.parse_steps("last"), "cond", "SD2", keep_runs=1)
    with CurrentNodeContext("prompt-1", "6", 0):
        items = [_store_run(store, s) for s in range(4)]
        refused = _store_run(store, 99, refuse="a guider HeadSeg does not record")
        later = _store_run(store, 100)
    assert [run.prompt for run in store.history] == ["prompt-1"] * 6
    for latent in items + [later]:
        assert store.run_of(latent) is not None
    assert store.run_of(refused) == (None, "a guider HeadSeg does not record")
    assert store.prompt is None and not store._failed


def test_a_latent_read_by_two_record_nodes_keeps_both_runs():
    """Two record nodes (two MODELs, each its store) that read one LATENT tensor each hold their own run
    for it: holding the second does not drop the first, and a run is found only for its own store."""
    import gc
    import types

    latent = torch.randn(1, 4, 8, 8)
    first = types.SimpleNamespace(latent=latent.clone(), denoised=None)
    second = types.SimpleNamespace(latent=None, denoised=latent.clone())
    live_recording._hold(latent, 101, first)
    live_recording._hold(latent, 102, second)
    assert live_recording._held(latent, 101) is first and live_recording._held(latent, 102) is second
    assert live_recording._held(latent, 103) is None and live_recording._held(latent.clone(), 101) is None
    key = id(latent)
    del latent
    gc.collect()
    assert key not in live_recording._HELD
