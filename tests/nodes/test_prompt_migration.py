"""API prompts that read Upsample's former output 1 (error_map) are rewired before ComfyUI validates them."""

from __future__ import annotations

import copy
import logging
import sys
import types

import pytest

from headseg.nodes import extension, prompt_migration
from headseg.nodes.prompt_migration import migrate_upsample_error_map, on_prompt

pytestmark = pytest.mark.comfy


def old_explore_prompt() -> dict:
    """The HeadSeg part of a 0.1.0 explore prompt: Upsample "4" feeds k-means (slot 0) and, from its
    former slot 1, a Preview Image and a Save Image."""
    return {
        "3": {"class_type": "HeadSeg_HeadPCA", "inputs": {"recording": ["2", 0], "components": 8}},
        "4": {"class_type": "HeadSeg_Upsample", "inputs": {"features": ["3", 0], "mode": "bilinear"}},
        "5": {"class_type": "HeadSeg_MultiKMeans", "inputs": {"stack": ["4", 0], "cluster_counts": "2,5"}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["4", 1]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["4", 1], "filename_prefix": "err"}},
        "8": {"class_type": "ImageInvert", "inputs": {"image": ["9", 1]}},  # slot 1 of another node
        "9": {"class_type": "SomethingElse", "inputs": {}},
    }


def test_every_read_of_slot_1_moves_to_one_new_error_map_node():
    prompt = old_explore_prompt()
    before = copy.deepcopy(prompt)
    added = migrate_upsample_error_map(prompt)
    assert added == {"4-error-map": ["6", "7"]}
    assert prompt["4-error-map"]["class_type"] == "HeadSeg_UpsamplingError"
    assert prompt["4-error-map"]["inputs"] == {"stack": ["4", 0]}
    assert prompt["6"]["inputs"]["images"] == ["4-error-map", 0]
    assert prompt["7"]["inputs"] == {"images": ["4-error-map", 0], "filename_prefix": "err"}
    untouched = set(before) - {"6", "7"}
    assert {nid: prompt[nid] for nid in untouched} == {nid: before[nid] for nid in untouched}
    assert set(prompt) == set(before) | {"4-error-map"}


def test_migration_is_idempotent_and_leaves_new_prompts_alone():
    prompt = old_explore_prompt()
    migrate_upsample_error_map(prompt)
    once = copy.deepcopy(prompt)
    assert migrate_upsample_error_map(prompt) == {}
    assert prompt == once

    new = old_explore_prompt()
    del new["6"], new["7"]
    snapshot = copy.deepcopy(new)
    assert migrate_upsample_error_map(new) == {}
    assert new == snapshot


def test_two_upsamples_get_one_node_each_and_ids_never_collide():
    prompt = old_explore_prompt()
    prompt["4-error-map"] = {"class_type": "Note", "inputs": {}}  # a node already holds the natural id
    prompt["10"] = {"class_type": "HeadSeg_Upsample", "inputs": {"features": ["3", 0]}}
    prompt["11"] = {"class_type": "PreviewImage", "inputs": {"images": ["10", 1]}}
    prompt["12:3"] = {"class_type": "HeadSeg_Upsample", "inputs": {"features": ["3", 0]}}  # inside a subgraph
    prompt["13"] = {"class_type": "PreviewImage", "inputs": {"images": ["12:3", 1]}}
    added = migrate_upsample_error_map(prompt)
    assert added == {"4-error-map-2": ["6", "7"], "10-error-map": ["11"], "12:3-error-map": ["13"]}
    assert prompt["4-error-map"] == {"class_type": "Note", "inputs": {}}
    for new_id, (source, reader) in {"4-error-map-2": ("4", "6"), "10-error-map": ("10", "11")}.items():
        assert prompt[new_id]["inputs"]["stack"] == [source, 0]
        assert prompt[reader]["inputs"]["images"] == [new_id, 0]
    assert prompt["12:3-error-map"]["inputs"]["stack"] == ["12:3", 0]


