"""The pack installed the ways users install it: as it is, under another folder name, twice (an old and a
new folder), or broken. Real ComfyUI processes: ``--quick-test-for-ci`` (import and exit) where the log is
enough, one short server where the web routes matter. The quick tests of the tests selected here all start
with the module, two at a time, while the server tests run: each start is mostly imports, on one core."""

from __future__ import annotations

import concurrent.futures
import pathlib
import shutil
import tomllib
import urllib.error

import pytest

from headseg.tests.support.server import (
    REPO_ROOT, ComfyServer, pack_custom_nodes_dir, quick_test_log, write_paths_yaml,
)

pytestmark = pytest.mark.server


def quick_run_of(layout):
    """Marks a test as reading the ``--quick-test-for-ci`` log of ComfyUI with the custom-nodes folders that
    ``layout(tmp)`` makes under a fresh folder and returns (see ``quick_runs``)."""
    def mark(test):
        test.quick_layout = layout
        return test

    return mark


@pytest.fixture(scope="module", autouse=True)
def quick_runs(request, tmp_path_factory):
    """layout -> (its folder, future of quick_test_log's (exit code, log)), for the layout of every test of
    this module that the session runs, all submitted before the module's first test, two at a time."""
    layouts = dict.fromkeys(getattr(item.function, "quick_layout", None) for item in request.session.items
                            if item.module is request.module)  # in the order the tests run
    layouts.pop(None, None)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        runs = {}
        for layout in layouts:
            tmp = tmp_path_factory.mktemp(layout.__name__)
            runs[layout] = (tmp, pool.submit(quick_test_log, tmp, layout(tmp)))
        yield runs


def _quick_log(quick_runs, layout) -> tuple[pathlib.Path, str]:
    """(folder, log) of ``layout``'s quick test, which exited with code 0."""
    tmp, run = quick_runs[layout]
    code, log = run.result()
    assert code == 0, log[-4000:]
    return tmp, log


def _import_line(log: str, folder: pathlib.Path) -> str:
    """ComfyUI's line for ``folder`` in its list of custom-node import times."""
    lines = [line for line in log.splitlines() if line.rstrip().endswith(": " + str(folder))]
    assert len(lines) == 1, log[-4000:]
    return lines[0]


def as_it_is(tmp):
    return pack_custom_nodes_dir(tmp)


@quick_run_of(as_it_is)
def test_quick_test_for_ci_imports_the_pack(quick_runs):
    """ComfyUI's own CI import check (``main.py --quick-test-for-ci``) loads the pack without failure."""
    _, log = _quick_log(quick_runs, as_it_is)
    failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and "HeadSeg" in line]
    assert not failed, log[-4000:]
    # the pack was found and imported (ComfyUI lists import times per custom node folder)
    assert any("custom_nodes/HeadSeg" in line and "IMPORT FAILED" not in line for line in log.splitlines()), log[-4000:]


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


def one_folder_twice(tmp):
    custom_nodes = tmp / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / "HeadSeg").symlink_to(REPO_ROOT, target_is_directory=True)
    (tmp / "same_custom_nodes").symlink_to(custom_nodes, target_is_directory=True)
    return [custom_nodes, tmp / "same_custom_nodes"]


@quick_run_of(one_folder_twice)
def test_one_folder_reached_through_two_custom_nodes_paths_is_not_called_two_copies(quick_runs):
    """ComfyUI's custom_nodes paths can name one folder twice (a link to it, a case-insensitive disk, an
    extra_model_paths.yaml entry for ComfyUI's own folder): ComfyUI then loads every pack in it twice. HeadSeg
    called that two copies and told the user to remove one of the two folders, which are one: the only copy.
    The second load is still left out, and the log now says that one folder is listed twice and to remove
    the duplicate custom_nodes path, keeping the folder."""
    tmp_path, log = _quick_log(quick_runs, one_folder_twice)
    custom_nodes, alias = tmp_path / "custom_nodes", tmp_path / "same_custom_nodes"
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


def older_copy_later(tmp):
    new_root, old_root = tmp / "nodes-a", tmp / "nodes-b"
    new_root.mkdir()
    (new_root / "HeadSeg").symlink_to(REPO_ROOT, target_is_directory=True)
    old = old_root / "HeadSeg-old"
    shutil.copytree(REPO_ROOT, old, ignore=shutil.ignore_patterns(".git", "tests", "__pycache__"))
    (old / "__init__.py").write_text(OLD_ENTRY_POINT)
    (old / "nodes" / "pack_folder.py").unlink()
    return [new_root, old_root]


@quick_run_of(older_copy_later)
def test_older_copy_loaded_later_is_named_by_the_first(quick_runs):
    """A copy from before the check, loaded after this one, takes its node ids without a word: the copy
    loaded first names it (ComfyUI loads its custom_nodes folders in the order the paths file lists them)."""
    tmp_path, log = _quick_log(quick_runs, older_copy_later)
    new_root, old = tmp_path / "nodes-a", tmp_path / "nodes-b" / "HeadSeg-old"
    warning = [line for line in log.splitlines() if "HeadSeg is installed more than once" in line]
    assert len(warning) == 1, log[-4000:]
    assert f"this copy, {new_root / 'HeadSeg'} (" in warning[0] and f"also in {old} (" in warning[0]
    assert "Remove all but one" in warning[0]


def space_in_folder_name(tmp):
    custom_nodes = tmp / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / "headseg-main (1)").symlink_to(REPO_ROOT, target_is_directory=True)
    return custom_nodes


@quick_run_of(space_in_folder_name)
def test_folder_name_without_web_routes_is_named_in_the_log(quick_runs):
    """A second zip download unpacks to ``headseg-main (1)``: ComfyUI lists its web files but answers 404 for
    each (a space in a route's folder name), so the picker, the docs and the templates were missing with
    nothing in the log. The nodes still load; the log now says why the rest does not, and what to do."""
    tmp_path, log = _quick_log(quick_runs, space_in_folder_name)
    folder = tmp_path / "custom_nodes" / "headseg-main (1)"
    assert "IMPORT FAILED" not in _import_line(log, folder)
    warning = [line for line in log.splitlines() if "[HeadSeg] the pack's folder name" in line]
    assert len(warning) == 1, log[-4000:]
    assert "'headseg-main (1)'" in warning[0] and "(' ')" in warning[0] and "Rename the folder" in warning[0]


def file_missing(tmp):
    custom_nodes = tmp / "custom_nodes"
    folder = custom_nodes / "HeadSeg"
    shutil.copytree(REPO_ROOT, folder, ignore=shutil.ignore_patterns(".git", "tests", "__pycache__"))
    (folder / "nodes" / "recorder_store.py").unlink()
    return custom_nodes


@quick_run_of(file_missing)
def test_import_failure_names_the_pack_and_comfyui_starts(quick_runs):
    """A copy with a file missing (an interrupted download): ComfyUI's line for a V3 entry point that
    raises held the error's text alone, with no traceback. The pack's own line says which pack failed,
    what ComfyUI it needs and what to do, with the traceback; ComfyUI starts without the pack's nodes."""
    tmp_path, log = _quick_log(quick_runs, file_missing)
    folder = tmp_path / "custom_nodes" / "HeadSeg"
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
