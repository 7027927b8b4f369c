"""Multi K-Means' `device` input: which device it picks from ComfyUI's, the fall-back to the CPU when
the GPU runs out of memory, and the clusters coming back on the CPU.

ComfyUI runs here in CPU mode without a GPU, so its device is replaced where a GPU is needed; the
real GPU path (a CPU stack clustered on a CUDA GPU, the sweep back on the CPU, the same labels) is
tests/core/test_device.py, run where a GPU is present.
"""

from __future__ import annotations

import logging
import types

import pytest
import torch

from headseg.tests.core.planted import nested_scene, planted_recording, small_layout

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def utils():
    from headseg.nodes import node_utils

    return node_utils


@pytest.fixture
def comfy_device(monkeypatch):
    """comfy_device(d): ComfyUI reports torch.device(d) as its compute device from now on; the calls to
    soft_empty_cache and to torch's cuBLAS workspace release are counted in comfy_device.emptied and
    comfy_device.released."""
    import comfy.model_management as mm

    state = types.SimpleNamespace(emptied=0, released=0)

    def release():
        state.released += 1

    monkeypatch.setattr(torch._C, "_cuda_clearCublasWorkspaces", release, raising=False)

    def set_device(d):
        monkeypatch.setattr(mm, "get_torch_device", lambda: torch.device(d))

    def empty(force=False):
        state.emptied += 1

    monkeypatch.setattr(mm, "soft_empty_cache", empty)
    state.set = set_device
    return state


@pytest.fixture(scope="module")
def stack(nodes):
    scene = nested_scene(48, 64)
    rec = planted_recording([scene], layout=small_layout(heads=2), d=8, noise=0.2, seed=3)
    feats = nodes.HeadPCA.execute(rec, "down+up", "all", 3).args[0]
    return nodes.Upsample.execute(feats, "bilinear", False).args[0]


@pytest.mark.parametrize(
    "comfy, choice, expected",
    [
        ("cpu", "auto", "cpu"),
        ("cpu", "cpu", "cpu"),
        ("cuda:1", "auto", "cuda:1"),
        ("cuda:1", "gpu", "cuda:1"),
        ("cuda:1", "cpu", "cpu"),
        ("mps", "auto", "cpu"),  # the core is tested on CUDA GPUs and CPUs only
        ("xpu:0", "auto", "cpu"),
    ],
)
def test_the_device_follows_comfyuis_gpu(utils, comfy_device, comfy, choice, expected):
    comfy_device.set(comfy)
    assert utils.compute_device(choice) == torch.device(expected)


@pytest.mark.parametrize("comfy", ["cpu", "mps"])
def test_gpu_without_a_cuda_gpu_is_an_error_naming_the_input(utils, comfy_device, comfy):
    comfy_device.set(comfy)
    with pytest.raises(ValueError, match=rf"^device: 'gpu' needs a CUDA or ROCm GPU, but ComfyUI computes on {comfy}"):
        utils.compute_device("gpu")


def test_an_unknown_choice_names_the_input_and_the_choices(utils):
    with pytest.raises(ValueError, match=r"^device: expected one of \['auto', 'gpu', 'cpu'\], got 'cuda'"):
        utils.compute_device("cuda")


def _work_that_overflows_the_gpu(calls):
    def work(device):
        calls.append(device)
        if device.type != "cpu":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return "result"

    return work


def test_auto_falls_back_to_the_cpu_when_the_gpu_runs_out_of_memory(utils, comfy_device, caplog):
    comfy_device.set("cuda:0")
    calls = []
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        assert utils.run_on_device("auto", _work_that_overflows_the_gpu(calls), "Multi K-Means") == "result"
    assert calls == [torch.device("cuda:0"), torch.device("cpu")]
    assert comfy_device.emptied == 1  # the GPU's cache is released before the CPU run
    assert comfy_device.released == 1  # and the worker threads' cuBLAS workspaces
    assert "Multi K-Means ran out of GPU memory on cuda:0" in caplog.text and "on the CPU instead" in caplog.text


