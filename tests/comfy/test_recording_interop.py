"""Recording next to the model patches, guidance nodes and guiders that artists chain with it, in both
orders (the patch before and after the record node): the sampled latent is bit for bit the patch's
own, and the recording holds each evaluation's main pass (not the extra passes after CFG) as an
independent float64 recomputation gives it; steps where the model did not run say why (a cache
node, a timestep range at cfg = 1)."""

import re

import pytest
import torch

import comfy.ldm.modules.attention
import comfy.model_patcher
import comfy.samplers
import comfy.sd
from comfy.patcher_extension import WrappersMP
from comfy_extras import (nodes_apg, nodes_cfg, nodes_custom_sampler, nodes_differential_diffusion, nodes_easycache,
                          nodes_freelunch, nodes_model_advanced, nodes_model_merging, nodes_pag, nodes_perpneg,
                          nodes_sag)

from headseg.nodes import recorder
from headseg.nodes.core.recording import LayerKey

from .reference import AttentionProbe, grid_for, per_head

TOL = dict(rtol=3e-3, atol=3e-3)  # recorded float16 against float64
HW = (16, 16)
NAMES = ("input.1.0", "middle.0.0", "output.11.0")


@pytest.fixture(scope="module")
def sd2(tiny):
    return tiny.build("SD2", seed=0)


class EvalProbe(AttentionProbe):
    """AttentionProbe that also tags each call with the guider evaluation it ran in (a PREDICT_NOISE
    counter of its own, not HeadSeg's): an evaluation's main pass is its first call of the branch."""

    def __enter__(self):
        self.eval = 0
        self.evals = {name: [] for name in self.modules}

        def count(executor, *args, **kwargs):
            self.eval += 1
            return executor(*args, **kwargs)

        self.patcher.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, "test_eval_probe", count)
        super().__enter__()
        for name, attn in self.modules.items():
            def hook(module, inputs, name=name):
                self.evals[name].append(self.eval)
            self._handles.append(attn.to_q.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc):
        self.patcher.remove_wrappers_with_key(WrappersMP.PREDICT_NOISE, "test_eval_probe")
        return super().__exit__(*exc)

    def main_calls(self, name, branch=0):
        seen, found = set(), []
        for call, ev in zip(self.calls[name], self.evals[name]):
            if branch in call.cond_or_uncond and ev not in seen:
                seen.add(ev)
                found.append(call)
        return found


def assert_main_pass(rec, probe, steps):
    for name in NAMES:
        calls = probe.main_calls(name)
        calls = calls[-1:] if steps == "last" else calls
        want = torch.stack([per_head(c, grid_for(HW, c.x.shape[1])) for c in calls]).mean(0)
        torch.testing.assert_close(rec.layers[LayerKey.parse(name)].double(), want, **TOL, msg=lambda m: f"{name}: {m}")


def lora(model):
    """A kohya-format LoRA on every attn1 q/k/v, loaded as LoraLoaderModelOnly loads one."""
    g = torch.Generator().manual_seed(3)
    sd = {}
    for name, module in model.model.diffusion_model.named_modules():
        if name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") and ".attn1." in name:
            key = "lora_unet_" + name.replace(".", "_")
            sd[key + ".lora_up.weight"] = torch.randn(module.weight.shape[0], 2, generator=g) * 0.5
            sd[key + ".lora_down.weight"] = torch.randn(2, module.weight.shape[1], generator=g) * 0.5
            sd[key + ".alpha"] = torch.tensor(2.0)
    return comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0.0)[0]


@pytest.fixture(scope="module")
def patches(tiny):
    """Patch node name -> MODEL -> patched MODEL, as the nodes' own code makes it."""
    other = tiny.build("SD2", seed=5)
    empty, _ = tiny.conditioning("SD2", seed=9)
    return {
        "PAG": lambda m: nodes_pag.PerturbedAttentionGuidance.execute(m, 3.0).result[0],
        "SAG": lambda m: nodes_sag.SelfAttentionGuidance.execute(m, 0.5, 2.0).result[0],
        "FreeU_V2": lambda m: nodes_freelunch.FreeU_V2().patch(m, 1.3, 1.4, 0.9, 0.2)[0],
        "RescaleCFG": lambda m: nodes_model_advanced.RescaleCFG().patch(m, 0.7)[0],
        "APG": lambda m: nodes_apg.APG.execute(m, 0.0, 5.0, -0.5).result[0],
        "CFGZeroStar": lambda m: nodes_cfg.CFGZeroStar.execute(m).result[0],
        "PerpNeg": lambda m: nodes_perpneg.PerpNeg.execute(m, empty, 1.0).result[0],  # an extra pass, labelled cond
        "DifferentialDiffusion": lambda m: nodes_differential_diffusion.DifferentialDiffusion.execute(m).result[0],
        "ModelMergeSimple": lambda m: nodes_model_merging.ModelMergeSimple().merge(m, other, 0.5)[0],
        "LoRA": lora,
    }