def test_an_id_taken_twice_is_skipped_twice():
    prompt = old_explore_prompt()
    prompt["4-error-map"] = {"class_type": "Note", "inputs": {}}
    prompt["4-error-map-2"] = {"class_type": "Note", "inputs": {"text": "mine"}}
    assert migrate_upsample_error_map(prompt) == {"4-error-map-3": ["6", "7"]}
    assert prompt["4-error-map-2"] == {"class_type": "Note", "inputs": {"text": "mine"}}
    assert prompt["4-error-map-3"]["class_type"] == "HeadSeg_UpsamplingError"


def test_a_node_reading_slot_1_twice_is_named_once():
    prompt = old_explore_prompt()
    prompt["8"] = {"class_type": "ImageBlend", "inputs": {"image1": ["4", 1], "image2": ["4", 1], "mode": "normal"}}
    assert migrate_upsample_error_map(prompt) == {"4-error-map": ["6", "7", "8"]}
    assert prompt["8"]["inputs"] == {"image1": ["4-error-map", 0], "image2": ["4-error-map", 0], "mode": "normal"}


@pytest.mark.parametrize(
    "value",
    [["4", 0], ["4", 2], ["4", 1.0], ["4", True], ["4", "1"], ["4"], ["4", 1, 0], "4", 1, None, {"4": 1}],
)
def test_values_that_are_not_a_link_to_slot_1_stay(value):
    prompt = {
        "4": {"class_type": "HeadSeg_Upsample", "inputs": {}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": copy.deepcopy(value)}},
    }
    assert migrate_upsample_error_map(prompt) == {}
    assert prompt["6"]["inputs"]["images"] == value and set(prompt) == {"4", "6"}


def test_integer_node_ids_in_links_are_matched():
    prompt = {
        "4": {"class_type": "HeadSeg_Upsample", "inputs": {}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": [4, 1]}},
    }
    assert migrate_upsample_error_map(prompt) == {"4-error-map": ["6"]}
    assert prompt["4-error-map"]["inputs"]["stack"] == [4, 0]


@pytest.mark.parametrize(
    "prompt",
    [None, [], "text", {}, {"1": None}, {"1": {"class_type": "HeadSeg_Upsample"}}, {"1": {"inputs": None}},
     {"4": {"class_type": "HeadSeg_Upsample", "inputs": []}, "6": {"class_type": "X", "inputs": "bad"}}],
)  # fmt: skip
def test_malformed_prompts_are_left_for_comfyui_to_reject(prompt):
    snapshot = copy.deepcopy(prompt)
    assert migrate_upsample_error_map(prompt) == {}
    assert prompt == snapshot


def test_on_prompt_returns_the_request_and_says_what_it_added(caplog):
    request = {"prompt": old_explore_prompt(), "client_id": "abc"}
    with caplog.at_level(logging.WARNING):
        assert on_prompt(request) is request
    assert request["prompt"]["6"]["inputs"]["images"] == ["4-error-map", 0]
    (record,) = [r for r in caplog.records if "HeadSeg" in r.getMessage()]
    message = record.getMessage()
    assert "6, 7" in message and "Upsample node 4" in message and "'4-error-map'" in message
    # under the pack's "HeadSeg" logger, as every other HeadSeg line (not the root logger)
    assert record.name == "HeadSeg"

    caplog.clear()
    for request in ({"prompt": {}}, {"number": 3}, None, "junk"):
        assert on_prompt(request) is request
    assert not caplog.records


def test_registered_once_on_the_running_server(monkeypatch):
    added = []
    server = types.SimpleNamespace(on_prompt_handlers=added, add_on_prompt_handler=added.append)
    module = types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=server))
    monkeypatch.setitem(sys.modules, "server", module)
    assert extension.register_prompt_migration() and extension.register_prompt_migration()
    assert added == [prompt_migration.on_prompt]

    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace()))
    assert extension.register_prompt_migration() is False
    old_server = types.SimpleNamespace(add_on_prompt_handler=added.append)  # a ComfyUI without the hook list
    assert prompt_migration.register(old_server) is False and added == [prompt_migration.on_prompt]
    monkeypatch.delitem(sys.modules, "server")
    assert extension.register_prompt_migration() is False
