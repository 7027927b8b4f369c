"""What ComfyUI and a user see of the pack's registration and of Save / Load Recording, checked against
the pack's own shipped references (js/docs/<node id>.md pages, the example workflows, README) and
planted answers."""

from __future__ import annotations

import json
import pathlib
import re

import pytest
import torch

from headseg.tests.core.planted import nested_scene, planted_recording, small_layout

pytestmark = pytest.mark.comfy

REPO = pathlib.Path(__file__).resolve().parents[2]
DOCS = REPO / "js" / "docs"


def node_classes():
    """The node classes the pack's V3 entry point hands ComfyUI."""
    from headseg.tests.support.comfy_in_process import pack_node_classes

    return pack_node_classes()


def test_every_documented_node_is_registered_under_its_id():
    """js/docs holds one page per node id (README: 'each node has a docs page'): the extension registers
    exactly those ids."""
    documented = {p.stem for p in DOCS.glob("HeadSeg_*.md")}
    assert len(documented) == 10
    registered = {cls.GET_NODE_INFO_V1()["name"] for cls in node_classes()}
    assert registered == documented


def test_every_node_schema_is_valid_with_tooltips_everywhere():
    """README: every input and output has a tooltip in the UI (Save / Load Recording included)."""
    for cls in node_classes():
        cls.VALIDATE_CLASS()
        info = cls.GET_NODE_INFO_V1()
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert len(spec[1].get("tooltip") or "") > 10, (info["name"], name)
        assert all(len(t or "") > 10 for t in info["output_tooltips"]), info["name"]
        assert len(info["description"]) > 40, info["name"]


def test_recording_nodes_ids_and_category():
    from headseg.nodes import recording_io_nodes as io_nodes

    for cls, node_id in ((io_nodes.SaveRecording, "HeadSeg_SaveRecording"), (io_nodes.LoadRecording, "HeadSeg_LoadRecording")):
        info = cls.GET_NODE_INFO_V1()
        assert info["name"] == node_id and info["category"] == "HeadSeg/recording"
    assert io_nodes.SaveRecording.GET_NODE_INFO_V1()["output_node"] is True


def test_web_directory_holds_the_frontend_and_the_docs():
    import headseg

    web = REPO / headseg.WEB_DIRECTORY
    assert (web / "headseg.js").is_file()
    assert {p.stem for p in (web / "docs").glob("*.md")} >= {"HeadSeg_RecordSelfAttention", "HeadSeg_LoadRecording"}


@pytest.mark.parametrize("workflow", sorted((REPO / "example_workflows").glob("*.json")), ids=lambda p: p.stem)
def test_socket_types_match_the_shipped_workflows(workflow):
    """Every HeadSeg link of the example workflows carries the type that its source output and its target
    input declare (a renamed socket type breaks every saved workflow)."""
    infos = {cls.GET_NODE_INFO_V1()["name"]: cls.GET_NODE_INFO_V1() for cls in node_classes()}
    data = json.loads(workflow.read_text())
    nodes = {n["id"]: n for n in data["nodes"]}
    checked = 0
    for _, src, src_slot, dst, dst_slot, kind in data["links"]:
        a, b = nodes[src], nodes[dst]
        if a["type"] in infos:
            assert infos[a["type"]]["output"][src_slot] == kind, (a["type"], src_slot, kind)
            checked += 1
        if b["type"] in infos:
            name = b["inputs"][dst_slot]["name"]
            inputs = {**infos[b["type"]]["input"]["required"], **infos[b["type"]]["input"].get("optional", {})}
            assert inputs[name][0] == kind, (b["type"], name, kind)
            checked += 1
    assert checked >= 8