CASES = [
    ("PAG", 1.0, "last"), ("PAG", 5.0, "mean"), ("SAG", 1.0, "mean"), ("FreeU_V2", 5.0, "last"),
    ("RescaleCFG", 5.0, "mean"), ("APG", 5.0, "last"), ("CFGZeroStar", 5.0, "mean"), ("PerpNeg", 5.0, "mean"),
    ("DifferentialDiffusion", 5.0, "last"), ("ModelMergeSimple", 5.0, "last"), ("LoRA", 5.0, "mean"),
]


@pytest.mark.parametrize("name,cfg,steps", CASES, ids=[f"{n}-cfg{c:g}-{s}" for n, c, s in CASES])
def test_patch_in_either_order_keeps_its_latent_and_the_main_pass_is_recorded(tiny, sd2, patches, name, cfg, steps):
    patch = patches[name]
    pos, neg = tiny.conditioning("SD2")
    options = dict(latent_hw=HW, steps=3, seed=2, cfg=cfg)
    if name == "DifferentialDiffusion":  # an inpainting mask with every level of denoise
        options.update(noise_mask=torch.linspace(0, 1, HW[1]).expand(1, 1, *HW).contiguous(), denoise=0.8)
    alone = patch(sd2)  # made once for both (ModelMergeSimple's merge takes seconds: a state_dict per key)
    want = tiny.sample(alone, pos, neg, **options)
    before, live_before = recorder.attach_recorder(alone, steps=steps)
    patched, live_after = recorder.attach_recorder(sd2, steps=steps)
    for model, live in ((before, live_before), (patch(patched), live_after)):
        with EvalProbe(model) as probe:
            got = tiny.sample(model, pos, neg, **options)
        assert torch.equal(got, want)
        assert_main_pass(live.snapshot(got), probe, steps)


@pytest.mark.parametrize("guider,patch", [("CFGGuider", "PAG"), ("CFGGuider", "SAG"), ("BasicGuider", "PAG")])
def test_sampler_custom_advanced_guiders_record_their_main_pass(tiny, sd2, patches, guider, patch):
    pos, neg = tiny.conditioning("SD2")
    custom = nodes_custom_sampler

    def run(model):
        g = (custom.CFGGuider.execute(model, pos, neg, 4.0) if guider == "CFGGuider"
             else custom.BasicGuider.execute(model, pos)).result[0]
        sigmas = custom.BasicScheduler.execute(model, "normal", 3, 1.0).result[0]
        with torch.inference_mode():
            out, _ = custom.SamplerCustomAdvanced.execute(
                custom.RandomNoise.execute(3).result[0], g, custom.KSamplerSelect.execute("euler").result[0],
                sigmas, {"samples": torch.zeros(1, 4, *HW)}).result
        return out["samples"]

    apply = patches[patch]
    want = run(apply(sd2))
    patched, live = recorder.attach_recorder(sd2)
    model = apply(patched)
    with EvalProbe(model) as probe:
        got = run(model)
    assert torch.equal(got, want)
    assert len(probe.calls["output.11.0"]) == 2 * len(probe.main_calls("output.11.0"))  # the extra pass ran
    assert_main_pass(live.snapshot(got), probe, "last")


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


