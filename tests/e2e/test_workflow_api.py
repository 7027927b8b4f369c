"""The UI -> API converter used by the end-to-end tests (no server needed)."""

from __future__ import annotations

from headseg.tests.support.workflow_api import ui_to_api

INFO = {
    "Loader": {
        "input": {"required": {"name": [["a.ckpt", "b.ckpt"], {}]}},
        "input_order": {"required": ["name"]},
        "output": ["MODEL", "INT"],
    },
    "Sampler": {
        "input": {
            "required": {
                "model": ["MODEL", {}],
                "seed": ["INT", {"default": 0, "control_after_generate": True}],
                "steps": ["INT", {"default": 20}],
                "mode": ["COMBO", {"options": ["x", "y"]}],
            },
            "optional": {"extra": ["INT", {"forceInput": True}], "note": ["STRING", {}]},
            "hidden": {"unique_id": ["UNIQUE_ID"]},
        },
        "input_order": {
            "required": ["model", "seed", "steps", "mode"],
            "optional": ["extra", "note"],
            "hidden": ["unique_id"],
        },
        "output": ["LATENT"],
    },
    "Patch": {
        "input": {"required": {"model": ["MODEL", {}], "strength": ["FLOAT", {"default": 1.0}]}},
        "input_order": {"required": ["model", "strength"]},
        "output": ["MODEL"],
    },
}


def node(nid, ctype, inputs=(), outputs=(), widgets=(), mode=0):
    return {
        "id": nid, "type": ctype, "mode": mode, "widgets_values": list(widgets),
        "inputs": [{"name": n, "type": t, "link": l} for n, t, l in inputs],
        "outputs": [{"name": t, "type": t, "links": ls} for t, ls in outputs],
    }  # fmt: skip


def graph(patch_mode=0, with_reroute=False):
    nodes = [
        node(1, "Loader", outputs=[("MODEL", [1]), ("INT", [4])], widgets=["b.ckpt"]),
        node(2, "Patch", inputs=[("model", "MODEL", 1)], outputs=[("MODEL", [2])], widgets=[0.5], mode=patch_mode),
        node(3, "Sampler", inputs=[("model", "MODEL", 3 if with_reroute else 2), ("extra", "INT", 4)],
             outputs=[("LATENT", [])], widgets=[123, "randomize", 7, "y", "hello"]),
        node(4, "Note", widgets=["a comment"]),
    ]  # fmt: skip
    links = [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 3, 0, "MODEL"], [4, 1, 1, 3, 4, "INT"]]
    if with_reroute:
        nodes.append(node(5, "Reroute", inputs=[("", "*", 2)], outputs=[("MODEL", [3])]))
        links.append([3, 5, 0, 3, 0, "MODEL"])
    return {"nodes": nodes, "links": links}


def test_widgets_follow_input_order_and_skip_control_after_generate():
    api = ui_to_api(graph(), INFO)
    assert set(api) == {"1", "2", "3"}  # the Note is UI-only
    assert api["1"]["inputs"] == {"name": "b.ckpt"}
    expected = {"model": ["2", 0], "seed": 123, "steps": 7, "mode": "y", "note": "hello", "extra": ["1", 1]}
    assert api["3"]["inputs"] == expected


def test_bypassed_node_passes_its_input_through_and_muted_node_is_dropped():
    api = ui_to_api(graph(patch_mode=4), INFO)
    assert "2" not in api and api["3"]["inputs"]["model"] == ["1", 0]
    api = ui_to_api(graph(patch_mode=2), INFO)
    assert "2" not in api and "model" not in api["3"]["inputs"]


def test_reroute_is_followed():
    api = ui_to_api(graph(with_reroute=True), INFO)
    assert "5" not in api and api["3"]["inputs"]["model"] == ["2", 0]
