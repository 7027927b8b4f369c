"""Recording: layer keys, grid levels, validation, selection and the safetensors file format."""

import math
import os
import sys
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from headseg.nodes.core.numerics import all_finite
from headseg.nodes.core.recording import LayerKey, Recording, check_size, grid_levels, parse_levels
from headseg.nodes.core.recording_file import FORMAT, is_recording_file, load_recording, save_recording


# SD2.1: (block, number) -> (heads, grid level); 16 layers, 195 heads, 175 without the middle block.
SD21 = {
    ("input", 1): (5, 0), ("input", 2): (5, 0), ("input", 4): (10, 1), ("input", 5): (10, 1),
    ("input", 7): (20, 2), ("input", 8): (20, 2), ("middle", 0): (20, 3),
    ("output", 3): (20, 2), ("output", 4): (20, 2), ("output", 5): (20, 2),
    ("output", 6): (10, 1), ("output", 7): (10, 1), ("output", 8): (10, 1),
    ("output", 9): (5, 0), ("output", 10): (5, 0), ("output", 11): (5, 0),
}


def level_grid(latent, level):
    h, w = latent
    for _ in range(level):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


def sd21_recording(latent=(8, 8), batch=1, d=4, seed=0, dtype=torch.float16, layout=SD21):
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for (block, number), (heads, level) in layout.items():
        h, w = level_grid(latent, level)
        layers[LayerKey(block, number, 0)] = torch.randn(batch, heads, h, w, d, generator=g).to(dtype)
    return Recording(layers, (latent[0] * 8, latent[1] * 8), model="SD21", steps="last", branch="cond")


# ------------------------------------------------------------------------------------------ LayerKey
@pytest.mark.parametrize("name", ["input.1.0", "middle.0.0", "output.11.0", "input.7.9"])
def test_layer_key_parse_name_round_trip(name):
    key = LayerKey.parse(name)
    assert key.name == name
    assert LayerKey.parse(key.name) == key


@pytest.mark.parametrize("block,position", [("input", "down"), ("middle", "middle"), ("output", "up")])
def test_layer_key_position(block, position):
    assert LayerKey(block, 3, 0).position == position


@pytest.mark.parametrize("name", ["", "input", "input.1", "down.1.0", "input.a.0", "input.1.-1", "input.1.0.0", "Input.1.0"])
def test_layer_key_parse_rejects_bad_names(name):
    with pytest.raises(ValueError, match="layer name"):
        LayerKey.parse(name)


def test_layer_key_rejects_bad_fields():
    with pytest.raises(ValueError, match="block"):
        LayerKey("down", 1, 0)
    with pytest.raises(ValueError, match="number"):
        LayerKey("input", -1, 0)


def test_sort_key_is_unet_execution_order():
    names = ["output.11.0", "middle.0.0", "input.8.1", "output.2.0", "input.8.0", "input.1.0", "output.10.0"]
    ordered = sorted((LayerKey.parse(n) for n in names), key=lambda k: k.sort_key)
    assert [k.name for k in ordered] == [
        "input.1.0", "input.8.0", "input.8.1", "middle.0.0", "output.2.0", "output.10.0", "output.11.0"
    ]
    # SDXL: every transformer of block input.4 runs before any of input.5 (number before depth)
    sdxl = ["input.5.0", "input.4.1", "output.0.9", "input.4.0", "output.1.0", "input.5.1"]
    assert [k.name for k in sorted((LayerKey.parse(n) for n in sdxl), key=lambda k: k.sort_key)] == [
        "input.4.0", "input.4.1", "input.5.0", "input.5.1", "output.0.9", "output.1.0"
    ]


def test_image_sides_up_to_16384_pixels_are_taken():
    assert check_size((16384, 1)) == (16384, 1) and check_size([8, 16384]) == (8, 16384)
    for size in ((16385, 8), (8, 16385)):
        with pytest.raises(ValueError, match=r"size must be at most 16384 pixels per side"):
            check_size(size)


def test_recording_orders_layers_by_unet_order():
    rec = sd21_recording()
    shuffled = dict(reversed(list(rec.layers.items())))
    again = Recording(shuffled, rec.image_size)
    assert list(again.layers) == sorted(rec.layers, key=lambda k: k.sort_key)


# ------------------------------------------------------------------------------------------ shapes
def test_sd21_shape_facts():
    rec = sd21_recording(latent=(8, 8), batch=2).validate()
    assert rec.latent_size == (8, 8)
    assert rec.batch_size == 2
    assert rec.num_heads == 195
    assert rec.select(("down", "up")).num_heads == 175
    assert rec.select().num_heads == 175  # default: down + up, no middle block (as the paper)


@pytest.mark.parametrize(
    "latent,grids",
    [
        ((8, 12), [(8, 12), (4, 6), (2, 3), (1, 2)]),  # non-square, ceil halving
        ((64, 64), [(64, 64), (32, 32), (16, 16), (8, 8)]),
        ((96, 64), [(96, 64), (48, 32), (24, 16), (12, 8)]),
        ((9, 5), [(9, 5), (5, 3), (3, 2), (2, 1)]),
    ],
)

def test_grid_level_ceil_halving(latent, grids):
    layers = {LayerKey("input", i, 0): torch.zeros(1, 1, h, w, 2) for i, (h, w) in enumerate(grids)}
    rec = Recording(layers, (latent[0] * 8, latent[1] * 8))
    assert [rec.grid_level(k) for k in rec.layers] == [0, 1, 2, 3]
    rec.validate()


@pytest.mark.parametrize("grid", [(3, 3), (8, 8), (4, 5), (16, 12)])
def test_grid_that_fits_no_level_is_rejected(grid):
    rec = Recording({LayerKey("input", 4, 0): torch.zeros(1, 2, *grid, 4)}, (64, 96))  # latent 8x12
    with pytest.raises(ValueError, match=r"input\.4\.0.*fits no level") as info:
        rec.grid_level(LayerKey("input", 4, 0))
    # the image's sides named, not a bare 64x96 that the nodes' width x height texts would read as 64 wide
    assert f"grid of {grid[0]} rows x {grid[1]} columns" in str(info.value)
    assert "image 96 px wide and 64 px high" in str(info.value) and "8x12" in str(info.value)
    with pytest.raises(ValueError, match=r"input\.4\.0"):
        rec.validate()


@pytest.mark.parametrize(
    "text, levels",
    [("all", None), (" ALL ", None), ("*", None), ("", None), ("0", [0]), ("0, 1", [0, 1]),
     ("2,0,2", [0, 2]), ("0,1,", [0, 1]), ("3", [3])],
)
def test_parse_levels_accepts(text, levels):
    assert parse_levels(text) == levels


@pytest.mark.parametrize("text", ["x", "low", "-1", ",", "1.5", "0;1", "0-2", "1 2", "\u00b2", "\u0661", "0,\uff11"])
def test_parse_levels_rejects_naming_levels(text):
    with pytest.raises(ValueError, match=r"^levels: expected 'all' or grid levels"):
        parse_levels(text)


def test_parse_levels_of_thousands_of_digits():
    """More digits than Python's int() converts (4300, leading zeros too): its ValueError, naming no input, was
    the queue's answer; such a level is read as 10**9, which no recording has (refused as any level it lacks)."""
    assert parse_levels("0" * 5000 + "1") == [1]
    assert parse_levels("0," + "9" * 5000) == [0, 10**9]


def test_parse_levels_rejects_non_strings():
    with pytest.raises(TypeError, match=r"^levels: expected a string"):
        parse_levels(1)


@pytest.mark.parametrize("latent", [(0, 0), (0, 4), (-1, 4), (True, 2), (2.0, 2)])
def test_grid_levels_rejects_sizes_below_one(latent):
    with pytest.raises(ValueError, match="latent_size"):
        grid_levels(latent)


@pytest.mark.parametrize("name", ["input.\u00b2.0", "input.\u0661.0", "input.1.\u0660", "output.\uff11.0"])
def test_layer_key_rejects_non_ascii_digits(name):
    """Superscripts are not decimal, but Arabic-Indic and full-width digits are: int() would read them."""
    with pytest.raises(ValueError, match="layer name"):
        LayerKey.parse(name)


def test_recording_layers_must_be_tensors():
    with pytest.raises(TypeError, match=r"input\.1\.0.*torch\.Tensor|torch\.Tensor.*input\.1\.0"):
        Recording({LayerKey("input", 1, 0): np.zeros((1, 1, 8, 8, 4), np.float32)}, (64, 64))