@pytest.mark.parametrize("sampler,steps", [("euler", "12"), ("euler", "10-12"), ("uni_pc", "12")])
def test_a_range_past_the_run_whose_last_steps_a_cache_node_skipped_names_the_cache(tiny, sd2, sampler, steps):
    """A range past a run whose last steps EasyCache skipped (euler, 10 steps; the model ran 0-1 and 4): 'last'
    and '9' name the cache node, but '12' named samplers that choose their own sigmas, as if euler had not gone
    through steps 5-9, and left out the end_percent that records them. uni_pc reports no steps: the guider's
    calls there tell the skipped steps, as for 'last'."""
    pos, neg = tiny.conditioning("SD2")
    model, live = recorder.attach_recorder(easycache(1.0)(sd2), steps=steps)
    got = tiny.sample(model, pos, neg, latent_hw=HW, steps=10, seed=2, sampler_name=sampler)
    with pytest.raises(ValueError) as raised:
        live.snapshot(got)
    message = str(raised.value)
    assert re.search(rf"steps: range {steps} selected but the sampler ran 10 steps \(0-9\), and the model did not "
                     r"run at step\(s\) [0-9,-]*9 \(a node that reuses earlier model outputs .*EasyCache or "
                     r"LazyCache.*\): choose steps the model ran \(0-[0-9,-]+\), 'mean', or an end_percent below 1 "
                     r"on that node", message), message
    assert "dpm_fast" not in message and "sigma" not in message, message


def test_a_cache_node_that_skips_the_last_step_under_a_sampler_that_reports_no_steps_is_named(tiny, sd2):
    """uni_pc reports no steps: EasyCache's skipped steps are still told from the predictions the guider was
    asked for there (it named dpm_fast's own sigmas)."""
    pos, neg = tiny.conditioning("SD2")
    model, live = recorder.attach_recorder(easycache(1.0)(sd2))
    got = tiny.sample(model, pos, neg, latent_hw=HW, steps=10, seed=2, sampler_name="uni_pc")
    with pytest.raises(ValueError, match=r"steps: the sampler went through step 9 but the model did not run at "
                                         r"step\(s\) [0-9,-]*9 \(a node that reuses earlier model outputs .*EasyCache"):
        live.snapshot(got)


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")  # ComfyUI's dpm_fast itself
@pytest.mark.parametrize("sampler,cache,steps", [("uni_pc", lazycache(1.0), 10), ("dpm_fast", None, 20)],
                         ids=["uni_pc + LazyCache", "dpm_fast"])
def test_a_step_the_sampler_never_evaluated_between_steps_it_ran_is_named(tiny, sd2, sampler, cache, steps):
    """Samplers that report no steps: LazyCache skips whole evaluations (here under uni_pc), and dpm_fast
    picks its own sigmas, leaving steps of a 20-step schedule without a model call between steps with one.
    A range there said 'no layer could be recorded (levels selection matched no grid, ...)', and one after
    the last step run 'choose steps up to N', N past the skipped ones."""
    pos, neg = tiny.conditioning("SD2")
    wrap = cache or (lambda m: m)
    model, live = recorder.attach_recorder(wrap(sd2), steps=f"0-{steps - 1}")
    got = tiny.sample(model, pos, neg, latent_hw=HW, steps=steps, seed=2, sampler_name=sampler)
    ran = live.snapshot(got).steps
    kept = {int(s) for part in ran.split(",") for s in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)}
    gaps = [i for i in range(max(kept)) if i not in kept]
    assert gaps and max(kept) < steps - 1, ran  # skipped steps between those run, and after the last one run
    for step in (gaps[0], steps - 1):
        model, live = recorder.attach_recorder(wrap(sd2), steps=str(step))
        got = tiny.sample(model, pos, neg, latent_hw=HW, steps=steps, seed=2, sampler_name=sampler)
        with pytest.raises(ValueError, match=rf"steps: range {step} selected, but the sampler evaluated the model .*"
                                             rf"dpm_fast and dpm_adaptive choose their own sigmas.*\): choose steps "
                                             rf"the model ran \({re.escape(ran)}\), or 'mean'"):
            live.snapshot(got)


def test_a_range_over_steps_a_cache_node_skipped_says_so(tiny, sd2, caplog):
    pos, neg = tiny.conditioning("SD2")
    model, live = recorder.attach_recorder(easycache(1.0)(sd2), steps="0-9")
    with caplog.at_level("WARNING", logger="HeadSeg"):
        got = tiny.sample(model, pos, neg, latent_hw=HW, steps=10, seed=2)
    assert live.snapshot(got).steps.startswith("0-1")
    assert "the model did not run at step(s) " in caplog.text and "EasyCache or LazyCache" in caplog.text
    assert "timestep range" not in caplog.text


