"""Recorder contracts: entries ComfyUI cannot weigh, patches that reuse their output buffer, memory a
recording owns, interrupted runs, the 3 kept runs, model labels, patch precedence, step labels,
attention precision.

Each test checks against an independent reference (a float64 recomputation from the layer weights,
the picture sampled without HeadSeg) or a planted answer written out from the documentation.
"""

import logging
import re
import types

import pytest
import torch

import comfy.ldm.modules.attention as comfy_attention
import comfy.model_management
import comfy.supported_models

from headseg.nodes import recorder, step_selection
from headseg.nodes.core.recording import LayerKey

from .reference import AttentionProbe, reference, self_attention_modules

TOL = dict(rtol=3e-3, atol=3e-3)  # recorded float16 against float64


@pytest.fixture(scope="module")
def sd2(tiny):
    return tiny.build("SD2", seed=0)


def run(tiny, model, latent_hw=(8, 8), **kwargs):
    pos, neg = tiny.conditioning("SD2")
    return tiny.sample(model, pos, neg, latent_hw=latent_hw, **kwargs)


def attention(q, k, v, extra):
    return comfy_attention.optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"))


@pytest.mark.parametrize("branch", ["cond", "uncond"])
def test_entries_comfyui_cannot_weigh_still_record_their_own_chunk(tiny, sd2, branch, monkeypatch, caplog):
    """When the shares cannot be made (a conditioning the recorder does not know), entries count alike:
    the one entry of the branch is still taken from its own chunk of the batched CFG call."""
    def unknown(*args, **kwargs):
        raise KeyError("planted: a conditioning HeadSeg does not know")

    monkeypatch.setattr(recorder, "_branch_weights", unknown)
    patched, live = recorder.attach_recorder(sd2, branch=branch)
    with AttentionProbe(patched) as probe, caplog.at_level(logging.WARNING, logger="HeadSeg"):
        got = run(tiny, patched, cfg=5.0)
    assert "averaged with equal weights" in caplog.text  # the fallback path ran
    b = recorder.BRANCHES[branch]
    assert any(len(c.cond_or_uncond) == 2 for c in probe.calls["input.1.0"])  # both branches in one call
    rec = live.snapshot(got)
    for key in rec.layers:
        torch.testing.assert_close(rec.layers[key].double(), reference(probe, key.name, (8, 8), branch=b), **TOL,
                                   msg=lambda m: f"{key.name}: {m}")


def test_a_patch_that_reuses_its_output_buffer_is_recorded_per_layer(tiny, sd2):
    """Another pack's attn1 patch may hand back one preallocated buffer per shape, overwritten at its next
    call: the recorder must keep a copy of each layer's output, never the tensor it was handed."""
    buffers = {}

    def reusing(q, k, v, extra):
        out = attention(q, k, v, extra)
        buf = buffers.setdefault((tuple(out.shape), out.dtype), torch.empty_like(out))
        return buf.copy_(out)

    other = sd2.clone()
    for name in self_attention_modules(sd2.model.diffusion_model):
        key = LayerKey.parse(name)
        other.set_model_attn1_replace(reusing, key.block, key.number, key.depth)
    want = run(tiny, sd2, seed=3)
    patched, live = recorder.attach_recorder(other)
    with AttentionProbe(patched) as probe:
        got = run(tiny, patched, seed=3)
    assert (got - want).abs().max().item() <= 1e-4  # the buffer patch computes plain attention
    rec = live.snapshot(got)
    for key in rec.layers:  # input.1.0 and input.2.0 (and output.9-11.0) share one buffer
        torch.testing.assert_close(rec.layers[key].double(), reference(probe, key.name, (8, 8)), **TOL,
                                   msg=lambda m: f"{key.name}: {m}")


def test_fp16_recording_owns_exactly_its_own_memory(tiny):
    """float16 on the CPU, contiguous, holding its own [b, heads, h, w, d] only (not a view that keeps the
    model's whole cond+uncond output alive)."""
    model = tiny.build("SD2", seed=4, dtype=torch.float16)
    patched, live = recorder.attach_recorder(model)
    run(tiny, patched, steps=2)
    for key, t in live.snapshot().layers.items():
        assert t.dtype == torch.float16 and t.device.type == "cpu" and t.is_contiguous(), key.name
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), key.name