def test_select_takes_level_strings_and_names_bad_arguments():
    rec = sd21_recording()
    assert list(rec.select(("down", "up"), "0,1").layers) == list(rec.select(("down", "up"), [0, 1]).layers)
    assert list(rec.select("down+up", "all").layers) == list(rec.select(("down", "up")).layers)
    for positions in (None, 5):
        with pytest.raises(ValueError, match="positions"):
            rec.select(positions)
    for levels in (1.0, object(), "low"):
        with pytest.raises(ValueError, match="levels"):
            rec.select(("down",), levels)


# ------------------------------------------------------------------------------------------ validate
def test_validate_returns_self():
    rec = sd21_recording()
    assert rec.validate() is rec


def test_validate_empty():
    with pytest.raises(ValueError, match="empty"):
        Recording({}, (64, 64)).validate()


def test_validate_not_5d_names_layer():
    with pytest.raises(ValueError, match=r"output\.3\.0.*5-D"):
        Recording({LayerKey("output", 3, 0): torch.zeros(1, 2, 64, 4)}, (64, 64)).validate()


def test_validate_batch_mismatch_names_layers():
    layers = {LayerKey("input", 1, 0): torch.zeros(2, 1, 8, 8, 4), LayerKey("output", 9, 0): torch.zeros(3, 1, 8, 8, 4)}
    with pytest.raises(ValueError, match=r"batch.*output\.9\.0.*input\.1\.0"):
        Recording(layers, (64, 64)).validate()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_validate_non_finite_names_layer(bad):
    rec = sd21_recording()
    key = LayerKey("output", 7, 0)
    rec.layers[key][0, 3, 1, 2, 0] = bad
    with pytest.raises(ValueError, match=r"output\.7\.0.*NaN or inf"):
        rec.validate()


@pytest.mark.parametrize("size", [(0, 64), (64,), "512x512", (64.0, 64), (16392, 64), (64, 100000)])
def test_bad_image_size(size):
    with pytest.raises(ValueError, match="image_size"):
        Recording({}, size)


# ------------------------------------------------------------------------------------------ select
def test_select_positions_and_levels():
    rec = sd21_recording(latent=(8, 12))
    up = rec.select(("up",))
    assert {k.block for k in up.layers} == {"output"}
    assert up.num_heads == 3 * 20 + 3 * 10 + 3 * 5
    fine = rec.select(("down", "up"), levels=[0])
    assert [k.name for k in fine.layers] == ["input.1.0", "input.2.0", "output.9.0", "output.10.0", "output.11.0"]
    coarse = rec.select("down,middle,up", levels=(2, 3))
    assert [k.name for k in coarse.layers] == [
        "input.7.0", "input.8.0", "middle.0.0", "output.3.0", "output.4.0", "output.5.0"
    ]
    assert coarse.image_size == rec.image_size and coarse.model == "SD21"


def test_select_nothing_left_lists_what_exists():
    rec = sd21_recording().select(("up",), levels=[0])
    with pytest.raises(ValueError, match=r"^positions / levels: no layer left.*positions \['up'\].*levels \[0\]"):
        rec.select(("down",))
    with pytest.raises(ValueError, match=r"levels \[0\]"):
        rec.select(("up",), levels=[3])


def test_select_bad_position():
    with pytest.raises(ValueError, match="positions"):
        sd21_recording().select(("sideways",))


# ------------------------------------------------------------------------------------------ files
@pytest.mark.parametrize("latent,batch", [((8, 8), 1), ((8, 12), 2)])
def test_save_load_round_trip(tmp_path, latent, batch):
    rec = sd21_recording(latent=latent, batch=batch, d=8)
    rec.steps, rec.branch, rec.model = "3-7", "uncond", "SD21"
    path = tmp_path / "rec.safetensors"
    save_recording(rec, path)
    back = load_recording(path)
    assert list(back.layers) == list(rec.layers)
    for key in rec.layers:
        assert back.layers[key].dtype == torch.float16
        assert torch.equal(back.layers[key], rec.layers[key])
    assert back.image_size == rec.image_size
    assert (back.model, back.steps, back.branch) == ("SD21", "3-7", "uncond")


def test_a_loaded_recording_keeps_its_values_when_its_file_is_rewritten_in_place(tmp_path):
    """safetensors maps the file into memory and its tensors read the mapped pages: a recording loaded (and kept
    in ComfyUI's cache) changed with the file when it was written over in place (a copy onto the same name),
    and once the file was cut shorter, the next read of the recording killed the whole process (SIGBUS); on
    Windows the mapped file could not be replaced or deleted while ComfyUI held the recording."""
    path = tmp_path / "rec.safetensors"
    save_recording(sd21_recording(seed=0), path)
    back = load_recording(path)
    expected = {key: t.clone() for key, t in back.layers.items()}
    other = tmp_path / "other.safetensors"
    save_recording(sd21_recording(seed=1), other)
    data = other.read_bytes()
    assert len(data) == path.stat().st_size  # same layout: the same header, other values
    with open(path, "r+b") as fh:  # in place: the same file, not a new one renamed over it
        fh.write(data)
    for key, t in back.layers.items():
        assert torch.equal(t, expected[key]), key