@pytest.mark.parametrize("steps", ["last", "6-9"])
@pytest.mark.parametrize("sampler,idle,ran", [("euler", "5-9", "0-4"), ("uni_pc", "6-9", "0-5")])
def test_cfg1_with_a_positive_ended_by_its_timestep_range_is_named(tiny, sd2, steps, sampler, idle, ran):
    """At cfg = 1 nothing runs the model once the only conditioning's range ends (no uncond pass): the
    message names the timestep range (it named dpm_fast's own sigmas, or a range 'outside' 0-9; under
    uni_pc, which reports no steps, it still did). uni_pc's call at step 5 lands on the range's end."""
    import nodes

    pos, neg = tiny.conditioning("SD2")
    early = nodes.ConditioningSetTimestepRange().set_range(pos, 0.0, 0.5)[0]
    model, live = recorder.attach_recorder(sd2, steps=steps)
    got = tiny.sample(model, early, neg, latent_hw=(8, 8), steps=10, seed=2, cfg=1.0, sampler_name=sampler)
    with pytest.raises(ValueError, match=rf"steps: no conditioning entry was active at step\(s\) {idle}, so the model "
                                         rf"did not run there \(a timestep range.*choose steps the model ran \({ran}\)"):
        live.snapshot(got)


def test_a_recorded_model_merged_in_as_model2_is_refused_with_a_hint_to_make_it_model1(tiny, sd2):
    """ModelMergeSimple keeps model1's patches: the recorded MODEL as model2 records nothing, and says why."""
    other = tiny.build("SD2", seed=5)
    patched, live = recorder.attach_recorder(sd2)
    merged = nodes_model_merging.ModelMergeSimple().merge(other, patched, 0.5)[0]
    pos, neg = tiny.conditioning("SD2")
    got = tiny.sample(merged, pos, neg, latent_hw=HW, steps=2, seed=2)
    with pytest.raises(ValueError, match="^recording: nothing recorded yet: .*ModelMergeSimple as model1"):
        live.snapshot(got)


def test_a_recorded_model_merged_in_as_model2_after_a_run_gets_the_same_hint(tiny, sd2):
    """Once the record node holds a run (the workflow sampled with the recorded MODEL, then a ModelMergeSimple
    was put in with it as model2, the record node coming from ComfyUI's cache), the merged sampler's LATENT is
    no run's: that message said to connect the sampler directly, with no word of the merge."""
    other = tiny.build("SD2", seed=5)
    patched, live = recorder.attach_recorder(sd2)
    pos, neg = tiny.conditioning("SD2")
    live.snapshot(tiny.sample(patched, pos, neg, latent_hw=HW, steps=2, seed=2))  # a run of the recorded MODEL
    merged = nodes_model_merging.ModelMergeSimple().merge(other, patched, 0.5)[0]
    got = tiny.sample(merged, pos, neg, latent_hw=HW, steps=2, seed=3)
    with pytest.raises(ValueError, match="^latent: this LATENT .* is not the output .*ModelMergeSimple as model1"):
        live.snapshot(got)


def reference_only(until_sigma=None):
    """MODEL -> clone with a reference-only attn1 patch as ComfyUI_experiments' ReferenceOnlySimple makes
    it: latent item 0 is the reference, and every other item's self-attention keys and values get the
    reference's tokens appended (the queries stay the layer's own); with ``until_sigma``, only at model
    calls whose sigma is above it (as the packs' start/end settings do)."""

    def patch(m):
        m = m.clone()
        batch = 2

        def reference_apply(q, k, v, extra_options):
            if until_sigma is not None and float(extra_options["sigmas"].max()) <= until_sigma:
                return q, k, v
            k = k.clone().repeat(1, 2, 1)
            for o in range(0, q.shape[0], batch):
                for x in range(1, batch):
                    k[x + o, q.shape[1]:] = q[o, :]
            return q, k, k

        m.set_model_attn1_patch(reference_apply)
        return m

    return patch