def test_gpu_that_runs_out_of_memory_is_an_error_naming_the_input(utils, comfy_device):
    comfy_device.set("cuda:0")
    calls = []
    with pytest.raises(ValueError, match=r"^device: the GPU \(cuda:0\) ran out of memory in Multi K-Means \(CUDA out "
                                         r"of memory. Tried to allocate 2.00 GiB\); choose 'auto'") as info:
        utils.run_on_device("gpu", _work_that_overflows_the_gpu(calls), "Multi K-Means")
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)
    assert calls == [torch.device("cuda:0")] and comfy_device.released == 1


def test_other_gpu_errors_are_not_hidden_by_the_fall_back(utils, comfy_device):
    comfy_device.set("cuda:0")

    def work(device):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        utils.run_on_device("auto", work, "Multi K-Means")
    assert comfy_device.emptied == 0


def test_work_that_fits_runs_once_on_the_picked_device(utils, comfy_device):
    comfy_device.set("cuda:0")
    calls = []
    assert utils.run_on_device("auto", lambda d: calls.append(d) or "ok", "x") == "ok"
    assert calls == [torch.device("cuda:0")]
    assert comfy_device.released == 1  # the GPU's worker-thread workspaces are freed after the work


def test_cpu_work_leaves_the_gpus_workspaces_alone(utils, comfy_device):
    comfy_device.set("cuda:0")
    assert utils.run_on_device("cpu", lambda d: d, "x") == torch.device("cpu")
    comfy_device.set("cpu")
    assert utils.run_on_device("auto", lambda d: d, "x") == torch.device("cpu")
    assert comfy_device.released == 0


def _same_sweep(a, b) -> bool:
    return list(a.results) == list(b.results) and all(
        torch.equal(a.results[k].labels, b.results[k].labels) for k in a.results
    )


def test_multi_kmeans_gives_the_same_clusters_with_device_omitted_auto_and_cpu_on_a_cpu(nodes, stack):
    omitted = nodes.MultiKMeans.execute(stack, "2,3,4", 0).args[0]  # prompts saved before the input existed
    for choice in ("auto", "cpu"):
        assert _same_sweep(nodes.MultiKMeans.execute(stack, "2,3,4", 0, choice).args[0], omitted), choice
    schema = nodes.MultiKMeans.define_schema()
    (device,) = [i for i in schema.inputs if i.id == "device"]
    assert device.optional and device.default == "auto" and list(device.options) == ["auto", "gpu", "cpu"]


def test_multi_kmeans_on_gpu_without_one_names_the_input(nodes, stack, comfy_device):
    comfy_device.set("cpu")
    with pytest.raises(ValueError, match="^device: 'gpu' needs a CUDA or ROCm GPU"):
        nodes.MultiKMeans.execute(stack, "2,3", 0, "gpu")


def test_multi_kmeans_moves_the_stack_to_the_gpu_and_falls_back_when_it_is_full(nodes, stack, comfy_device, monkeypatch):
    """The node's wiring: the stack goes to ComfyUI's GPU; there (a stand-in here) the sweep runs out
    of memory, and the clusters come from the CPU, equal to a CPU run's."""
    from headseg.nodes.core import kmeans as core_kmeans
    from headseg.nodes.core.upsample import FeatureStack

    expected = nodes.MultiKMeans.execute(stack, "2,3,4", 0, "cpu").args[0]
    comfy_device.set("cuda:0")
    on_gpu = object()  # stands for the stack moved to the GPU
    moves, real_to, real_kmeans = [], FeatureStack.to, core_kmeans.multi_kmeans

    def to(self, device):
        moves.append(torch.device(device))
        return on_gpu if torch.device(device).type == "cuda" else real_to(self, device)

    def multi_kmeans(s, *args, **kwargs):
        if s is on_gpu:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        return real_kmeans(s, *args, **kwargs)

    monkeypatch.setattr(FeatureStack, "to", to)
    monkeypatch.setattr(core_kmeans, "multi_kmeans", multi_kmeans)
    out = nodes.MultiKMeans.execute(stack, "2,3,4", 0, "auto")
    assert moves == [torch.device("cuda:0"), torch.device("cpu")]
    assert _same_sweep(out.args[0], expected)
    assert all(r.labels.device.type == "cpu" for r in out.args[0].results.values())
    assert out.args[1].shape[0] == 3 and comfy_device.emptied == 1