@pytest.mark.parametrize("workflow", sorted((REPO / "example_workflows").glob("*.json")), ids=lambda p: p.stem)
def test_checkpoint_loaders_say_where_their_model_comes_from(workflow):
    """ComfyUI's front end offers to download a missing model named in a node's properties.models (name =
    the widget value, a huggingface.co .safetensors URL, the models folder): every checkpoint the examples
    load is named there, so dragging one in on a fresh ComfyUI says where SD2.1 comes from."""
    data = json.loads(workflow.read_text())
    loaders = [n for n in data["nodes"] if n["type"] == "CheckpointLoaderSimple"]
    assert loaders
    for node in loaders:
        (model,) = node["properties"]["models"]
        assert model["name"] == node["widgets_values"][0] == "v2-1_512-ema-pruned.safetensors"
        assert model["directory"] == "checkpoints"
        assert model["url"] == (
            "https://huggingface.co/stabilityai/stable-diffusion-2-1-base/resolve/main/v2-1_512-ema-pruned.safetensors"
        )


def test_zero_shot_workflow_ships_the_papers_recipe():
    """Paper section 5: the photo's latent, 2 steps at denoise 0.05 with an empty prompt, on the recorded
    MODEL (the end-to-end runs lower every sampler's steps to keep CI short, so the shipped values are
    checked here)."""
    data = json.loads((REPO / "example_workflows" / "headseg_zero_shot_photo.json").read_text())
    nodes = {n["id"]: n for n in data["nodes"]}
    links = {link[0]: link for link in data["links"]}

    def source(node, name):
        slot = next(i for i in node["inputs"] if i["name"] == name)
        return nodes[links[slot["link"]][1]]

    recorders = [n for n in nodes.values() if n["type"] == "HeadSeg_RecordSelfAttention"]
    samplers = [n for n in nodes.values() if n["type"] == "KSampler" and source(n, "model") in recorders]
    assert len(recorders) == 1 and len(samplers) == 1
    seed, control, steps, cfg, sampler, scheduler, denoise = samplers[0]["widgets_values"]
    assert (steps, denoise) == (2, 0.05)
    assert source(samplers[0], "latent_image")["type"] == "VAEEncode"
    assert source(source(samplers[0], "latent_image"), "pixels")["type"] in ("ImageScale", "LoadImage")
    for branch in ("positive", "negative"):
        prompt = source(samplers[0], branch)
        assert prompt["type"] == "CLIPTextEncode" and prompt["widgets_values"] == [""], branch
    load = next(n for n in nodes.values() if n["type"] == "LoadImage")
    assert load["widgets_values"][0] == "example.png"  # ComfyUI's own input picture, named in README and the note


def test_load_recording_lists_the_files_and_says_what_it_loaded(comfy_folders):
    """The file combo lists the input folder's recordings; the UI text gives width x height in pixels."""
    from headseg.nodes import recording_io_nodes as io_nodes
    from headseg.nodes.core.recording_file import save_recording

    rec = planted_recording([nested_scene(128, 192)], layout=small_layout(heads=2), d=8, seed=3)  # 128 high, 192 wide
    save_recording(rec, comfy_folders["input"] / "r.safetensors")
    info = io_nodes.LoadRecording.GET_NODE_INFO_V1()
    assert info["input"]["required"]["file"][1]["options"] == ["r.safetensors"]
    out = io_nodes.LoadRecording.execute("r.safetensors", "")
    assert out.ui["text"][0].endswith(f"{rec.num_heads} heads in {len(rec.layers)} layers, 192x128 px")