def test_keys_and_values_extended_by_a_reference_patch_are_not_recorded_as_self_attention(tiny, sd2, caplog):
    """A reference-only patch appends another image's tokens to the keys and values of attn1, with the
    queries' token count unchanged: such calls are not self-attention over the layer's own tokens, so
    they are left out and said to be (they were recorded as if they were), the latent untouched."""
    pos, neg = tiny.conditioning("SD2")
    options = dict(latent_hw=HW, batch=2, steps=2, seed=2)
    patch = reference_only()
    want = tiny.sample(patch(sd2), pos, neg, **options)
    before, live_before = recorder.attach_recorder(patch(sd2))
    patched, live_after = recorder.attach_recorder(sd2)
    for model, live in ((before, live_before), (patch(patched), live_after)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="HeadSeg"):
            got = tiny.sample(model, pos, neg, **options)
        assert torch.equal(got, want)
        assert ("HeadSeg: leaving out the calls of input.1.0 whose keys and values another patch changed (such as "
                "reference-only or StyleAligned, which add another image's tokens): 512 key tokens for 256 query "
                "tokens") in caplog.text
        with pytest.raises(ValueError, match=r"^recording: the sampling run recorded nothing: another patch \(such "
                                             r"as reference-only or StyleAligned\) added another image's tokens"):
            live.snapshot(got)
    model, live = recorder.attach_recorder(patch(sd2), levels="1")  # the other levels' calls: not asked for
    with pytest.raises(ValueError, match=r"^recording: the sampling run recorded nothing: another patch \(such as"):
        live.snapshot(tiny.sample(model, pos, neg, **options))


def test_calls_a_reference_patch_left_alone_are_recorded(tiny, sd2):
    """The same patch active at the first steps only: 'mean' holds the later steps' plain self-attention."""
    pos, neg = tiny.conditioning("SD2")
    sigmas = comfy.samplers.calculate_sigmas(sd2.get_model_object("model_sampling"), "normal", 4).tolist()
    model, live = recorder.attach_recorder(reference_only(until_sigma=sigmas[2])(sd2), steps="mean")
    with EvalProbe(model) as probe:
        got = tiny.sample(model, pos, neg, latent_hw=HW, batch=2, steps=4, seed=2)
    rec = live.snapshot(got)
    for name in NAMES:
        calls = [c for c in probe.main_calls(name) if c.sigma <= sigmas[2] * (1 + 1e-6)]
        assert 0 < len(calls) < len(probe.main_calls(name))
        want = torch.stack([per_head(c, grid_for(HW, c.x.shape[1])) for c in calls]).mean(0)
        torch.testing.assert_close(rec.layers[LayerKey.parse(name)].double(), want, **TOL, msg=lambda m: f"{name}: {m}")