def test_saved_file_is_the_documented_format(tmp_path):
    from safetensors import safe_open

    rec = sd21_recording(latent=(8, 12), d=4, dtype=torch.float32)
    path = tmp_path / "rec.safetensors"
    save_recording(rec, str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert meta == {
            "format": FORMAT, "image_height": "64", "image_width": "96",
            "model": "SD21", "steps": "last", "branch": "cond",
        }
        assert set(f.keys()) == {k.name for k in rec.layers}
        t = f.get_tensor("output.11.0")
        assert t.dtype == torch.float16 and tuple(t.shape) == (1, 5, 8, 12, 4)


def test_extra_metadata_is_kept_below_the_formats_own_fields(tmp_path):
    from safetensors import safe_open

    rec = sd21_recording(latent=(8, 12), d=4)
    path = tmp_path / "rec.safetensors"
    save_recording(rec, str(path), extra_metadata={"prompt": "{}", "model": "not this", "workflow": "[1]"})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["prompt"] == "{}" and meta["workflow"] == "[1]" and meta["model"] == "SD21" and meta["format"] == FORMAT
    assert load_recording(str(path)).model == "SD21"
    with pytest.raises(TypeError, match="extra_metadata must map strings to strings"):
        save_recording(rec, str(tmp_path / "y.safetensors"), extra_metadata={"prompt": {"1": 2}})
    assert not (tmp_path / "y.safetensors").exists()


def test_a_loaded_recording_keeps_its_files_other_metadata_and_writes_it_again(tmp_path):
    """load_recording keeps the file's metadata beyond the format's own fields (ComfyUI's prompt and workflow)
    in Recording.metadata, through select() and to(); save_recording writes it again unless other
    extra_metadata is given ({} writes none), so a copy made with the core still says how it was made."""
    from safetensors import safe_open

    rec = sd21_recording(latent=(8, 12), d=4)
    assert rec.metadata is None  # made in memory (or recorded): no file's metadata
    first = tmp_path / "first.safetensors"
    save_recording(rec, str(first), extra_metadata={"prompt": '{"3": 1}', "workflow": "[1]"})
    loaded = load_recording(str(first))
    assert loaded.metadata == {"prompt": '{"3": 1}', "workflow": "[1]"}
    assert loaded.select().metadata == loaded.to("cpu").metadata == loaded.metadata
    for extra, expected in ((None, loaded.metadata), ({}, {}), ({"prompt": "other"}, {"prompt": "other"})):
        copy = tmp_path / "copy.safetensors"
        save_recording(loaded, str(copy), extra_metadata=extra)
        with safe_open(str(copy), framework="pt") as f:
            meta = f.metadata()
        assert {key: meta[key] for key in meta if key not in ("format", "image_height", "image_width", "model", "steps", "branch")} == expected


def test_extra_metadata_that_would_make_the_header_unreadable_is_left_out_largest_first(tmp_path):
    """The strings are JSON-escaped in the header: 1 MiB of quotes takes 2. The header is kept within the 4 MiB
    the web UI reads of a file dropped on it (past the 16 MiB load_recording reads, the file was written,
    then refused as 'not a safetensors file')."""
    rec = sd21_recording(latent=(8, 12), d=4)
    path = tmp_path / "rec.safetensors"
    quotes = '"' * (1 << 20)
    extra = {"workflow": quotes + quotes, "prompt": quotes, "small": "{}"}
    assert save_recording(rec, str(path), extra_metadata=extra) == ["workflow"]
    assert is_recording_file(str(path))
    loaded = load_recording(str(path))
    assert loaded.model == "SD21"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["prompt"] == quotes and meta["small"] == "{}" and "workflow" not in meta
    assert save_recording(rec, str(path), extra_metadata={"small": "{}"}) == []


def test_the_largest_entry_in_the_header_is_the_one_escaped_longest(tmp_path):
    """Left out largest first by their size in the header, JSON-escaped, whatever their order: 2 Mi quotes
    (4 MiB in the header) go before 3 Mi letters (3 MiB), though the quotes are the shorter string."""
    rec = sd21_recording(latent=(8, 12), d=4)
    path = tmp_path / "rec.safetensors"
    extra = {"workflow": "a" * (3 << 20), "prompt": '"' * (2 << 20)}
    assert save_recording(rec, str(path), extra_metadata=extra) == ["prompt"]
    assert load_recording(str(path)).model == "SD21"


def test_non_ascii_metadata_counts_its_utf8_bytes_in_the_header(tmp_path):
    """The header holds UTF-8 (safetensors escapes no non-ASCII character): 1.5 Mi two-byte characters are
    3 MiB and fit in the 4 MiB header kept, so they are kept (counted as \\u escapes, 9 MiB, they were left
    out)."""
    from safetensors import safe_open

    rec = sd21_recording(latent=(8, 12), d=4)
    path = tmp_path / "rec.safetensors"
    text = "\u00e9" * (3 << 19)
    assert save_recording(rec, str(path), extra_metadata={"prompt": text}) == []
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["prompt"] == text
    assert load_recording(str(path)).model == "SD21"


def test_metadata_just_under_the_header_limit_leaves_room_for_the_tensors_entries(tmp_path):
    """An entry whose JSON alone fits in the 4 MiB header but not with the tensors' entries (name, dtype,
    shape, offsets) beside it is left out: the file written stays loadable."""
    rec = sd21_recording(latent=(8, 12), d=4)
    path = tmp_path / "rec.safetensors"
    limit = 4 << 20
    extra = {"workflow": "a" * (limit - 400)}
    assert save_recording(rec, str(path), extra_metadata=extra) == ["workflow"]
    assert is_recording_file(str(path)) and load_recording(str(path)).model == "SD21"


@pytest.mark.parametrize("mib", [3.5, 5, 15])
def test_the_header_saved_fits_in_what_the_web_ui_reads_of_a_dropped_file(tmp_path, mib):
    """ComfyUI's web UI opens the workflow of a .safetensors file dropped on it from the file's first 4 MiB
    (the header's length in its first 4 bytes, the header after 8): a workflow of 3.5 MiB is kept and read
    back from that slice; one of 5 or 15 MiB (within the 16 MiB load_recording reads, so it was kept, and
    the drop failed with a JSON error) is left out, and the prompt left opens from the slice."""
    import json

    rec = sd21_recording(latent=(8, 12), d=4)
    path = tmp_path / "rec.safetensors"
    workflow = json.dumps({"nodes": [], "note": "w" * int(mib * (1 << 20))})
    left_out = save_recording(rec, str(path), extra_metadata={"workflow": workflow, "prompt": '{"1": {}}'})
    with open(path, "rb") as f:
        first = f.read(4 << 20)  # what the web UI reads
    n = int.from_bytes(first[:4], "little")
    metadata = json.loads(first[8 : 8 + n].decode("utf-8"))["__metadata__"]
    assert metadata["prompt"] == '{"1": {}}'
    if mib < 4:
        assert left_out == [] and metadata["workflow"] == workflow
    else:
        assert left_out == ["workflow"] and "workflow" not in metadata
    assert load_recording(str(path)).model == "SD21"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_layer_with_values_float16_makes_inf_is_written_in_float32(tmp_path, dtype):
    """A layer with finite values float16 would make inf (a float32 or bfloat16 UNet's own, which the recorder
    keeps in float32) is written in float32, bit for bit where float32 holds them; the other layers, and that
    layer's NaN, stay as float16 writes them. It was refused, so no file kept the run. Past float32's range
    (a float64 recording of the core API) it is refused, naming the layer."""
    from safetensors import safe_open

    rec = sd21_recording(dtype=dtype)
    key = LayerKey("input", 4, 0)
    rec.layers[key][0, 0, 0, 0, :2] = torch.tensor([1e6, float("nan")], dtype=dtype)
    save_recording(rec, tmp_path / "x.safetensors")
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes.pop(key.name) == "F32" and set(dtypes.values()) == {"F16"}
    back = load_recording(tmp_path / "x.safetensors")
    torch.testing.assert_close(back.layers[key], rec.layers[key].float(), rtol=0, atol=0, equal_nan=True)
    other = LayerKey("output", 4, 0)
    assert torch.equal(back.layers[other], rec.layers[other].half())
    if dtype == torch.float64:
        rec.layers[key][0, 0, 0, 0, 0] = 1e39
        with pytest.raises(ValueError, match=r"^save_recording: layer input\.4\.0 has values beyond the float32 range"):
            save_recording(rec, tmp_path / "y.safetensors")


def test_save_checks_the_float16_range_over_every_image_of_the_batch(tmp_path):
    """float16's largest number (65504), and 65519, which float16 rounds to it, are written in float16; 65520,
    which float16 makes inf, makes the layer float32, in the second image too. A head whose values lie below
    float16's normal numbers in one image only is no such head: it is saved."""
    rec = sd21_recording(dtype=torch.float32, batch=2)
    key = LayerKey("input", 4, 0)
    rec.layers[key][1, 0, 0, 0, 0] = 65504.0
    rec.layers[key][0, 1] *= 1e-6  # head 1: about 1e-6 in image 0, ordinary in image 1
    save_recording(rec, tmp_path / "x.safetensors")
    back = load_recording(tmp_path / "x.safetensors")
    assert float(back.layers[key][1, 0, 0, 0, 0]) == 65504.0 and back.layers[key].dtype == torch.float16
    rec.layers[key][1, 0, 0, 0, 0] = -65519.0
    save_recording(rec, tmp_path / "x.safetensors")
    assert load_recording(tmp_path / "x.safetensors").layers[key].dtype == torch.float16
    rec.layers[key][1, 0, 0, 0, 0] = 65520.0
    save_recording(rec, tmp_path / "y.safetensors")
    back = load_recording(tmp_path / "y.safetensors").layers[key]
    assert back.dtype == torch.float32 and float(back[1, 0, 0, 0, 0]) == 65520.0


def test_a_float64_value_float32_rounds_to_65520_makes_the_layer_float32(tmp_path):
    """torch casts float64 to float16 through float32: 65519.999 (below 65520 in float64) is 65520.0 in float32,
    which float16 makes inf. The layer is written in float32, finite; it was written in float16, made inf."""
    rec = sd21_recording(dtype=torch.float64)
    key = LayerKey("input", 4, 0)
    rec.layers[key][0, 0, 0, 0, 0] = 65519.999
    assert math.isinf(float(rec.layers[key].to(torch.float16)[0, 0, 0, 0, 0]))  # what a float16 file held
    save_recording(rec, tmp_path / "x.safetensors")
    back = load_recording(tmp_path / "x.safetensors").layers[key]
    assert back.dtype == torch.float32 and float(back[0, 0, 0, 0, 0]) == 65520.0
    assert bool(back.isfinite().all())

@pytest.mark.parametrize("batch", [1, 2])
def test_save_rejects_a_head_below_float16s_normal_numbers(tmp_path, batch):
    """float16 would keep few or none of its digits (1e-9 -> 0): refused, naming layer and head."""
    rec = sd21_recording(dtype=torch.float32, batch=batch)
    key = LayerKey("output", 4, 0)
    rec.layers[key][:, 2] *= 1e-6  # head 2 of every image: values of about 1e-6
    rec.layers[key][:, 3] = 0.0  # an all-zero head loses nothing
    with pytest.raises(ValueError, match=r"^save_recording: layer output\.4\.0, head 2: values at most .*below float16's smallest normal"):
        save_recording(rec, tmp_path / "x.safetensors")
    rec.layers[key][:, 2] = 0.0
    save_recording(rec, tmp_path / "x.safetensors")


def test_a_float16_head_of_subnormal_values_is_saved_as_it_is(tmp_path):
    """The recorder keeps float16: such a head loses nothing in the file, bit for bit."""
    rec = sd21_recording(dtype=torch.float16)
    key = LayerKey("output", 4, 0)
    rec.layers[key][:, 1] = (rec.layers[key][:, 1].float() * 1e-6).half()  # float16 subnormals
    assert 0 < float(rec.layers[key][:, 1].abs().max()) < torch.finfo(torch.float16).tiny
    save_recording(rec, tmp_path / "x.safetensors")
    back = load_recording(tmp_path / "x.safetensors").layers[key]
    assert torch.equal(back.view(torch.int16), rec.layers[key].view(torch.int16))


def test_a_float16_recording_is_written_without_a_copy_of_its_values(tmp_path):
    """A float16 layer (what the recorder keeps) has no value beyond float16's range, so save_recording writes
    it as it is, without the |value| copy of every layer that looks for one in other dtypes (the layer's size
    again, and 24 % of Save Recording's CPU time for SD2.1 at 512 x 512, 43 % for SDXL at 1024 x 1024); inf,
    NaN and float16's largest number are written too, bit for bit."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    rec = sd21_recording(dtype=torch.float16)
    key = LayerKey("input", 4, 0)
    rec.layers[key][0, 0, 0, 0, :3] = torch.tensor([float("inf"), float("nan"), 65504.0])
    with Ops() as ops:
        save_recording(rec, tmp_path / "x.safetensors")
    assert not [name for name in ops.names if name.startswith(("abs", "amax", "max"))], ops.names
    back = load_recording(tmp_path / "x.safetensors")
    for k, t in rec.layers.items():
        assert torch.equal(back.layers[k].view(torch.int16), t.view(torch.int16)), k


def test_all_finite_needs_no_second_look_at_a_float16_tensor_whose_sum_overflows(monkeypatch):
    """A float16 layer of values about 0.3 sums past float16's 65504: its float16 sum is inf, and all_finite
    then checked every element (ten times the time, on every layer Save and Load Recording look at). Read by
    its smallest and largest values it needs no second look; NaN and inf are still found."""
    t = torch.full((1, 5, 64, 64, 64), 0.3, dtype=torch.float16)
    assert math.isinf(float(t.sum()))
    looked = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda x: looked.append(x.dtype) or isfinite(x))
    assert all_finite(t) and all_finite(t.bfloat16()) and all_finite(t.float())
    assert looked == []
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dtype in (torch.float16, torch.bfloat16):
            u = t.to(dtype)
            u[0, 1, 2, 3, 4] = bad
            assert not all_finite(u), (bad, dtype)


_ALL_FINITE_MEMORY = """
import resource, runpy, sys
import torch
runpy.run_path(sys.argv[1])["import_checkout"]()
from headseg.nodes.core.numerics import all_finite
torch.set_num_threads(1)
t = torch.full((64, 1024, 1024), 0.3, dtype=getattr(torch, sys.argv[2]))  # 128 MiB
t[-1, -1, -1] = float(sys.argv[3])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
finite = all_finite(t)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(finite, (after - before) * 1024, t.numel() * t.element_size())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB and glibc's malloc: Linux")
@pytest.mark.parametrize("dtype,last", [("float16", "0.3"), ("bfloat16", "nan"), ("float16", "-inf")])
def test_all_finite_takes_no_float32_copy_of_a_half_tensor(dtype, last):
    """sum(dtype=float32) of a float16 or bfloat16 tensor converts all of it to float32 first on the CPU: a
    copy of twice its size (Load and Save Recording look at every layer, Head PCA at the selected ones).
    The process's peak memory grows by far less than the tensor. In a subprocess: peak RSS is per process."""
    import pathlib
    import subprocess

    checkout = pathlib.Path(__file__).resolve().parents[1] / "support" / "checkout.py"
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20))
    done = subprocess.run(
        [sys.executable, "-c", _ALL_FINITE_MEMORY, str(checkout), dtype, last],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    finite, grew, size = done.stdout.split()
    assert finite == str(last == "0.3")
    assert int(grew) < int(size) // 8, (int(grew), int(size))  # the float32 copy grew it by 2 - 2.5x the tensor


_LOAD_MEMORY = """
import runpy, sys
runpy.run_path(sys.argv[1])["import_checkout"]()
from headseg.nodes.core.recording_file import load_recording

def status(field):
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))

load_recording(sys.argv[2])  # a small file first: what the first load imports is not counted
with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
    fh.write("5")  # the peak (VmHWM) starts again from the resident memory now
before = status("VmRSS")
rec = load_recording(sys.argv[3])
print(status("VmHWM") - before, sum(t.numel() * t.element_size() for t in rec.layers.values()))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="resets the peak through Linux's /proc/self")
def test_loading_a_recording_takes_about_its_own_size_in_memory(tmp_path):
    """load_recording mapped the file (safetensors) and copied each layer out of the mapped pages, which stay
    resident until the file is closed: the peak was the heads twice (the pages and the copies; 374 MB for a
    185 MB SD2.1 file). Each layer is now read from the file into its own tensor: the peak is about the heads
    once. In a subprocess: the peak is per process."""
    import pathlib
    import subprocess

    small, large = tmp_path / "small.safetensors", tmp_path / "large.safetensors"
    save_recording(sd21_recording(), small)
    save_recording(sd21_recording(latent=(64, 64), batch=2, d=64), large)  # 46 MB of float16 heads
    checkout = pathlib.Path(__file__).resolve().parents[1] / "support" / "checkout.py"
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20))  # glibc gives a large free block back at once
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_MEMORY, str(checkout), str(small), str(large)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    grew, heads = map(int, done.stdout.split())
    assert heads >= large.stat().st_size * 0.99  # the file is the heads (and a header of a few kB)
    assert grew < heads * 1.25, (grew, heads)  # twice the heads when the file's pages were mapped


def test_all_finite_of_an_empty_half_tensor():
    for dtype in (torch.float16, torch.bfloat16):
        assert all_finite(torch.zeros(0, 3, dtype=dtype))


GOOD_META = {"format": FORMAT, "image_height": "64", "image_width": "64", "model": "SD21", "steps": "last", "branch": "cond"}


def write(tmp_path, tensors, metadata):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


def good_tensors():
    return {"input.1.0": torch.zeros(1, 2, 8, 8, 4, dtype=torch.float16), "output.4.0": torch.zeros(1, 3, 4, 4, 4, dtype=torch.float16)}


def test_load_good_handmade_file(tmp_path):
    rec = load_recording(write(tmp_path, good_tensors(), GOOD_META))
    assert [k.name for k in rec.layers] == ["input.1.0", "output.4.0"]
    assert rec.image_size == (64, 64) and rec.num_heads == 5


def test_load_wrong_format(tmp_path):
    path = write(tmp_path, good_tensors(), {**GOOD_META, "format": "headseg-recording/2"})
    with pytest.raises(ValueError, match=r"bad\.safetensors.*'format'.*headseg-recording/2"):
        load_recording(path)


def test_load_no_metadata(tmp_path):
    path = write(tmp_path, good_tensors(), None)
    with pytest.raises(ValueError, match=r"bad\.safetensors.*'format'.*missing"):
        load_recording(path)


@pytest.mark.parametrize("field", ["image_height", "image_width", "model", "steps", "branch"])
def test_load_missing_metadata_field(tmp_path, field):
    meta = {k: v for k, v in GOOD_META.items() if k != field}
    with pytest.raises(ValueError, match=rf"bad\.safetensors.*{field}"):
        load_recording(write(tmp_path, good_tensors(), meta))


@pytest.mark.parametrize("value", ["sixty-four", "-64", "0", "64.5", "", "\u00b2", "\u0663", "16385", "16392", "99999", "9" * 12, "9" * 5000])
def test_load_bad_image_height(tmp_path, value):
    with pytest.raises(ValueError, match=r"bad\.safetensors: metadata field 'image_height' must be an integer from 1 to 16384") as info:
        load_recording(write(tmp_path, good_tensors(), {**GOOD_META, "image_height": value}))
    assert len(str(info.value)) < 300  # a huge field is shown shortened


@pytest.mark.parametrize("field", ["model", "steps", "branch"])
def test_load_refuses_a_label_field_of_megabytes_with_a_short_message(tmp_path, field):
    """model, steps and branch were read whatever their length: a file whose model held 4 MiB loaded, and the
    recording carried it into Head PCA's summary (4 MB in /history at every run) and its text form, which ComfyUI
    writes into the error report of every node it is an input of (4 MB per report). Such a field is refused by
    name, shown shortened; a label of 256 characters still loads and is kept."""
    longest = 65536 if field == "steps" else 256
    kept = load_recording(write(tmp_path, good_tensors(), {**GOOD_META, field: "x" * longest}))
    assert getattr(kept, field) == "x" * longest
    with pytest.raises(ValueError, match=rf"bad\.safetensors: metadata field '{field}' must be a label such as .* of at most {longest} characters") as info:
        load_recording(write(tmp_path, good_tensors(), {**GOOD_META, field: "M" * (4 << 20)}))
    assert len(str(info.value)) < 300


def test_a_recording_of_every_other_step_of_a_long_run_is_saved_and_loaded_again(tmp_path):
    """The steps a run recorded are its label: a cache node that skipped every other step of ComfyUI's longest
    run (10 000 steps) gives '0,2,4,...,9998', about 24 000 characters, which a limit meant for labels such
    as 'last' would have refused when the file was loaded again."""
    steps = ",".join(str(i) for i in range(0, 10_000, 2))
    assert len(steps) > 20_000
    rec = sd21_recording(seed=0)
    rec.steps = steps
    path = str(tmp_path / "long.safetensors")
    save_recording(rec, path)
    assert load_recording(path).steps == steps


def test_load_a_zero_padded_image_height(tmp_path):
    assert load_recording(write(tmp_path, good_tensors(), {**GOOD_META, "image_height": "0000064"})).image_size == (64, 64)


def test_load_image_sides_of_16384_pixels(tmp_path):
    # the largest side taken (check_size's limit): a 2048 x 2048 latent, whose grid levels reach 8 x 8 (level 8)
    rec = load_recording(write(tmp_path, {"input.1.0": torch.zeros(1, 2, 8, 8, 4, dtype=torch.float16)},
                               {**GOOD_META, "image_height": "16384", "image_width": "016384"}))
    assert rec.image_size == (16384, 16384)


def test_shown_text_shows_a_text_of_up_to_the_limit_whole_and_a_longer_one_by_its_start_and_length():
    from headseg.nodes.core.values import shown_text

    assert shown_text("a" * 40) == "'" + "a" * 40 + "'"
    assert shown_text("a" * 41) == "'" + "a" * 20 + "'... (41 characters)"
    assert shown_text("b" * 80, 80) == "'" + "b" * 80 + "'"
    assert shown_text("b" * 81, 80) == "'" + "b" * 40 + "'... (81 characters)"


def test_load_float8_layer_names_it(tmp_path):
    tensors = {**good_tensors(), "output.4.0": torch.zeros(1, 3, 4, 4, 4).to(torch.float8_e4m3fn)}
    with pytest.raises(ValueError, match=r"bad\.safetensors: Recording: layer output\.4\.0 must be float16, bfloat16, float32 or float64, got torch\.float8_e4m3fn"):
        load_recording(write(tmp_path, tensors, GOOD_META))


def test_load_tensor_not_5d(tmp_path):
    tensors = {**good_tensors(), "output.4.0": torch.zeros(3, 16, 4, dtype=torch.float16)}
    with pytest.raises(ValueError, match=r"bad\.safetensors.*output\.4\.0.*5-D"):
        load_recording(write(tmp_path, tensors, GOOD_META))


def test_load_grid_that_cannot_fit_image(tmp_path):
    tensors = {**good_tensors(), "output.4.0": torch.zeros(1, 3, 5, 5, 4, dtype=torch.float16)}
    with pytest.raises(ValueError, match=r"bad\.safetensors.*output\.4\.0.*fits no level"):
        load_recording(write(tmp_path, tensors, GOOD_META))


def test_load_image_size_that_does_not_fit_grids(tmp_path):
    meta = {**GOOD_META, "image_height": "128"}  # latent 16x8: an 8x8 grid fits no level
    with pytest.raises(ValueError, match=r"bad\.safetensors.*input\.1\.0"):
        load_recording(write(tmp_path, good_tensors(), meta))


def test_load_batch_mismatch(tmp_path):
    tensors = {**good_tensors(), "output.4.0": torch.zeros(2, 3, 4, 4, 4, dtype=torch.float16)}
    with pytest.raises(ValueError, match=r"bad\.safetensors.*batch"):
        load_recording(write(tmp_path, tensors, GOOD_META))


def test_load_bad_tensor_name(tmp_path):
    tensors = {**good_tensors(), "attn1.weight": torch.zeros(1, 1, 8, 8, 4, dtype=torch.float16)}
    with pytest.raises(ValueError, match=r"bad\.safetensors.*attn1\.weight"):
        load_recording(write(tmp_path, tensors, GOOD_META))


@pytest.mark.parametrize("digits", ["1" * 5000, "1" + "0" * 9, "0" * 5000 + "4"], ids=["5000-ones", "1e9", "padded-4"])
def test_load_layer_numbers_beyond_any_unet_are_refused_in_the_files_words(tmp_path, digits):
    """A layer numbered with thousands of digits got Python's own 'Exceeds the limit (4300 digits)' text,
    and the message repeated the whole name; a number of 10**9 or more is no UNet's layer. Leading zeros
    still read as the number they pad."""
    name = f"output.{digits}.0"
    tensors = {**good_tensors(), name: torch.zeros(1, 2, 8, 8, 4, dtype=torch.float16)}
    path = write(tmp_path, tensors, GOOD_META)
    if digits.lstrip("0") == "4":
        with pytest.raises(ValueError, match=r"bad\.safetensors.*same layer output\.4\.0") as info:
            load_recording(path)
        assert len(str(info.value)) < 400
        return
    with pytest.raises(ValueError) as info:
        load_recording(path)
    message = str(info.value)
    assert "bad.safetensors" in message and "below 1000000000" in message and "digits" not in message.split(":")[0]
    assert "Exceeds the limit" not in message and len(message) < 400


@pytest.mark.parametrize("field", ["image_height", "image_width"])
def test_load_image_size_padded_past_pythons_digit_limit(tmp_path, field):
    """A size of a few digits behind thousands of zeros passed the length check (leading zeros stripped), then
    int() of the whole text answered in Python's words ('Exceeds the limit (4300 digits)'), naming no file or
    field. The zeros pad the number as anywhere else: 64 is read; one beyond the limit is refused by name."""
    rec = load_recording(write(tmp_path, good_tensors(), {**GOOD_META, field: " " + "0" * 5000 + "64"}))
    assert rec.image_size == (64, 64)
    with pytest.raises(ValueError, match=rf"bad\.safetensors: metadata field '{field}' must be an integer") as info:
        load_recording(write(tmp_path, good_tensors(), {**GOOD_META, field: "0" * 5000 + "99999"}))
    assert "Exceeds the limit" not in str(info.value) and len(str(info.value)) < 300


@pytest.mark.parametrize("name", ["input." + "1" * 5000 + ".0", "input.1." + "9" * 10], ids=["5000-digits", "10-digits"])
def test_layer_key_parse_refuses_huge_numbers_with_a_short_message(name):
    with pytest.raises(ValueError, match=r"layer name.*below 1000000000") as info:
        LayerKey.parse(name)
    assert len(str(info.value)) < 300


def test_layer_key_parse_takes_numbers_just_below_a_billion():
    assert LayerKey.parse("output.999999999.0000999999999") == LayerKey("output", 999999999, 999999999)


def test_load_two_names_of_one_layer(tmp_path):
    tensors = {**good_tensors(), "input.01.0": torch.zeros(1, 2, 8, 8, 4, dtype=torch.float16)}
    with pytest.raises(ValueError, match=r"bad\.safetensors.*'input\.0?1\.0' and 'input\.0?1\.0'.*same layer"):
        load_recording(write(tmp_path, tensors, GOOD_META))


def test_load_no_layers(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({}, str(path), metadata=GOOD_META)
    with pytest.raises(ValueError, match=r"bad\.safetensors.*no layer"):
        load_recording(path)


def test_a_file_the_system_cannot_read_is_not_called_a_damaged_one(tmp_path, monkeypatch):
    """The system's refusal to read a file while its layers are read (a disk error, no memory for the read) is
    no verdict on the file, which is not called damaged."""
    import headseg.nodes.core.recording_file as recording_file_module

    path = tmp_path / "rec.safetensors"
    save_recording(sd21_recording(seed=0), path)

    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(recording_file_module, "read_tensors", refuse)
    with pytest.raises(ValueError, match=r"rec\.safetensors: could not be read \(Cannot allocate memory") as info:
        load_recording(path)
    assert "not a safetensors file" not in str(info.value) and "damaged" not in str(info.value)


def test_load_not_a_safetensors_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ValueError, match=r"bad\.safetensors"):
        load_recording(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_recording(tmp_path / "nope.safetensors")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_load_a_folder_or_a_pipe_says_what_it_is(tmp_path):
    folder = tmp_path / "dir.safetensors"
    folder.mkdir()
    with pytest.raises(ValueError, match=r"dir\.safetensors: is a folder"):
        load_recording(folder)
    pipe = tmp_path / "pipe.safetensors"
    os.mkfifo(pipe)  # opening a pipe for reading would wait for a writer forever
    with pytest.raises(ValueError, match=r"pipe\.safetensors: not a regular file"):
        load_recording(pipe)
    answer = []
    probe = threading.Thread(target=lambda: answer.append(is_recording_file(pipe)), daemon=True)
    probe.start()
    probe.join(timeout=10)  # a probe that opens the pipe fails the test instead of hanging the run
    assert answer == [False]


def test_load_unreadable_file_says_it_cannot_be_read(tmp_path, monkeypatch):
    path = write(tmp_path, good_tensors(), GOOD_META)
    import headseg.nodes.core.recording_file as recording_file_module

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(recording_file_module, "open", refuse, raising=False)  # root may read any file: fake it
    with pytest.raises(ValueError, match=r"bad\.safetensors: cannot read the file \(Permission denied\)"):
        load_recording(path)


def handmade(tmp_path, header: dict, data: bytes):
    """A file laid out as safetensors with ``header`` as written, whatever it says, then ``data``."""
    import json

    text = json.dumps(header).encode("utf-8")
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


def test_a_header_that_does_not_describe_its_data_is_refused_by_name(tmp_path):
    """load_recording reads the header itself (no longer through safetensors, which checked it): a tensor's
    bytes must be its shape's, the tensors must fill the data with no gap or overlap, dtypes and shapes must be
    safetensors' and the metadata text; each is refused naming the file and the tensor."""
    layer = {"dtype": "F16", "shape": [1, 2, 8, 8, 4], "data_offsets": [0, 1024]}
    other = {"dtype": "F16", "shape": [1, 3, 4, 4, 4], "data_offsets": [1024, 1408]}
    data = bytes(1408)
    good = {"__metadata__": GOOD_META, "input.1.0": layer, "output.4.0": other}
    assert load_recording(handmade(tmp_path, good, data)).num_heads == 5  # as written here, it loads
    cases = {
        "tensor 'output.4.0': 512 bytes in the file, where shape [1, 3, 4, 4, 4] of F16 takes 384": (
            {**good, "output.4.0": {**other, "data_offsets": [1024, 1536]}}, bytes(1536)),
        "tensor 'output.4.0' leaves bytes 1024 to 1100 unused": (
            {**good, "output.4.0": {**other, "data_offsets": [1100, 1484]}}, bytes(1484)),
        "tensor 'output.4.0' overlaps the tensor before it": (
            {**good, "output.4.0": {**other, "data_offsets": [1000, 1384]}}, bytes(1384)),
        "its tensors take 1408 bytes of data, the file holds 1500": (good, bytes(1500)),
        "tensor 'output.4.0': unknown dtype 'F12'": ({**good, "output.4.0": {**other, "dtype": "F12"}}, data),
        "tensor 'output.4.0': shape '[1, 3, -4, 4, 4]' is no list of sizes": (
            {**good, "output.4.0": {**other, "shape": [1, 3, -4, 4, 4]}}, data),
        "tensor 'output.4.0': data_offsets '[1408, 1024]' are no [begin, end] of bytes": (
            {**good, "output.4.0": {**other, "data_offsets": [1408, 1024]}}, data),
        "tensor 'output.4.0': expected its dtype, shape and data_offsets": (
            {**good, "output.4.0": [1, 2]}, data),
        "its __metadata__ must map text to text": ({**good, "__metadata__": {**GOOD_META, "steps": 3}}, data),
    }
    for expected, (header, body) in cases.items():
        with pytest.raises(ValueError) as info:
            load_recording(handmade(tmp_path, header, body))
        assert str(info.value) == f"{tmp_path / 'odd.safetensors'}: not a safetensors file ({expected})", expected


def handmade_pairs(tmp_path, pairs: list, data: bytes):
    """A file laid out as safetensors whose header is a JSON object of ``pairs`` as given (a key may repeat,
    which no dict holds), each value JSON's text of it, then ``data``."""
    import json

    text = "{" + ",".join(f"{json.dumps(key)}:{value if isinstance(value, str) else json.dumps(value)}" for key, value in pairs) + "}"
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(text.encode()).to_bytes(8, "little") + text.encode() + data)
    return path


