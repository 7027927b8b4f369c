"""In-process ComfyUI for the node tests: $HEADSEG_COMFYUI on sys.path, CPU mode, temp/output/input in tmp.

Without HEADSEG_COMFYUI (source tests/setup_env.sh) these tests are not collected.
"""

import types

import pytest

from headseg.tests.support.comfy_in_process import import_comfyui

if not import_comfyui():  # run through tests/run.sh, which sets HEADSEG_COMFYUI
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(autouse=True)
def comfy_folders(tmp_path):
    """ComfyUI's input/output/temp folders in a fresh tmp folder (previews and recordings go there)."""
    import folder_paths

    get = (folder_paths.get_input_directory, folder_paths.get_output_directory, folder_paths.get_temp_directory)
    before = tuple(g() for g in get)
    dirs = {name: tmp_path / name for name in ("input", "output", "temp")}
    for d in dirs.values():
        d.mkdir()
    folder_paths.set_input_directory(str(dirs["input"]))
    folder_paths.set_output_directory(str(dirs["output"]))
    folder_paths.set_temp_directory(str(dirs["temp"]))
    yield dirs
    folder_paths.set_input_directory(before[0])
    folder_paths.set_output_directory(before[1])
    folder_paths.set_temp_directory(before[2])


@pytest.fixture(scope="module")
def nodes():
    """HeadSeg's stage nodes by class name (nodes.HeadPCA, nodes.MultiKMeans, ...: the pipeline nodes of
    nodes/extension.py), imported once ComfyUI is importable. Only the classes: a test that patches a name
    a node module reads (a memory estimate, a preview limit) patches that module (head_pca_node,
    kmeans_node, ...); patching the name here fails, since it is not here."""
    from headseg.nodes.extension import PIPELINE_NODES

    return types.SimpleNamespace(**{cls.__name__: cls for cls in PIPELINE_NODES})