def test_save_recording_saves_the_run_of_its_latent(comfy_folders):
    """With a live recording, Save Recording writes the sampling run that produced its LATENT (not the
    most recent one), and refuses to run without the LATENT."""
    from headseg.nodes import recorder, recording_io_nodes as io_nodes
    from headseg.nodes.core.recording_file import load_recording
    from headseg.tests.support import tiny_unets as tiny

    patched, live = recorder.attach_recorder(tiny.build("SD2", seed=0))
    pos, neg = tiny.conditioning("SD2")
    a = tiny.sample(patched, pos, neg, latent_hw=(8, 8), steps=1, seed=1)
    b = tiny.sample(patched, pos, neg, latent_hw=(8, 12), steps=1, seed=2)  # a later pass, another size
    for latent, size in ((a, (64, 64)), (b, (64, 96))):
        path = io_nodes.SaveRecording.execute(live, "live", latent={"samples": latent}).args[0]
        assert load_recording(path).image_size == size
    with pytest.raises(ValueError, match="^latent: connect the sampler's LATENT"):
        io_nodes.SaveRecording.execute(live, "live")
    with pytest.raises(ValueError, match="^latent: .*not the output"):
        io_nodes.SaveRecording.execute(live, "live", latent={"samples": torch.zeros(1, 4, 8, 8)})