def test_a_key_the_header_gives_twice_is_refused_by_name(tmp_path):
    """JSON parsing keeps the last of a key given twice without a word: a file naming a tensor twice loaded one
    of the two entries (which one being a choice of the parser), as did a metadata field or a tensor's dtype
    given twice. Refused, naming the file and the key (the tensor's name); a file list, which asks the format
    only, still lists it, so that choosing it says what is wrong."""
    import json

    layer = {"dtype": "F16", "shape": [1, 2, 8, 8, 4], "data_offsets": [0, 1024]}
    meta = json.dumps(GOOD_META)
    assert load_recording(handmade_pairs(tmp_path, [("__metadata__", meta), ("input.1.0", layer)], bytes(1024))).num_heads == 2
    bf16 = {**layer, "dtype": "BF16"}
    info = '{"dtype": "F32", "dtype": "F16", "shape": [1, 2, 8, 8, 4], "data_offsets": [0, 1024]}'
    cases = [
        ("its header names tensor 'input.1.0' twice", [("__metadata__", meta), ("input.1.0", layer), ("input.1.0", layer)]),
        ("its header names tensor 'input.1.0' twice", [("input.1.0", layer), ("__metadata__", meta), ("input.1.0", bf16)]),
        ("its __metadata__ gives 'format' twice", [("__metadata__", meta.replace("{", '{"format": "other", ', 1)), ("input.1.0", layer)]),
        ("its header gives __metadata__ twice", [("__metadata__", json.dumps({})), ("input.1.0", layer), ("__metadata__", meta)]),
        ("tensor 'input.1.0': its header gives 'dtype' twice", [("__metadata__", meta), ("input.1.0", info)]),
    ]
    for expected, pairs in cases:
        path = handmade_pairs(tmp_path, pairs, bytes(1024))
        with pytest.raises(ValueError) as raised:
            load_recording(path)
        assert str(raised.value) == f"{path}: not a safetensors file ({expected})", expected
        assert is_recording_file(path)


