"""HeadSeg_RecordSelfAttention as ComfyUI sees it: schema, options, errors, model handling, registry."""

import copy
import gc

import pytest
import torch

from headseg.nodes import recorder
from headseg.nodes.core.recording import LayerKey
from headseg.nodes.core.recording_file import load_recording, save_recording
from headseg.nodes.record_node import RecordSelfAttention

# Full-size tables (notes and the paper): SD2.1 at 512x512 -> 64x64 latent.
SD2_LAYERS = {  # name: (relative heads, grid level)  -- SD2.1 heads are 5/10/20 = 5 * relative
    "input.1.0": (1, 0), "input.2.0": (1, 0), "input.4.0": (2, 1), "input.5.0": (2, 1),
    "input.7.0": (4, 2), "input.8.0": (4, 2), "middle.0.0": (4, 3),
    "output.3.0": (4, 2), "output.4.0": (4, 2), "output.5.0": (4, 2),
    "output.6.0": (2, 1), "output.7.0": (2, 1), "output.8.0": (2, 1),
    "output.9.0": (1, 0), "output.10.0": (1, 0), "output.11.0": (1, 0),
}


@pytest.fixture(scope="module")
def sd2(tiny):
    return tiny.build("SD2")


def execute(model, **options):
    out = RecordSelfAttention.execute(model=model, **options)
    patched, live = out.result
    return patched, live


def test_schema_has_id_description_and_tooltips():
    RecordSelfAttention.VALIDATE_CLASS()
    info = RecordSelfAttention.GET_NODE_INFO_V1()
    assert info["name"] == "HeadSeg_RecordSelfAttention"
    assert info["output"] == ["MODEL", "HEADSEG_RECORDING"]
    assert len(info["description"]) > 80
    for name, (kind, opts) in info["input"]["required"].items():
        assert len(opts.get("tooltip", "")) > 20, name
    assert all(len(t) > 20 for t in info["output_tooltips"])
    defaults = {k: v[1].get("default") for k, v in info["input"]["required"].items()}
    assert defaults == {"model": None, "down": True, "middle": True, "up": True, "levels": "all",
                        "steps": "last", "branch": "cond"}
    # optional, so that API prompts saved before it existed still run, with the 3 runs kept then
    (kind, opts), = [info["input"]["optional"]["keep_runs"]]
    assert kind == "INT" and (opts["default"], opts["min"], opts["max"]) == (3, 1, 64) and len(opts["tooltip"]) > 20


def test_keep_runs_reaches_the_recording(tiny, sd2):
    patched, live = execute(sd2, keep_runs=1)
    first = tiny.sample(patched, *tiny.conditioning("SD2"), latent_hw=(8, 8), steps=1, seed=1)
    tiny.sample(patched, *tiny.conditioning("SD2"), latent_hw=(8, 8), steps=1, seed=2)
    with pytest.raises(ValueError, match=r"Only the last 1 run\(s\)"):
        live.snapshot(first)
    patched, live = execute(sd2)  # left out, as in prompts saved before it existed: 3
    first = tiny.sample(patched, *tiny.conditioning("SD2"), latent_hw=(8, 8), steps=1, seed=1)
    tiny.sample(patched, *tiny.conditioning("SD2"), latent_hw=(8, 8), steps=1, seed=2)
    assert live.snapshot(first).layers


def test_all_sd2_layers_with_heads_and_grids(tiny):
    patched, live = execute(tiny.build("SD2"))
    tiny.sample(patched, *tiny.conditioning("SD2"), latent_hw=(16, 16), steps=1)
    rec = live.snapshot()
    assert [k.name for k in rec.layers] == list(SD2_LAYERS)  # UNet order
    base = rec.layers[LayerKey.parse("input.1.0")].shape[1]
    for key, t in rec.layers.items():
        heads, level = SD2_LAYERS[key.name]
        side = 16 // 2**level
        assert tuple(t.shape) == (1, heads * base, side, side, 8), key.name
        assert rec.grid_level(key) == level
    assert rec.num_heads == 39 * base and rec.model == "SD2"
    assert {layer.key.name: layer.level for layer in live.layers} == {n: lv for n, (_, lv) in SD2_LAYERS.items()}


