"""The pack installed the ways users install it: under another folder name, twice (an old and a new
folder), or broken. Real ComfyUI processes: ``--quick-test-for-ci`` (import and exit) where the log is
enough, one short server where the web routes matter."""

from __future__ import annotations

import pathlib
import shutil
import tomllib
import urllib.error

import pytest

from headseg.tests.support.server import REPO_ROOT, ComfyServer, quick_test_log, write_paths_yaml

pytestmark = pytest.mark.server


def _import_line(log: str, folder: pathlib.Path) -> str:
    """ComfyUI's line for ``folder`` in its list of custom-node import times."""
    lines = [line for line in log.splitlines() if line.rstrip().endswith(": " + str(folder))]
    assert len(lines) == 1, log[-4000:]
    return lines[0]


def test_second_copy_is_left_out_and_named_in_the_log(tmp_path):
    """Two folders of HeadSeg: ComfyUI registered the node ids of the folder it loaded last over the first
    one's, silently, and served both front ends, of which the browser keeps whichever registers first (nodes
    of one copy under the picker of the other). The first copy loaded now stays whole, the second registers
    no nodes and serves no web files, and the log names both folders."""
    custom_nodes = tmp_path / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / "HeadSeg-old").symlink_to(REPO_ROOT, target_is_directory=True)
    server = ComfyServer(workdir=tmp_path)  # adds custom_nodes/HeadSeg, the copy under test
    try:
        server.start()
        info = server.object_info()
        modules = {v["python_module"] for k, v in info.items() if k.startswith("HeadSeg_")}
        assert len(modules) == 1, modules
        in_use = modules.pop().removeprefix("custom_nodes.")
        left_out = ({"HeadSeg", "HeadSeg-old"} - {in_use}).pop()
        scripts = [e for e in server.get_json("/extensions") if e.endswith("/headseg.js")]
        assert scripts == [f"/extensions/{in_use}/headseg.js"], scripts
        with pytest.raises(urllib.error.HTTPError, match="404"):
            server.get_bytes(f"/extensions/{left_out}/headseg.js")
        warning = [line for line in server.log_text().splitlines() if "HeadSeg is installed twice" in line]
        assert len(warning) == 1, server.log_tail()
        assert f"{custom_nodes / in_use} (" in warning[0] and "is in use" in warning[0]
        assert f"{custom_nodes / left_out} (" in warning[0] and "is left out" in warning[0]
        assert warning[0].index(str(custom_nodes / in_use) + " (") < warning[0].index("is in use")
        first = [line for line in server.log_text().splitlines() if "HeadSeg is installed more than once" in line]
        assert len(first) == 1, server.log_tail()
        assert f"this copy, {custom_nodes / in_use} (" in first[0] and f"also in {custom_nodes / left_out} (" in first[0]
    finally:
        server.stop()


def test_second_copy_of_the_same_folder_name_keeps_the_first_ones_web_files(tmp_path):
    """Two custom_nodes folders (ComfyUI's own and one from an extra-model-paths file) that both hold a
    ``HeadSeg``: ComfyUI keys the web folders by folder name, so the second copy's web folder took the
    first one's key, and the second copy withdrawing its own left the copy in use with no web files at all
    (no picker, no node docs). The copy in use now keeps its front end, served once."""
    second_root = tmp_path / "more_custom_nodes"
    second_root.mkdir()
    (second_root / "HeadSeg").symlink_to(REPO_ROOT, target_is_directory=True)
    yaml = tmp_path / "more_paths.yaml"
    write_paths_yaml(yaml, second_root, [])
    server = ComfyServer(workdir=tmp_path, extra_args=["--extra-model-paths-config", str(yaml)])
    try:
        server.start()  # loads workdir/custom_nodes/HeadSeg first, then more_custom_nodes/HeadSeg
        warning = [line for line in server.log_text().splitlines() if "HeadSeg is installed twice" in line]
        assert len(warning) == 1, server.log_tail()
        assert f"{tmp_path / 'custom_nodes' / 'HeadSeg'} (" in warning[0] and "is in use" in warning[0]
        assert any(k.startswith("HeadSeg_") for k in server.object_info())
        scripts = [e for e in server.get_json("/extensions") if e.endswith("/headseg.js")]
        assert len(scripts) == 1, scripts
        assert server.get_bytes(scripts[0]) == (REPO_ROOT / "js" / "headseg.js").read_bytes()
    finally:
        server.stop()