def test_readme_states_how_far_vae_encode_for_inpaint_moves_a_masks_edges():
    """README (Limitations): VAEEncodeForInpaint stretches a mask of VAE Encode's centre crop to the full photo and
    crops it again, which moves its edges. The number of pixels README states is the largest shift ComfyUI's own
    node makes for photo sides 8m .. 8m + 7 (a 1007 px side: 4 px, a mask edge at column 929 lands at 933)."""

    import nodes as comfy_nodes

    class StubVAE:  # the node's mask path reads only downscale_ratio; encode's latent is not looked at
        downscale_ratio = 8

        def encode(self, pixels):
            return torch.zeros(pixels.shape[0], 4, pixels.shape[1] // 8, pixels.shape[2] // 8)

    worst = 0
    for side in range(1000, 1008):
        W = side // 8 * 8  # the masks' width: VAE Encode's crop
        edges = torch.arange(1, W)  # [E] first masked column of each mask
        masks = (torch.arange(W)[None, None, :] >= edges[:, None, None]).float().expand(-1, 8, -1)  # [E, 8, W]
        pixels = torch.zeros(len(edges), 8, side, 3)  # [E, 8, side, 3] the photo
        out = comfy_nodes.VAEEncodeForInpaint().encode(StubVAE(), pixels, masks, grow_mask_by=0)[0]["noise_mask"]
        row = out[:, 0, 4]  # [E, W] one row of each noise mask
        starts = torch.where(row.any(1), row.argmax(1), torch.full_like(edges, W))  # [E] first masked column
        worst = max(worst, int((starts - edges).abs().max()))
    stated = re.search(r"moves its edges by up to (\d+) pixels", (REPO / "README.md").read_text())
    assert stated and int(stated.group(1)) == worst



def _stated_numbers(pattern: str, text: str) -> list[int]:
    """The numbers ``pattern``'s group 1 finds in ``text``, written with or without thin spaces ('65 520')."""
    return [int(re.sub(r"[\s\u202f]", "", m.group(1))) for m in re.finditer(pattern, text)]


def test_readme_and_docs_state_the_float32_layer_threshold_of_the_code():
    """README, Record Self-Attention's and Save Recording's pages say which layers the recorder keeps, and Save
    Recording writes, in float32: those with values float16 makes inf, FP16_OVERFLOW (65520) or more. They said
    'beyond float16's range (65504)', though a layer peaking between the two is kept and written in float16
    (float16 rounds such a value to 65504, as near as it rounds any)."""
    from headseg.nodes.core.numerics import FP16_OVERFLOW

    said = r"float16 makes inf[,;]? \(?(\d[\d\u202f ]*\d) or more"
    for page in (REPO / "README.md", DOCS / "HeadSeg_RecordSelfAttention.md", DOCS / "HeadSeg_SaveRecording.md"):
        text = page.read_text()
        assert _stated_numbers(said, text), f"{page.name} does not say which layers are kept in float32"
        assert set(_stated_numbers(said, text)) == {int(FP16_OVERFLOW)}, page.name
        assert not re.search(r"float16's range[,(]? ?\(?65[\u202f ]?504", text), f"{page.name}: 65504 named as the float32 threshold"



def test_readme_and_docs_state_the_limits_of_the_code():
    """The limits README and the docs pages quote are the code's: more_points' pixels (core MAX_POINTS, which the
    picker's rings share), the header Save Recording keeps within (the 4 MiB the web UI reads of a dropped file)
    and the header Load Recording reads (16 MiB), and the picker's largest saved frame (16384 px)."""
    from headseg.nodes.core.masks import MAX_POINTS
    from headseg.nodes.core.recording_file import _MAX_HEADER_BYTES, _SAVED_HEADER_BYTES

    readme = (REPO / "README.md").read_text()
    select = (DOCS / "HeadSeg_MaskSelectAtPixel.md").read_text()
    save = (DOCS / "HeadSeg_SaveRecording.md").read_text()
    picker = (REPO / "js" / "picker_pixels.js").read_text()
    frame = int(re.search(r"const MAX_GRID_SIDE = (\d+);", picker).group(1))
    side = r"(\d[\d\u202f ]*\d) ?px"
    for limit, pattern, texts in [
        (MAX_POINTS, r"more than (\d+) pixels, refused when queued", [readme]),
        (MAX_POINTS, r"`more_points` takes at most (\d+) pixels", [readme]),
        (MAX_POINTS, r"rings on the first (\d+)", [readme, select]),
        (MAX_POINTS, r"one of more than (\d+) pixels, is refused", [select]),
        ((_SAVED_HEADER_BYTES + 8) >> 20, r"(\d+) MiB (?:the|ComfyUI's) web UI reads", [readme, save]),
        (_MAX_HEADER_BYTES >> 20, r"Load Recording reads (?:headers up to )?(\d+) MiB", [readme]),
        (frame, r"wider or taller than " + side, [readme, select]),
    ]:
        for text in texts:
            stated = _stated_numbers(pattern, " ".join(text.split()))  # lines joined
            assert stated and set(stated) == {limit}, (pattern, stated, limit)



def test_readme_and_docs_state_the_kmeans_stopping_rules_of_the_code():
    """README, Multi K-Means' page and its description in the UI state when the Lloyd iterations stop: labels
    unchanged, the centroids' shift below tol, or an iteration lowering the inertia by less than the core's RTOL
    (0.1 %). The page said 'Lloyd iterations to convergence', README's node reference named the first two rules
    only and the description 'until the clusters settle', while the third stops the k-means before its labels
    settle."""
    from headseg.nodes.core.working_set import RTOL

    readme = " ".join((REPO / "README.md").read_text().split())
    page = " ".join((DOCS / "HeadSeg_MultiKMeans.md").read_text().split())
    percent = r"([\d.]+) ?%"
    stated = [float(m) for m in re.findall(r"an iteration gains less than " + percent + " inertia", readme)]
    assert len(stated) == 2 and set(stated) == {RTOL * 100}, stated  # the node reference and the core section
    stated = [float(m) for m in re.findall(r"an iteration lowers the inertia by less than " + percent, page)]
    assert stated == [RTOL * 100], stated
    assert "to convergence" not in page
    from headseg.nodes.kmeans_node import MultiKMeans

    description = MultiKMeans.GET_NODE_INFO_V1()["description"]
    stated = [float(m) for m in re.findall(r"an iteration lowers the inertia by less than " + percent, description)]
    assert stated == [RTOL * 100], description

def _readme_names(cell: str) -> list[str]:
    """The `names` a README node-reference cell lists at its top level: each ';'-separated entry's
    backticked names before its first '(' (what is inside the brackets describes them)."""
    entries, depth, current = [], 0, ""
    for ch in cell:
        depth += (ch == "(") - (ch == ")")
        if ch == ";" and depth == 0:
            entries.append(current)
            current = ""
        else:
            current += ch
    entries.append(current)
    return [name for entry in entries for name in re.findall(r"`([^`]+)`", entry.split("(", 1)[0])]


def _readme_defaults(cell: str) -> dict[str, list[str]]:
    """name -> the default(s) a README node-reference cell states for it: 'default 0.9', 'default `2,5`',
    '`auto` default', and 'default 0, 0' for two names listed together (`x`, `y`)."""
    out = {}
    for match in re.finditer(r"((?:`[a-z_]+`(?:, )?)+) \(([^;]*)", cell):
        names = re.findall(r"`([a-z_]+)`", match.group(1))
        text = match.group(2)
        stated = (
            re.search(r"default `([^`]+)`", text)
            or re.search(r"default (-?[0-9.]+(?:, -?[0-9.]+)*)", text)
            or re.search(r"^`([^`]+)` default", text)
        )
        if stated:
            values = stated.group(1).split(", ") if len(names) > 1 else [stated.group(1)]
            out.update(zip(names, values))
    return out


def test_readme_node_reference_matches_the_schemas():
    """README's node reference (a new user's first look at the nodes) lists every node's inputs and outputs by
    the names the UI shows, and the defaults it states are the schemas' defaults."""
    readme = (REPO / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `HeadSeg_")]
    infos = {cls.GET_NODE_INFO_V1()["name"]: cls.GET_NODE_INFO_V1() for cls in node_classes()}
    assert sorted(row.split("`")[1] for row in rows) == sorted(infos)
    stated_defaults = 0
    for row in rows:
        node_id, inputs_cell, outputs_cell, _ = [c.strip() for c in row.strip().strip("|").split(" | ", 3)]
        info = infos[node_id.strip("`")]
        specs = {**info["input"]["required"], **info["input"].get("optional", {})}
        assert sorted(_readme_names(inputs_cell)) == sorted(specs), node_id
        listed_outputs = [] if outputs_cell.startswith("—") else _readme_names(outputs_cell.replace(", `", "; `"))
        assert listed_outputs == list(info["output_name"]), node_id
        for name, value in _readme_defaults(inputs_cell).items():
            default = specs[name][1]["default"]
            assert (float(value) == default) if isinstance(default, (int, float)) else (value == default), (
                node_id, name, value, default
            )
            stated_defaults += 1
    assert stated_defaults >= 13


def test_device_names_given_as_refused_prefixes_are_refused():
    """README, the Save nodes' pages and their filename_prefix tooltips give examples of a device name Windows
    cannot save under: each is refused by the check the nodes run. A device name is refused as a folder or
    before a dot only ('CON/x', 'nul.x'); a prefix 'CON' or 'COM1' saves 'CON_00001_...', a file on Windows too,
    and README's errors and the tooltips had given those as refused."""
    from headseg.nodes import label_map_nodes, recording_io_nodes
    from headseg.nodes.portable_names import windows_name_problem

    texts = {page.name: page.read_text() for page in (REPO / "README.md", DOCS / "HeadSeg_SaveLabelMaps.md", DOCS / "HeadSeg_SaveRecording.md")}
    for cls in (label_map_nodes.SaveLabelMaps, recording_io_nodes.SaveRecording):
        info = cls.GET_NODE_INFO_V1()
        texts[info["name"]] = info["input"]["required"]["filename_prefix"][1]["tooltip"]
    for where, text in texts.items():
        clauses = re.findall(r"device name(.*?)(?:, a |\)|;)", " ".join(text.split()))
        assert clauses, f"{where} gives no device name"
        for clause in clauses:
            examples = re.findall(r"[`']([^`']+)[`']", clause) or re.findall(r"\b[A-Za-z]{3}[0-9]?\b(?:\.\w+)?", clause.split("as")[-1])
            assert examples, (where, clause)
            for example in examples:
                assert windows_name_problem(example), f"{where}: {example!r} is given as refused, but the nodes accept it"
