"""Every example workflow, converted UI -> API, runs to success on a live ComfyUI (see conftest)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from headseg.tests.support.workflow_api import nodes_of

from headseg.tests.e2e.helpers import SIDE, workflow_files

pytestmark = pytest.mark.server

WORKFLOWS = [p.stem for p in workflow_files()]
# the workflows that end in an inpainting pass (the explore workflow only shows previews)
INPAINTING = [w for w in WORKFLOWS if w != "headseg_explore"]

def png_size(server, ref) -> tuple[int, int]:
    from PIL import Image

    return Image.open(io.BytesIO(server.view(ref))).size


def describe(result) -> str:
    if result.error:
        e = result.error
        trace = "".join(e.get("traceback", []))
        return f"{e.get('node_type')} #{e.get('node_id')}: {e.get('exception_message')}\n{trace}"
    return json.dumps(result.history.get("status"), indent=1)


def test_there_are_three_example_workflows():
    assert len(WORKFLOWS) >= 3, WORKFLOWS


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_runs_to_success(workflow_runs, name):
    api, result = workflow_runs[name]
    assert result.ok, describe(result)
    assert result.history.get("status", {}).get("status_str") == "success"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_all_sd21_heads_are_recorded(workflow_runs, name):
    api, result = workflow_runs[name]
    pcas = nodes_of(api, "HeadSeg_HeadPCA")
    assert pcas, f"{name} has no HeadSeg_HeadPCA node"
    for nid in pcas:
        summary = result.outputs(nid)["headseg_summary"][0]
        assert summary["recorded_heads"] == 195 and summary["recorded_layers"] == 16, summary
        assert summary["image_size"] == [SIDE, SIDE], summary
        inputs = api[nid]["inputs"]
        if inputs.get("positions") == "down+up" and inputs.get("levels") == "all":
            assert summary["selected_heads"] == 175 and summary["selected_layers"] == 15, summary


@pytest.mark.parametrize("name", WORKFLOWS)
def test_mask_outputs_are_at_image_resolution(workflow_runs, comfy_server, name):
    api, result = workflow_runs[name]
    probes = [nid for nid, node in api.items() if "probe" in node.get("_meta", {})]
    assert probes, f"{name} has no HeadSeg MASK output"
    for nid in probes:
        images = result.outputs(nid).get("images", [])
        assert images, f"no MASK came out of {api[nid]['_meta']['probe']}"
        for ref in images:
            assert png_size(comfy_server, ref) == (SIDE, SIDE), (api[nid]["_meta"]["probe"], ref)
    for nid in nodes_of(api, "HeadSeg_MaskSelectAtPixel"):
        out = result.outputs(nid)
        assert out["headseg_size"] == [SIDE, SIDE]
        assert len(out["headseg_masks"]) == len(out["headseg_mask_info"]) >= 1
        areas = [m["area"] for m in out["headseg_mask_info"]]
        assert areas == sorted(areas), "masks at the pixel must come finest (smallest) first"
        assert png_size(comfy_server, out["headseg_image"][0]) == (SIDE, SIDE)


def test_inpainting_workflows_are_known():
    assert len(INPAINTING) >= 2, INPAINTING


@pytest.mark.parametrize("name", INPAINTING)
def test_inpainted_image_exists(workflow_runs, comfy_server, name):
    api, result = workflow_runs[name]
    assert nodes_of(api, "SetLatentNoiseMask") or nodes_of(api, "VAEEncodeForInpaint"), f"{name} does not inpaint"
    saves = [nid for nid in nodes_of(api, "SaveImage") if "probe" not in api[nid].get("_meta", {})]
    assert saves
    for nid in saves:
        images = result.outputs(nid).get("images", [])
        assert images, f"SaveImage #{nid} wrote nothing"
        for ref in images:
            assert png_size(comfy_server, ref) == (SIDE, SIDE)
            assert (comfy_server.output_dir / ref["subfolder"] / ref["filename"]).is_file()


def test_multi_kmeans_shows_every_k(workflow_runs):
    seen = 0
    for api, result in workflow_runs.values():
        for nid in nodes_of(api, "HeadSeg_MultiKMeans"):
            out = result.outputs(nid)
            ks = [int(k) for k in api[nid]["inputs"]["cluster_counts"].split(",")]
            assert out["headseg_k"] == sorted(set(ks))
            assert len(out["images"]) == len(out["headseg_labels"]) == len(set(ks))
            seen += 1
    assert seen


def test_explore_saves_every_k_as_an_index_png_next_to_the_picture(workflow_runs, comfy_server):
    """Save Label Maps through the server: one 8-bit PNG per k whose values group the pixels exactly as the
    colour map of that k does (read back through /view), and the decoded picture with the prompt in it (an API
    prompt carries no UI workflow)."""
    from PIL import Image

    api, result = workflow_runs["headseg_explore"]
    (nid,) = nodes_of(api, "HeadSeg_SaveLabelMaps")
    (km,) = nodes_of(api, "HeadSeg_MultiKMeans")
    listed = result.outputs(nid)["headseg_label_maps"]
    colour_maps = result.outputs(km)["images"]
    ks = [int(k) for k in api[km]["inputs"]["cluster_counts"].split(",")]
    assert [ref["k"] for ref in listed] == ks
    for ref, colours in zip(listed, colour_maps):
        with Image.open(comfy_server.output_dir / ref["subfolder"] / ref["filename"]) as im:
            assert (im.mode, im.size) == ("L", (SIDE, SIDE))
            labels = np.array(im).astype(np.int64)
        assert labels.max() < ref["k"]
        rgb = np.array(Image.open(io.BytesIO(comfy_server.view(colours))).convert("RGB")).reshape(-1, 3)
        codes = rgb[:, 0].astype(np.int64) << 16 | rgb[:, 1].astype(np.int64) << 8 | rgb[:, 2]
        pairs = np.unique(np.stack([labels.ravel(), codes]), axis=1)  # [2, distinct (label, colour) pairs]
        assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]  # one colour per label
    (picture,) = result.outputs(nid)["images"]
    with Image.open(comfy_server.output_dir / picture["subfolder"] / picture["filename"]) as im:
        assert (im.mode, im.size) == ("RGB", (SIDE, SIDE))
        assert json.loads(im.text["prompt"])[nid]["class_type"] == "HeadSeg_SaveLabelMaps"  # the prompt that made it
        listed_masks = json.loads(im.text["headseg"])["masks"]
    # the example links Mask Merge's masks: each file lists the image's merged masks as [k, cluster] pairs, as
    # many as Mask Merge's text counts, each a cluster of a k that was saved
    (mm,) = nodes_of(api, "HeadSeg_MaskMerge")
    assert api[nid]["inputs"]["masks"] == [mm, 0]
    (count_text,) = result.outputs(mm)["text"]
    assert count_text == f"merged masks per image: {len(listed_masks)}" and listed_masks
    assert all(k in ks and 0 <= cluster < k for k, cluster in listed_masks)


def test_progress_bar_over_the_k_sweep(workflow_runs):
    """At least one run executed Multi K-Means (not from cache) and reported progress in 3 stages per k,
    counting up to 3 x len(k), to this node (the stages end on worker threads)."""
    reports = []
    for api, result in workflow_runs.values():
        for nid in nodes_of(api, "HeadSeg_MultiKMeans"):
            if nid in result.progress:
                k = len(set(api[nid]["inputs"]["cluster_counts"].split(",")))
                reports.append((result.progress[nid], k))
    assert reports, "no progress message from HeadSeg_MultiKMeans"
    for steps, k in reports:
        assert steps[-1] == (3 * k, 3 * k), steps
        assert [done for done, _ in steps] == sorted(done for done, _ in steps), steps


def test_templates_are_served(comfy_server):
    templates = comfy_server.get_json("/workflow_templates")
    assert sorted(templates.get("HeadSeg", [])) == sorted(WORKFLOWS), templates
    for path in workflow_files():
        served = json.loads(comfy_server.get_bytes(f"/api/workflow_templates/HeadSeg/{path.name}"))
        assert served == json.loads(path.read_text())


def test_every_node_documents_its_inputs_and_outputs(comfy_server):
    info = comfy_server.object_info()
    ours = {k: v for k, v in info.items() if k.startswith("HeadSeg_")}
    assert set(ours) >= {
        "HeadSeg_RecordSelfAttention", "HeadSeg_HeadPCA", "HeadSeg_Upsample", "HeadSeg_UpsamplingError", "HeadSeg_MultiKMeans",
        "HeadSeg_MaskMerge", "HeadSeg_MaskSelectAtPixel", "HeadSeg_SaveLabelMaps", "HeadSeg_SaveRecording",
        "HeadSeg_LoadRecording",
    }  # fmt: skip
    for name, node in ours.items():
        assert node["description"].strip(), name
        assert node["category"].startswith("HeadSeg"), name
        for section in ("required", "optional"):
            for inp, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"
        assert all(node["output_tooltips"]), f"{name} has an output without tooltip"


def test_no_errors_from_the_pack_in_the_log(comfy_server, workflow_runs):
    """Start-up and every example workflow: nothing in the log names the pack in an error."""
    assert comfy_server.pack_errors(end=comfy_server.started_mark) == []
    assert comfy_server.pack_errors(start=workflow_runs.log_start, end=workflow_runs.log_end) == []


def test_example_workflows_match_the_node_schemas(comfy_server):
    """Widget values line up with the server's widgets (catches a workflow left behind by a schema change)."""
    from headseg.tests.support.workflow_api import widget_names

    info = comfy_server.object_info()
    for path in workflow_files():
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] not in info:
                assert node["type"] in ("Note", "MarkdownNote"), (path.name, node["type"])
                continue
            widgets = widget_names(info[node["type"]])
            expected = len(widgets) + sum(bool(o.get("control_after_generate")) for _, o in widgets)
            expected += sum(bool(o.get("image_upload")) for _, o in widgets)
            assert len(node["widgets_values"]) == expected, (path.name, node["type"], node["widgets_values"])
            for (name, opts), value in zip(widgets, iter_values(node["widgets_values"], widgets)):
                spec = info[node["type"]]["input"]
                spec = spec.get("required", {}).get(name) or spec.get("optional", {}).get(name)
                options = spec[0] if isinstance(spec[0], list) else opts.get("options")
                if options and name not in ("ckpt_name", "image", "file"):
                    assert value in options, (path.name, node["type"], name, value)


def iter_values(values, widgets):
    """widgets_values without the UI-only entries (control_after_generate, upload)."""
    i = 0
    for _, opts in widgets:
        yield values[i]
        i += 1 + bool(opts.get("control_after_generate")) + bool(opts.get("image_upload"))