@pytest.mark.parametrize("shape", [[0, 2**40, 2**40, 1, 1], [0, 2**63, 1, 1, 1], [1, 0, 2**62, 2, 1]])
def test_an_empty_tensor_of_sizes_no_tensor_can_have_is_refused_by_name(tmp_path, shape):
    """An empty tensor's bytes are none, whatever its other sizes, so its offsets and the file's size agree with
    a shape such as [0, 2**40, 2**40, 1, 1]; torch cannot make such a tensor (its strides overflow; a size of
    2**63 or more is no int64): that reached the user as torch's RuntimeError or TypeError with a C++ trace.
    Refused like any other header fault, naming the file and the tensor, before a layer is read."""
    good = {"dtype": "F16", "shape": [1, 2, 8, 8, 4], "data_offsets": [0, 1024]}
    header = {"__metadata__": GOOD_META, "input.1.0": good, "output.4.0": {"dtype": "F16", "shape": shape, "data_offsets": [1024, 1024]}}
    with pytest.raises(ValueError) as info:
        load_recording(handmade(tmp_path, header, bytes(1024)))
    assert str(info.value) == (
        f"{tmp_path / 'odd.safetensors'}: not a safetensors file (tensor 'output.4.0': shape {str(shape)!r} is larger than "
        f"any tensor can be (its sizes other than 0 multiply to 2**63 bytes or more))"
    )