class WeightedPatch:
    """An attn1 replace patch object with a weight of its own, as packs make them: ComfyUI moves and casts
    it with the model (``obj = obj.to(device)``, then ``.to(model dtype)``) and loads the models it names
    (``obj.models()``: ModelPatchers)."""

    def __init__(self, w, extra):
        self.w, self.extra = w, extra

    def to(self, arg):
        self.w = self.w.to(arg)
        return self

    def models(self):
        return [self.extra]

    def __call__(self, q, k, v, extra_options):
        out = comfy.ldm.modules.attention.optimized_attention(
            q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"))
        return out + 0.1 * out @ self.w  # w: [heads*d, heads*d]


def test_a_patch_object_set_before_the_record_node_is_still_cast_and_loaded_with_the_model(tiny, sd2):
    """HeadSeg's patch takes the place of such an object in the patch dict: ComfyUI must still reach its
    ``to`` and ``models`` through it. A float64 weight (the model is float32) was left uncast: the run
    failed with a dtype error in the object's own code."""
    layers = recorder.find_self_attention_layers(sd2.get_model_object("diffusion_model"))
    patched = sd2.clone()
    extra = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu"))
    for layer in layers:
        k, inner = layer.key, layer.heads * layer.dim_head
        w = torch.eye(inner, dtype=torch.float64).roll(1, 0)
        patched.set_model_attn1_replace(WeightedPatch(w, extra), k.block, k.number, k.depth)
    pos, neg = tiny.conditioning("SD2")
    model, live = recorder.attach_recorder(patched)
    got = tiny.sample(model, pos, neg, latent_hw=HW, steps=2, seed=2)
    assert torch.equal(got, tiny.sample(patched, pos, neg, latent_hw=HW, steps=2, seed=2))
    assert len(live.snapshot(got).layers) == len(layers)
    listed = model.model_patches_models()  # (clone deep-copies the objects, and their models with them)
    assert len(listed) == len(layers) and all(isinstance(m, comfy.model_patcher.ModelPatcher) for m in listed)


def test_a_block_number_patch_object_is_cast_in_the_clone_that_samples(tiny, sd2):
    """A (block, number) patch object that the record node stands in for is deep-copied by every later clone
    (LoRA, FreeU, ...), and ComfyUI moves and casts the copy in the clone that samples. HeadSeg's patch
    called the record node's own copy, never cast: a float64 weight (the model is float32) failed the run
    with a dtype error in the object's own code (on a GPU: a weight left on the CPU)."""
    middle = next(layer for layer in recorder.find_self_attention_layers(sd2.get_model_object("diffusion_model"))
                  if layer.key.block == "middle")
    inner = middle.heads * middle.dim_head
    extra = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu"))
    base = sd2.clone()
    base.set_model_attn1_replace(WeightedPatch(torch.eye(inner, dtype=torch.float64).roll(1, 0), extra), "middle", 0)
    pos, neg = tiny.conditioning("SD2")
    want = tiny.sample(base.clone(), pos, neg, latent_hw=HW, steps=2, seed=2)  # (base's own object stays uncast)
    model, live = recorder.attach_recorder(base)
    later = model.clone()  # as a LoRA or FreeU after the record node makes it
    got = tiny.sample(later, pos, neg, latent_hw=HW, steps=2, seed=2)
    assert torch.equal(got, want)
    assert LayerKey.parse("middle.0.0") in live.snapshot(got).layers


def token_downsampling(m):
    """MODEL -> clone with ToDo's attn1 patch (comfy-todo's ToDoPatchModel, downsample_factor_depth_1 = 2):
    on the latent grid the keys and values are the layer's own tokens downsampled 2x (nearest), the queries
    all of them: self-attention over the layer's own tokens, with fewer keys."""
    m = m.clone()

    def todo_m(q, k, v, extra_options):
        h, w = extra_options["original_shape"][-2:]
        if q.shape[1] != h * w:  # a coarser grid: left alone
            return q, k, v
        down = lambda t: torch.nn.functional.interpolate(  # noqa: E731
            t.reshape(t.shape[0], h, w, -1).permute(0, 3, 1, 2), size=(h // 2, w // 2), mode="nearest"
        ).permute(0, 2, 3, 1).reshape(t.shape[0], (h // 2) * (w // 2), -1)
        return q, down(k), down(v)

    m.set_model_attn1_patch(todo_m)
    return m


def test_calls_with_fewer_keys_of_the_layers_own_tokens_are_recorded(tiny, sd2, caplog):
    """Token downsampling (ToDo) keeps a latent-grid layer's queries and attends to its own tokens
    downsampled: self-attention over the layer's own tokens, recorded as the model computes it. Calls whose
    keys and values differ from the queries' count were all left out, ToDo's too (levels '0': nothing
    recorded, and the error blamed a reference-only patch's 'another image's tokens')."""
    import math

    pos, neg = tiny.conditioning("SD2")
    model, live = recorder.attach_recorder(token_downsampling(sd2), levels="0")
    with EvalProbe(model) as probe, caplog.at_level("WARNING", logger="HeadSeg"):
        got = tiny.sample(model, pos, neg, latent_hw=HW, steps=2, seed=2)
    assert "keys and values" not in caplog.text
    rec = live.snapshot(got)
    call = probe.main_calls("input.1.0")[-1]
    b = call.x.shape[0] // len(call.cond_or_uncond)
    x = call.x[call.cond_or_uncond.index(0) * b :][:b]  # [b, N, C] the cond chunk
    h, w = HW
    small = x.reshape(b, h, w, -1)[:, ::2, ::2].reshape(b, (h // 2) * (w // 2), -1)  # nearest 2x downsampling
    q, k, v = x @ call.wq.T, small @ call.wk.T, small @ call.wv.T
    H = call.heads
    d = q.shape[-1] // H
    q, k, v = (t.view(b, t.shape[1], H, d).transpose(1, 2) for t in (q, k, v))  # [b, H, tokens, d]
    want = (torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v).view(b, H, h, w, d)
    torch.testing.assert_close(rec.layers[LayerKey.parse("input.1.0")].double(), want, **TOL)