def test_sdxl_depth_keys_and_sd15_head_widths(tiny):
    patched, live = execute(tiny.build("SDXL"))
    tiny.sample(patched, *tiny.conditioning("SDXL"), latent_hw=(8, 8), steps=1)
    names = [k.name for k in live.snapshot().layers]
    assert names[:5] == ["input.4.0", "input.4.1", "input.5.0", "input.5.1", "input.7.0"]
    assert "input.7.2" in names and "middle.0.2" in names and names[-1] == "output.5.1"
    assert len(names) == 2 * 2 + 2 * 3 + 3 + 3 * 3 + 3 * 2
    assert live.snapshot().model == "SDXL"
    assert {layer.level for layer in live.layers} == {1, 2}  # SDXL: no attention on the latent grid

    patched, live = execute(tiny.build("SD15"))
    tiny.sample(patched, *tiny.conditioning("SD15"), latent_hw=(8, 8), steps=1)
    rec = live.snapshot()
    assert {t.shape[1] for t in rec.layers.values()} == {8}  # SD1.5: 8 heads everywhere
    assert [rec.layers[LayerKey.parse(n)].shape[-1] for n in ("input.1.0", "input.4.0", "input.7.0")] == [4, 8, 16]


def test_input_model_is_not_modified_and_output_is_a_clone(tiny):
    model = tiny.build("SD2")
    before = copy.deepcopy(model.model_options)
    wrappers_before = copy.deepcopy(model.wrappers)
    patched, _ = execute(model)
    assert patched is not model and patched.model is model.model
    assert model.model_options == before and model.wrappers == wrappers_before
    attn1 = patched.model_options["transformer_options"]["patches_replace"]["attn1"]
    assert set(attn1) == {(k.block, k.number, k.depth) for k in map(LayerKey.parse, SD2_LAYERS)}


@pytest.mark.parametrize("builder", ["dit", "noattn"])
def test_model_without_unet_self_attention_is_refused(tiny, builder):
    model = tiny.build_dit() if builder == "dit" else tiny.build("NOATTN")
    with pytest.raises(ValueError, match="model: .*(DiT|no UNet self-attention)"):
        execute(model)


@pytest.mark.parametrize("options,match", [
    (dict(levels="x"), "levels"),
    (dict(levels="4,5"), "levels: .* grid levels \\[0, 1, 2, 3\\]"),
    (dict(steps="2-1"), "steps"),
    (dict(steps="every"), "steps"),
    (dict(branch="both"), "branch"),
    (dict(down=False, middle=False, up=False), "down/middle/up"),
])
def test_bad_options_name_the_argument(sd2, options, match):
    with pytest.raises(ValueError, match=match):
        execute(sd2, **options)


def test_levels_that_the_model_lacks_are_named_in_the_log(sd2, tiny, caplog):
    """'0,7': level 7 does not exist (a typo for 0,1?): recorded without it, and the log says so."""
    import logging

    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        patched, live = execute(sd2, levels="0,7")
    assert "levels 0,7: the chosen positions of this model have self-attention at grid levels [0, 1, 2, 3] only; " \
        "level(s) [7] are skipped" in caplog.text
    tiny.sample(patched, *tiny.conditioning("SD2"), latent_hw=(8, 8), steps=1)
    rec = live.snapshot()
    assert {rec.grid_level(key) for key in rec.layers} == {0}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        execute(sd2, levels="0,1")
    assert "skipped" not in caplog.text


