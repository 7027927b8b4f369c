"""In-process ComfyUI for the recorder tests: $HEADSEG_COMFYUI on sys.path, CPU mode, pack imported as `headseg`.

Without HEADSEG_COMFYUI (source tests/setup_env.sh) these tests are not collected.
"""

import pathlib

import pytest

from headseg.tests.support.comfy_in_process import import_comfyui

if not import_comfyui():  # run through tests/run.sh, which sets HEADSEG_COMFYUI
    collect_ignore_glob = ["test_*.py"]


def pytest_collection_modifyitems(items):
    here = pathlib.Path(__file__).parent
    for item in items:
        if here in pathlib.Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.comfy)


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    """Tiny models are latency-bound: one thread is as fast alone and far faster on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny():
    """The tests.support.tiny_unets module (imported once ComfyUI is on the path)."""
    from headseg.tests.support import tiny_unets

    return tiny_unets