def test_an_interrupted_run_lets_go_of_its_partial_recording(tiny, sd2):
    """A run stopped part-way (Cancel in the UI raises through the sampler) drops what it recorded so
    far: the running sums ('mean' keeps float32 ones on the sampling device) are freed, and the last
    finished run is still what is read."""
    patched, live = recorder.attach_recorder(sd2, steps="mean")
    first = run(tiny, patched, seed=1)
    calls = []

    def cancel_at_third(apply_model, args):
        calls.append(1)
        if len(calls) == 3:
            raise comfy.model_management.InterruptProcessingException()
        return apply_model(args["input"], args["timestep"], **args["c"])

    later = patched.clone()
    later.set_model_unet_function_wrapper(cancel_at_third)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run(tiny, later, seed=2, steps=4)
    store = live._store
    assert not store.active and store.acc == {} and store.count == {}
    assert live.snapshot(first).layers and live.runs == 1


def test_the_last_three_runs_are_kept(tiny, sd2):
    """The node's description and RECORDING tooltip promise the last 3 runs (a hires fix and an
    inpainting pass after the first sampler) and the run read last: planted 3, not read from the module."""
    patched, live = recorder.attach_recorder(sd2)
    latents = [run(tiny, patched, seed=s) for s in range(3)]
    for lat in latents:
        assert live.snapshot(lat).layers  # all three still readable
    assert live.snapshot(latents[1]).layers  # read last
    run(tiny, patched, seed=3)
    run(tiny, patched, seed=4)
    assert live.snapshot(latents[1]).layers  # older than the last 3, but read last
    # the very tensor read before still finds its run while it lives (ComfyUI's cache may hand it over
    # again); another tensor with its values, as a new sampling of the same seed gives, does not
    with pytest.raises(ValueError, match=r"^latent: .*Only the last 3 run\(s\) \(Record Self-Attention's keep_runs\), the newest 64 runs of the prompt that sampled last and the run read last are kept"):
        live.snapshot(latents[0].clone())
    assert live.snapshot(latents[0]).layers


@pytest.mark.parametrize("cls,label", [
    (comfy.supported_models.SD15, "SD15"), (comfy.supported_models.SD20, "SD2"),
    (comfy.supported_models.SD21UnclipL, "SD2"), (comfy.supported_models.SDXL, "SDXL"),
    (comfy.supported_models.SDXLRefiner, "SDXLRefiner"), (comfy.supported_models.SSD1B, "SSD1B"),
])
def test_model_label_of_each_family(cls, label):
    """README: the file's `model` is e.g. SD2 for SD2.0 and 2.1, SD15, SDXL."""
    stub = types.SimpleNamespace(model=types.SimpleNamespace(model_config=object.__new__(cls)))
    assert recorder.model_label(stub) == label


def test_an_sd15_recording_is_labelled_sd15(tiny):
    patched, live = recorder.attach_recorder(tiny.build("SD15"))
    tiny.sample(patched, *tiny.conditioning("SD15"), latent_hw=(8, 8), steps=1)
    assert live.snapshot().model == "SD15"


def test_a_later_block_number_patch_does_not_hide_an_earlier_full_key_patch(tiny, sd2):
    """ComfyUI prefers a (block, number, depth) patch to a (block, number) one. A full-key patch set
    before the record node (SAG's, another pack's) must still win over a (block, number) patch set after
    it: the picture is what it is without HeadSeg, and the layer records the full-key patch's output."""
    def shifted(q, k, v, extra):
        return 0.5 * attention(q, k, v, extra) + 0.1

    def halved(q, k, v, extra):
        return attention(q, k, v, extra) * 0.5

    base = sd2.clone()
    base.set_model_attn1_replace(shifted, "middle", 0, 0)
    alone = base.clone()
    alone.set_model_attn1_replace(halved, "middle", 0)
    want = run(tiny, alone, seed=5)
    short_only = sd2.clone()
    short_only.set_model_attn1_replace(halved, "middle", 0)
    assert (want - run(tiny, short_only, seed=5)).abs().max() > 1e-3  # which patch runs matters

    patched, live = recorder.attach_recorder(base)
    later = patched.clone()
    later.set_model_attn1_replace(halved, "middle", 0)
    with AttentionProbe(later) as probe:
        got = run(tiny, later, seed=5)
    assert (got - want).abs().max().item() <= 1e-4
    rec = live.snapshot(got)
    torch.testing.assert_close(rec.layers[LayerKey.parse("middle.0.0")].double(),
                               0.5 * reference(probe, "middle.0.0", (8, 8)) + 0.1, **TOL)