def test_validate_inputs_reports_bad_strings():
    assert RecordSelfAttention.validate_inputs(levels="all", steps="last") is True
    assert RecordSelfAttention.validate_inputs(levels="0, 1", steps="3-7") is True
    assert "levels" in RecordSelfAttention.validate_inputs(levels="low", steps="last")
    assert "steps" in RecordSelfAttention.validate_inputs(levels="all", steps="-3")
    # thousands of digits (more than Python's int() converts): Python's own "Exceeds the limit (4300 digits)"
    # came back, naming no input; read as 10**9, a step or level the run lacks, as any other one it lacks
    assert RecordSelfAttention.validate_inputs(levels="0," + "9" * 5000, steps="0-" + "9" * 5000) is True
    assert RecordSelfAttention.validate_inputs(levels="all", steps="0" * 5000 + "3") is True
    assert "steps" in RecordSelfAttention.validate_inputs(levels="all", steps="9" * 5000 + "-3")
    # a reversed range is refused also where both ends lie past 10**9 (both read as 10**9, it passed)
    for steps in ("3000000000-2000000000", "1000000001-1000000000", "9" * 5000 + "-" + "9" * 4999):
        answer = RecordSelfAttention.validate_inputs(levels="all", steps=steps)
        assert answer is not True and answer.startswith("steps: "), (steps[:30], answer)
    assert RecordSelfAttention.validate_inputs(levels="all", steps="2000000000-0003000000000") is True
    for digits in ("\u0663", "1-\u0664", "\uff12"):  # other scripts' digits, which int() would read
        assert "steps" in RecordSelfAttention.validate_inputs(levels="all", steps=digits), digits
    # a linked widget (None when queued) is checked when the node runs; the others still are now
    assert RecordSelfAttention.validate_inputs(levels=None, steps="-3").startswith("steps: ")
    assert RecordSelfAttention.validate_inputs(levels=None, branch="sideways").startswith("branch: ")
    assert RecordSelfAttention.validate_inputs(levels="low", steps=None).startswith("levels: ")
    assert RecordSelfAttention.validate_inputs(levels=None, steps=None, branch=None) is True


@pytest.mark.parametrize("levels", ["all", "*", "0,1,", " 2 , 0 ", "low", "-1", ","])
def test_levels_mean_the_same_in_record_and_head_pca(levels):
    from headseg.nodes.head_pca_node import HeadPCA

    record, pca = RecordSelfAttention.validate_inputs(levels=levels), HeadPCA.validate_inputs(levels=levels)
    assert (record is True) == (pca is True), (record, pca)


def test_not_a_model_is_a_type_error():
    with pytest.raises(TypeError, match="model"):
        execute(torch.nn.Linear(2, 2))


def test_recording_round_trips_through_the_file_format(tiny, tmp_path):
    patched, live = execute(tiny.build("SD2"), middle=False)
    tiny.sample(patched, *tiny.conditioning("SD2"), latent_hw=(8, 12), steps=2)
    rec = live.snapshot()
    path = tmp_path / "rec.safetensors"
    save_recording(rec, path)
    back = load_recording(path)
    assert [k.name for k in back.layers] == [k.name for k in rec.layers] and len(back.layers) == 15
    assert back.image_size == (64, 96) and (back.model, back.steps, back.branch) == ("SD2", "last", "cond")
    for key, t in rec.layers.items():
        assert torch.equal(back.layers[key], t)
    assert rec.select(("down", "up")).num_heads == rec.num_heads  # core selection works on it


def test_dropped_recording_frees_its_store_and_the_model_still_samples(tiny):
    model = tiny.build("SD2")
    patched, live = execute(model)
    store_id = live.store_id
    assert store_id in recorder._REGISTRY
    del live
    gc.collect()
    assert store_id not in recorder._REGISTRY
    out = tiny.sample(patched, *tiny.conditioning("SD2"), latent_hw=(8, 8), steps=1)
    ref = tiny.sample(model, *tiny.conditioning("SD2"), latent_hw=(8, 8), steps=1)
    assert (out - ref).abs().max() <= 1e-4


def test_patches_survive_deepcopy_of_model_options(tiny):
    patched, live = execute(tiny.build("SD2"))
    copied = copy.deepcopy(patched.model_options)
    a = patched.model_options["transformer_options"]["patches_replace"]["attn1"]
    b = copied["transformer_options"]["patches_replace"]["attn1"]
    assert all(a[k] is b[k] for k in a)  # plain closures: deepcopy keeps the same function



def test_a_position_the_model_lacks_names_the_switches(tiny, monkeypatch):
    """A UNet without a middle transformer (KOALA's layout: transformer_depth_middle = -1) recorded with only
    'middle' on: the error names the node's down/middle/up switches, not an input the node does not have."""
    monkeypatch.setitem(tiny.LAYOUTS, "NOMID", dict(tiny.LAYOUTS["SD2"], transformer_depth_middle=-1))
    monkeypatch.setitem(tiny._CONFIGS, "NOMID", tiny._CONFIGS["SD2"])
    model = tiny.build("NOMID")
    with pytest.raises(ValueError) as info:
        execute(model, down=False, middle=True, up=False)
    message = str(info.value)
    assert message.startswith("down/middle/up: ") and "'down', 'up'" in message, message
    assert "positions" not in message, message