def test_every_tensor_read_equals_safetensors_own_reading(tmp_path):
    """safetensors_reader against safetensors' own reader, on a file safetensors wrote: every dtype it writes,
    empty and 0-d tensors, any order of names and bytes, tensors read one at a time (read_tensor) and all in
    the order of their bytes (read_tensors: small ones in runs, those of 64 KiB or more on their own); the same
    dtype, shape and bits, each tensor in a storage of its own."""
    import json

    from safetensors import safe_open

    from headseg.nodes.core.safetensors_reader import read_tensor, read_tensors, tensor_entries

    g = torch.Generator().manual_seed(0)
    tensors = {
        f"t{i}_{str(dtype).removeprefix('torch.')}": (torch.randn(3, 5, 2, generator=g) * 100).to(dtype)
        for i, dtype in enumerate((torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.uint8,
                                   torch.int8, torch.int16, torch.int32, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2))
    }
    tensors.update({"empty": torch.zeros(2, 0, 3), "scalar": torch.tensor(7.5, dtype=torch.float64)})
    tensors.update({"large": torch.randn(2, 8192, generator=g), "large16": torch.randn(32768, generator=g).half()})
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path))
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
        entries = tensor_entries(header, path.stat().st_size - 8 - n)
        alone = {entry.name: read_tensor(fh, 8 + n, entry) for entry in reversed(entries)}
        together = {entry.name: tensor for entry, tensor in read_tensors(fh, 8 + n, entries)}
    assert set(alone) == set(together) == set(tensors)
    storages = {t.untyped_storage().data_ptr() for t in together.values() if t.numel()}
    assert len(storages) == sum(t.numel() > 0 for t in together.values())  # no tensor a view of another's bytes
    with safe_open(str(path), framework="pt") as f:
        for name in tensors:
            theirs = f.get_tensor(name)
            for read in (alone, together):
                assert read[name].dtype == theirs.dtype and read[name].shape == theirs.shape, name
                assert torch.equal(read[name].reshape(-1).view(torch.uint8), theirs.reshape(-1).view(torch.uint8)), name
                assert read[name]._base is None, name