@pytest.mark.parametrize("steps,label", [({1, 2, 3, 6}, "1-3,6"), ({0, 5}, "0,5"), ({4}, "4"),
                                         ({0, 1, 4, 5}, "0-1,4-5"), ({2, 3}, "2-3")])
def test_steps_label_is_a_comma_separated_list_of_ranges(steps, label):
    """The recording's steps label when fewer steps than asked were recorded (planted answers)."""
    assert step_selection.steps_label(steps) == label


def test_a_label_of_recorded_steps_reads_back_as_those_steps(tiny, sd2):
    """The label of a range with a gap, parsed independently, gives back the steps the branch ran."""
    import comfy.samplers
    import nodes as comfy_nodes

    patched, live = recorder.attach_recorder(sd2, steps="0-5")
    pos, neg = tiny.conditioning("SD2")
    early = comfy_nodes.ConditioningSetTimestepRange().set_range(pos, 0.0, 0.3)[0]
    late = comfy_nodes.ConditioningSetTimestepRange().set_range(pos, 0.7, 1.0)[0]
    both = comfy_nodes.ConditioningCombine().combine(early, late)[0]
    with AttentionProbe(patched) as probe:
        tiny.sample(patched, both, neg, latent_hw=(8, 8), steps=6)
    sigmas = comfy.samplers.calculate_sigmas(sd2.get_model_object("model_sampling"), "normal", 6).tolist()
    called = {next(i for i in range(6) if abs(c.sigma - sigmas[i]) <= 1e-5 * max(sigmas[i], 1e-3))
              for c in probe.branch_calls("input.1.0")}
    label = live.snapshot().steps
    assert re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", label), label
    back = set()
    for part in label.split(","):
        a, _, b = part.partition("-")
        back |= set(range(int(a), int(b or a) + 1))
    assert back == called


def _beyond_float16(model, scale: float = 3e5):
    """Scales input.1.0's values (to_v) by ``scale`` and its to_out down by as much: the layer's head outputs
    then lie far beyond float16's range (65504) while the picture stays as it was, up to rounding."""
    attn1 = self_attention_modules(model.model.diffusion_model)["input.1.0"]
    with torch.no_grad():
        attn1.to_v.weight.mul_(scale)
        attn1.to_out[0].weight.div_(scale)
    return model