def test_one_folder_reached_through_two_custom_nodes_paths_is_not_called_two_copies(tmp_path):
    """ComfyUI's custom_nodes paths can name one folder twice (a link to it, a case-insensitive disk, an
    extra_model_paths.yaml entry for ComfyUI's own folder): ComfyUI then loads every pack in it twice. HeadSeg
    called that two copies and told the user to remove one of the two folders, which are one: the only copy.
    The second load is still left out, and the log now says that one folder is listed twice and to remove
    the duplicate custom_nodes path, keeping the folder."""
    custom_nodes = tmp_path / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / "HeadSeg").symlink_to(REPO_ROOT, target_is_directory=True)
    alias = tmp_path / "same_custom_nodes"
    alias.symlink_to(custom_nodes, target_is_directory=True)
    code, log = quick_test_log(tmp_path, [custom_nodes, alias])
    assert code == 0, log[-4000:]
    assert "IMPORT FAILED" not in _import_line(log, custom_nodes / "HeadSeg")
    assert "Remove one of the two folders" not in log and "Remove all but one" not in log, log[-4000:]
    warning = [line for line in log.splitlines() if "[HeadSeg]" in line]
    assert len(warning) == 1, log[-4000:]
    assert f"{custom_nodes / 'HeadSeg'} is loaded twice, also as {alias / 'HeadSeg'}" in warning[0]
    assert "keep the folder" in warning[0]

# The entry point of the pack before it looked for other copies: such a copy, loaded second, registers
# its nodes over the first one's and says nothing.
OLD_ENTRY_POINT = """
WEB_DIRECTORY = "./js"


async def comfy_entrypoint():
    from .nodes.extension import HeadSegExtension, register_prompt_migration

    register_prompt_migration()
    return HeadSegExtension()
"""


def test_older_copy_loaded_later_is_named_by_the_first(tmp_path):
    """A copy from before the check, loaded after this one, takes its node ids without a word: the copy
    loaded first names it (ComfyUI loads its custom_nodes folders in the order the paths file lists them)."""
    new_root, old_root = tmp_path / "nodes-a", tmp_path / "nodes-b"
    new_root.mkdir()
    (new_root / "HeadSeg").symlink_to(REPO_ROOT, target_is_directory=True)
    old = old_root / "HeadSeg-old"
    shutil.copytree(REPO_ROOT, old, ignore=shutil.ignore_patterns(".git", "tests", "__pycache__"))
    (old / "__init__.py").write_text(OLD_ENTRY_POINT)
    (old / "nodes" / "pack_folder.py").unlink()
    code, log = quick_test_log(tmp_path, [new_root, old_root])
    assert code == 0, log[-4000:]
    warning = [line for line in log.splitlines() if "HeadSeg is installed more than once" in line]
    assert len(warning) == 1, log[-4000:]
    assert f"this copy, {new_root / 'HeadSeg'} (" in warning[0] and f"also in {old} (" in warning[0]
    assert "Remove all but one" in warning[0]


def test_folder_name_without_web_routes_is_named_in_the_log(tmp_path):
    """A second zip download unpacks to ``headseg-main (1)``: ComfyUI lists its web files but answers 404 for
    each (a space in a route's folder name), so the picker, the docs and the templates were missing with
    nothing in the log. The nodes still load; the log now says why the rest does not, and what to do."""
    custom_nodes = tmp_path / "custom_nodes"
    custom_nodes.mkdir()
    folder = custom_nodes / "headseg-main (1)"
    folder.symlink_to(REPO_ROOT, target_is_directory=True)
    code, log = quick_test_log(tmp_path, custom_nodes)
    assert code == 0, log[-4000:]
    assert "IMPORT FAILED" not in _import_line(log, folder)
    warning = [line for line in log.splitlines() if "[HeadSeg] the pack's folder name" in line]
    assert len(warning) == 1, log[-4000:]
    assert "'headseg-main (1)'" in warning[0] and "(' ')" in warning[0] and "Rename the folder" in warning[0]


def test_import_failure_names_the_pack_and_comfyui_starts(tmp_path):
    """A copy with a file missing (an interrupted download): ComfyUI's line for a V3 entry point that
    raises held the error's text alone, with no traceback. The pack's own line says which pack failed,
    what ComfyUI it needs and what to do, with the traceback; ComfyUI starts without the pack's nodes."""
    custom_nodes = tmp_path / "custom_nodes"
    folder = custom_nodes / "HeadSeg"
    shutil.copytree(REPO_ROOT, folder, ignore=shutil.ignore_patterns(".git", "tests", "__pycache__"))
    (folder / "nodes" / "recorder_store.py").unlink()
    code, log = quick_test_log(tmp_path, custom_nodes)
    assert code == 0, log[-4000:]
    assert "IMPORT FAILED" in _import_line(log, folder)
    lines = log.splitlines()
    failed = [i for i, line in enumerate(lines) if f"[HeadSeg] the pack in {folder} (" in line]
    assert len(failed) == 1, log[-4000:]
    line = lines[failed[0]]
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert f"({pyproject['project']['version']}) failed to load" in line and "recorder_store" in line
    needed = pyproject["tool"]["comfy"]["requires-comfyui"].removeprefix(">=")  # the registry's, and README's
    assert f"ComfyUI {needed} or newer" in line
    assert lines[failed[0] + 1].startswith("Traceback"), "\n".join(lines[failed[0]: failed[0] + 5])