@pytest.mark.parametrize("latent, d", [((8, 8), 4), ((32, 32), 64)])  # layers of 2.5 kB at most; up to 655 kB
def test_a_file_cut_shorter_while_it_is_read_is_called_truncated(tmp_path, monkeypatch, latent, d):
    """A file cut shorter after its size was checked ends before a layer does: named as truncated (an empty
    read), never a layer read in part; whether the layer cut is read in a run of small ones or on its own."""
    import re

    import headseg.nodes.core.recording_file as recording_file_module

    path = tmp_path / "rec.safetensors"
    save_recording(sd21_recording(latent=latent, d=d, seed=0), path)
    real = recording_file_module.tensor_entries
    cut = {}

    def cut_once_checked(header, data_bytes):
        entries = real(header, data_bytes)
        largest = max(entries[1:], key=lambda entry: entry.end - entry.begin)
        os.truncate(path, path.stat().st_size - data_bytes + largest.begin + 10)  # 10 bytes into that layer
        cut.update(name=largest.name, missing=largest.end - largest.begin - 10, size=largest.end - largest.begin)
        return entries

    monkeypatch.setattr(recording_file_module, "tensor_entries", cut_once_checked)
    with pytest.raises(ValueError) as info:
        load_recording(path)
    # the bytes the file lacks, but those read ahead with the header before the cut (buffered)
    said = re.fullmatch(rf"{re.escape(str(path))}: damaged or truncated: the file ends (\d+) bytes before tensor "
                        rf"{re.escape(repr(cut['name']))} does", str(info.value))
    assert said and 0 < int(said[1]) <= cut["missing"], str(info.value)
    assert (cut["size"] >= 64 << 10) == (d == 64)  # read on its own; in a run of small layers


class _CountedReads:
    """An open file that counts the reads asked of it (a read of the header, each read of the data)."""

    def __init__(self, fh):
        self.fh, self.reads = fh, 0

    def read(self, size=-1):
        self.reads += 1
        return self.fh.read(size)

    def readinto(self, buffer):
        self.reads += 1
        return self.fh.readinto(buffer)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.fh.close()


def test_a_file_of_many_tiny_layers_is_read_in_a_few_reads(tmp_path, monkeypatch):
    """A file of ~170 000 tensors of a few bytes (what a header of 16 MiB holds) took ~9.5 s to load, a read and
    some ten calls per tensor: tensors of less than 64 KiB that follow each other are read in one read (up to
    1 MiB), each then copied into a tensor of its own, its bytes as saved; layers of 64 KiB or more (any real
    recording's) are each read straight into their tensors, a read each, as before."""
    import headseg.nodes.core.recording_file as recording_file_module
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    tiny = {LayerKey("output", i, 0): torch.randn(1, 1, 1, 1, 2, generator=g).half() for i in range(3000)}
    large = {LayerKey("input", i, 0): torch.randn(1, 2, 1, 1, 16384, generator=g).half() for i in range(3)}  # 64 KiB
    path = tmp_path / "many.safetensors"
    save_recording(Recording({**tiny, **large}, (8, 8)), path)
    opened, real_open = [], open

    def counted_open(file, *args, **kwargs):
        opened.append(_CountedReads(real_open(file, *args, **kwargs)))
        return opened[-1]

    monkeypatch.setattr(recording_file_module, "open", counted_open, raising=False)
    rec = load_recording(path)
    assert len(opened) == 1 and opened[0].reads <= 2 + 1 + 3  # the header (length, text), the tiny ones, the large
    saved = load_file(str(path))
    assert rec.layers.keys() == {**tiny, **large}.keys()
    for key, t in rec.layers.items():
        assert t.dtype == torch.float16 and torch.equal(t, saved[key.name]), key


def test_a_load_leaves_the_cycle_collector_as_it_found_it(tmp_path):
    """load_recording pauses Python's cycle collector while it makes its objects (~2 million for a header of
    ~170 000 tensors, each collection walking them all again): on again after it, also when it fails, and left
    off when it was off."""
    import gc

    path = tmp_path / "rec.safetensors"
    save_recording(sd21_recording(seed=0), path)
    bad = handmade(tmp_path, {"__metadata__": GOOD_META, "input.1.0": {"dtype": "F16", "shape": [1], "data_offsets": [0, 4]}}, bytes(4))
    try:
        for was_on in (True, False):
            gc.enable() if was_on else gc.disable()
            load_recording(path)
            assert gc.isenabled() == was_on
            with pytest.raises(ValueError, match="not a safetensors file"):
                load_recording(bad)
            assert gc.isenabled() == was_on
    finally:
        gc.enable()


def test_a_load_reads_and_parses_the_header_once(tmp_path, monkeypatch):
    """The header was read and parsed twice per load (a check that the file is readable, then again for its
    layers), each a JSON parse of up to 16 MiB: it is read once, and the layers from the same open file."""
    import json

    import headseg.nodes.core.recording_file as recording_file_module

    path = tmp_path / "rec.safetensors"
    save_recording(sd21_recording(seed=0), path)
    header_bytes = int.from_bytes(path.read_bytes()[:8], "little")
    parses, opened = [], []
    real_loads, real_open = json.loads, open

    def counted_loads(text, *args, **kwargs):
        if len(text) == header_bytes:
            parses.append(len(text))
        return real_loads(text, *args, **kwargs)

    def counted_open(file, *args, **kwargs):
        opened.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(json, "loads", counted_loads)
    monkeypatch.setattr(recording_file_module, "open", counted_open, raising=False)
    assert load_recording(path).num_heads == sd21_recording(seed=0).num_heads
    assert parses == [header_bytes] and opened == [str(path)]


def test_load_truncated_file_says_so(tmp_path):
    data = write(tmp_path, good_tensors(), GOOD_META).read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-5])
    with pytest.raises(ValueError, match=rf"cut\.safetensors: damaged or truncated: its header describes {len(data)} bytes, the file has {len(data) - 5}"):
        load_recording(cut)
    header_cut = tmp_path / "header_cut.safetensors"
    header_cut.write_bytes(data[:20])
    with pytest.raises(ValueError, match=r"header_cut\.safetensors: not a safetensors file"):
        load_recording(header_cut)


def test_a_shape_of_very_many_sizes_is_named_in_a_short_message(tmp_path):
    """A header of up to 16 MiB may give a tensor a shape of a million sizes: the message naming its wrong
    byte count, or its shape that is not 5-D, wrote the whole shape (300 kB for 100 000 sizes), which ComfyUI
    shows in the page and keeps in its history. The first sizes are shown, and how many there are."""
    many = [1] * 100_000
    cases = {
        "tensor 'input.1.0': 4 bytes in the file, where shape [1, 1, 1, 1, 1, 1, ...] (100000 sizes) of F16 takes 2": (
            {"dtype": "F16", "shape": many, "data_offsets": [0, 4]}),
        "layer 'input.1.0' must be 5-D [B, heads, h, w, d], got shape (1, 1, 1, 1, 1, 1, ...) (100001 sizes)": (
            {"dtype": "F16", "shape": many + [2], "data_offsets": [0, 4]}),
    }
    for expected, layer in cases.items():
        path = handmade(tmp_path, {"__metadata__": GOOD_META, "input.1.0": layer}, bytes(4))
        with pytest.raises(ValueError) as info:
            load_recording(path)
        assert str(info.value).startswith(f"{path}: ") and expected in str(info.value), expected
        assert len(str(info.value)) < len(str(path)) + 200


def test_a_header_claiming_an_end_of_thousands_of_digits_is_named_truncated(tmp_path):
    """JSON holds integers of up to 4300 digits, which Python reads; the file's size check then wrote the bytes
    the header describes (8 + header + the end, a digit more) into its message, which Python refuses for more
    than 4300 digits: the user got "Exceeds the limit (4300 digits) for integer string conversion" and no file
    name. Named as damaged or truncated, the claim shown in a few characters."""
    for end in (int("9" * 4300), 2**64):
        header = {"__metadata__": GOOD_META, "input.1.0": {"dtype": "F16", "shape": [1, 2, 8, 8, 4], "data_offsets": [0, end]}}
        path = handmade(tmp_path, header, bytes(1024))
        with pytest.raises(ValueError) as info:
            load_recording(path)
        assert str(info.value) == (
            f"{path}: damaged or truncated: its header describes more than 2**64 bytes, the file has {path.stat().st_size}"
        )