@pytest.mark.parametrize("steps", ["last", "mean"])
def test_values_of_a_float32_unet_beyond_float16_are_kept_in_float32(tiny, steps, caplog):
    """A float32 (or bfloat16) UNet's head outputs beyond float16's range are the model's own, finite values: the
    layer is kept in float32 as the model computed it, not made inf by the recorder's float16 (which Head PCA then
    refused as 'a float16 overflow while sampling', advising the float32 UNet already used); the others stay
    float16, and the log says which layer and why."""
    model = _beyond_float16(tiny.build("SD2", seed=4))
    patched, live = recorder.attach_recorder(model, steps=steps)
    with AttentionProbe(patched) as probe, caplog.at_level(logging.WARNING, logger="HeadSeg"):
        got = run(tiny, patched, seed=7, steps=2)
    rec = live.snapshot(got)
    key = LayerKey.parse("input.1.0")
    ref = reference(probe, "input.1.0", (8, 8), steps=steps)
    assert float(ref.abs().max()) > 1e5  # planted: the model's own values, beyond float16's range
    assert rec.layers[key].dtype == torch.float32
    torch.testing.assert_close(rec.layers[key].double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert {t.dtype for k, t in rec.layers.items() if k != key} == {torch.float16}
    assert "input.1.0" in caplog.text and "float16's range" in caplog.text


def test_values_of_a_bfloat16_unet_beyond_float16_are_kept_finite(tiny, tmp_path):
    """The same for a bfloat16 UNet (--bf16-unet): the layer is recorded finite, in float32, and Head PCA reads it.
    The recording is saved and loaded back bit for bit, that layer in float32 (the save refused it, so no file kept
    the run)."""
    from headseg.nodes.core.recording_file import load_recording, save_recording

    model = _beyond_float16(tiny.build("SD2", seed=4, dtype=torch.bfloat16))
    patched, live = recorder.attach_recorder(model)
    got = run(tiny, patched, seed=7, steps=2)
    rec = live.snapshot(got)
    layer = rec.layers[LayerKey.parse("input.1.0")]
    assert layer.dtype == torch.float32 and bool(layer.isfinite().all())
    assert float(layer.abs().max()) > 65504
    save_recording(rec, tmp_path / "wide.safetensors", name="recording")
    back = load_recording(tmp_path / "wide.safetensors")
    assert list(back.layers) == list(rec.layers)
    assert all(torch.equal(back.layers[k], t) and back.layers[k].dtype == t.dtype for k, t in rec.layers.items())


def test_a_float16_unets_own_overflow_stays_as_it_was(tiny):
    """A float16 UNet's own inf is the model's: recorded as it is, in float16 (Head PCA names the layer)."""
    model = _beyond_float16(tiny.build("SD2", seed=4, dtype=torch.float16), scale=1e6)
    patched, live = recorder.attach_recorder(model)
    got = run(tiny, patched, seed=7, steps=2)
    layer = live.snapshot(got).layers[LayerKey.parse("input.1.0")]
    assert layer.dtype == torch.float16 and not bool(layer.isfinite().all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["attention_basic", "attention_split", "attention_sub_quad", "attention_pytorch"])
def test_recording_keeps_the_models_attention_precision(tiny, monkeypatch, backend, dtype):
    """SD2.x asks for float32 attention (attn_precision); with an attention function that honours it
    (ComfyUI's basic/split/sub-quadratic ones), a float16 model samples the same picture recorded or not, and so
    does a bfloat16 one (--bf16-unet), with each of the attention functions ComfyUI's start-up flags choose
    (--use-split-cross-attention, --use-quad-cross-attention, --use-pytorch-cross-attention)."""
    monkeypatch.setattr(comfy_attention, "optimized_attention", getattr(comfy_attention, backend))
    model = tiny.build("SD2", seed=4, dtype=dtype)
    assert model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.attn_precision == torch.float32
    plain = run(tiny, model, seed=7, steps=2)
    patched, live = recorder.attach_recorder(model)
    recorded = run(tiny, patched, seed=7, steps=2)
    assert torch.equal(plain, recorded)


def test_the_patch_adjustments_leave_the_callers_options_alone(tiny, sd2):
    """The CALC_COND_BATCH wrapper adjusts the attn1 patches for one call on copies of model_options
    (its docstring: dicts copied down to it): the dicts it was given are not changed."""
    import copy

    patched, live = recorder.attach_recorder(sd2)
    later = patched.clone()
    other = lambda q, k, v, extra: attention(q, k, v, extra)  # noqa: E731
    later.set_model_attn1_replace(other, "middle", 0, 0)  # chained for the call
    later.set_model_attn1_replace(other, "input", 1)  # hides nothing: HeadSeg stands in for no (input, 1) patch
    options = later.model_options
    attn1_before = dict(options["transformer_options"]["patches_replace"]["attn1"])
    replace_before = dict(options["transformer_options"]["patches_replace"])
    snapshot = copy.copy(options["transformer_options"])
    adjusted = recorder._without_shadowing_patches(options)
    adjusted = recorder._chaining_later_patches(adjusted, live.store_id, live._store.layers)
    assert adjusted is not options
    assert adjusted["transformer_options"]["patches_replace"]["attn1"] is not attn1_before
    assert options["transformer_options"]["patches_replace"]["attn1"] == attn1_before
    assert dict(options["transformer_options"]["patches_replace"]) == replace_before
    assert options["transformer_options"].keys() == snapshot.keys()