@pytest.mark.skipif(sys.platform != "linux", reason="macOS and Windows refuse such names themselves")
def test_load_name_that_is_not_utf8_asks_for_a_rename(tmp_path):
    data = write(tmp_path, good_tensors(), GOOD_META).read_bytes()
    odd = os.path.join(os.fsencode(tmp_path), b"r\xff.safetensors")
    with open(odd, "wb") as fh:
        fh.write(data)
    with pytest.raises(ValueError, match=r"r\\xff\.safetensors: the file name is not valid UTF-8.*rename"):
        load_recording(os.fsdecode(odd))
    with pytest.raises(ValueError, match=r"not valid UTF-8"):
        load_recording(odd)  # bytes paths too


def test_is_recording_file_follows_a_changed_file(tmp_path):
    """Answers are kept per version of a file: a file rewritten in place gets a new answer, also when
    the new one has the same size."""
    path = write(tmp_path, good_tensors(), GOOD_META)
    assert is_recording_file(path)
    save_file({"w": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    assert not is_recording_file(path)
    save_file(good_tensors(), str(path), metadata=GOOD_META)
    assert is_recording_file(path)
    size = path.stat().st_size
    save_file(good_tensors(), str(path), metadata={**GOOD_META, "format": FORMAT.replace("recording", "recordinX")})
    assert path.stat().st_size == size and not is_recording_file(path)


def test_is_recording_file_asks_again_after_a_passing_read_error(tmp_path, monkeypatch):
    """A lock or too many open files must not hide a recording until the file changes."""
    import headseg.nodes.core.recording_file as recording_file_module

    path = write(tmp_path, good_tensors(), GOOD_META)

    def busy(*args, **kwargs):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(recording_file_module, "open", busy, raising=False)
    assert not is_recording_file(path)
    monkeypatch.undo()
    assert is_recording_file(path)


def test_a_nul_in_the_path_is_named():
    with pytest.raises(ValueError, match=r"cannot read the file \(.*null"):
        load_recording("rec\x00.safetensors")


def test_select_single_level_and_unknown_layer():
    rec = sd21_recording()
    assert [k.name for k in rec.select("up", levels=2).layers] == ["output.3.0", "output.4.0", "output.5.0"]
    with pytest.raises(ValueError, match="levels"):
        rec.select(levels=[-1])
    with pytest.raises(ValueError, match=r"no layer input\.3\.0"):
        rec.grid_level(LayerKey("input", 3, 0))


def test_validate_rejects_non_layer_keys_and_integer_tensors():
    with pytest.raises(ValueError, match="LayerKey"):
        Recording({"input.1.0": torch.zeros(1, 1, 8, 8, 4)}, (64, 64)).validate()
    for dtype in (torch.int64, torch.float8_e4m3fn, torch.complex64):
        with pytest.raises(ValueError, match=r"input\.1\.0 must be float16, bfloat16, float32 or float64, got"):
            Recording({LayerKey("input", 1, 0): torch.zeros(1, 1, 8, 8, 4, dtype=dtype)}, (64, 64)).validate()


def test_is_recording_file_reads_only_the_header(tmp_path):
    assert is_recording_file(write(tmp_path, good_tensors(), GOOD_META))
    other = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(3)}, str(other), metadata={"format": "pt"})
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain))  # no metadata at all
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")  # a header length no file has
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes((4).to_bytes(8, "little") + b"\xff\xfe{}")
    for path in (other, plain, empty, huge, junk, tmp_path / "missing.safetensors", tmp_path):
        assert not is_recording_file(path), path
    nested = tmp_path / "nested.safetensors"
    body = b"[" * 100_000 + b"]" * 100_000  # JSON nested deeper than Python's parser recurses
    nested.write_bytes(len(body).to_bytes(8, "little") + body)
    assert not is_recording_file(nested)
    cut = tmp_path / "cut.safetensors"  # a recording whose tensor data is cut off: the header alone decides
    data = write(tmp_path, good_tensors(), GOOD_META).read_bytes()
    n = int.from_bytes(data[:8], "little")
    cut.write_bytes(data[: 8 + n + 3])
    assert is_recording_file(cut)


def test_save_into_a_missing_folder_names_it(tmp_path):
    rec = Recording({LayerKey("input", 1, 0): torch.randn(1, 2, 8, 8, 4)}, (64, 64))
    with pytest.raises(ValueError, match=r"^save_recording: path .*: the folder .*nowhere.* does not exist"):
        save_recording(rec, tmp_path / "nowhere" / "rec.safetensors")


@pytest.mark.parametrize("bad", [5, (1, 2, 3), "8x8"])
def test_grid_levels_names_its_argument(bad):
    with pytest.raises(ValueError, match="^grid_levels: latent_size must be two ints"):
        grid_levels(bad)


def test_an_image_side_not_a_multiple_of_8_has_the_latent_vae_encode_makes():
    """VAE Encode keeps the largest multiple of 8: a 100 x 100 picture has a 12 x 12 latent."""
    rec = Recording({LayerKey("input", 1, 0): torch.randn(1, 1, 12, 12, 2)}, (100, 100))
    assert rec.latent_size == (12, 12)
    rec.validate()


def test_text_forms_of_a_recording_and_its_features_name_the_layers_not_their_values():
    """ComfyUI writes the text of every input of a failed node into its error report (websocket and /history):
    a loaded SD2.1 recording at 512 x 512 printed its tensors' values, 320 kB (about 19 kB per layer, 1.3 MB for
    SDXL's 70), into every report of Head PCA (a level it lacks, a layer with NaN), and its features 208 kB into
    Upsample's. Each layer is named with its dtype and shape instead."""
    from headseg.nodes.core.pca import HeadFeatures

    rec = sd21_recording(latent=(64, 64), d=64)  # SD2.1's 16 layers at 512 x 512
    text = repr(rec)
    assert str(rec) == text and len(text) < 1500, len(text)
    assert "input.1.0: float16 [1, 5, 64, 64, 64]" in text and "output.11.0: float16 [1, 5, 64, 64, 64]" in text
    assert text.endswith("image_size=(512, 512), model='SD21', steps='last', branch='cond')")
    assert all(key.name in text for key in rec.layers) and "tensor(" not in text
    layers = {key: torch.zeros(1, t.shape[1], t.shape[2], t.shape[3], 4) for key, t in rec.layers.items()}
    feats = repr(HeadFeatures(layers, (512, 512), 4))
    assert len(feats) < 1500 and "tensor(" not in feats and "middle.0.0: float32 [1, 20, 8, 8, 4]" in feats
    assert feats.endswith("image_size=(512, 512), components=4)")


def test_a_loaded_recordings_text_form_leaves_its_files_prompt_and_workflow_out(tmp_path):
    """ComfyUI writes the text of a failed node's inputs into its error report: a loaded recording's
    workflow (often tens of kB) made every such report that much longer."""
    rec = sd21_recording(seed=0)
    path = str(tmp_path / "x.safetensors")
    save_recording(rec, path, extra_metadata={"workflow": "W" * 50_000, "prompt": "P" * 20_000})
    loaded = load_recording(path)
    assert loaded.metadata["workflow"] == "W" * 50_000
    assert "WWWW" not in repr(loaded) and "PPPP" not in repr(loaded) and "model='SD21'" in repr(loaded)



def test_the_file_format_and_io_readme_placed_in_recording_are_still_importable_from_it():
    """README's core API named ``recording`` for the file format and its I/O, which moved to recording_file: the
    imports written against it give recording_file's own objects, and a name neither module has is still refused."""
    from headseg.nodes.core import recording, recording_file
    from headseg.nodes.core.recording import FORMAT as old_format, load_recording as old_load, save_recording as old_save

    assert old_format is recording_file.FORMAT
    assert old_load is recording_file.load_recording and old_save is recording_file.save_recording
    for name in ("METADATA_KEYS", "MAX_LABEL_CHARS", "MAX_STEPS_LABEL_CHARS", "file_version", "printable_path",
                 "is_utf8_path", "is_recording_file"):
        assert getattr(recording, name) is getattr(recording_file, name), name
    with pytest.raises(AttributeError, match="no_such_name"):
        recording.no_such_name
    assert not hasattr(recording, "_read_header")  # private to the file module
