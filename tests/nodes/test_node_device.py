"""Multi K-Means' and Head PCA's `device` input: which device it picks from ComfyUI's, the fall-back
to the CPU when the GPU runs out of memory, and the clusters or features coming back on the CPU.

ComfyUI runs here in CPU mode without a GPU, so its device is replaced where a GPU is needed; the
real GPU path (a CPU stack clustered on a CUDA GPU, the sweep back on the CPU, the same labels) is
tests/core/test_device.py, run where a GPU is present.
"""

from __future__ import annotations

import logging
import types
import weakref
from concurrent.futures import ThreadPoolExecutor, as_completed

import pytest
import torch

from headseg.tests.core.planted import nested_scene, planted_recording, small_layout

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def device_choice():
    from headseg.nodes import device_choice

    return device_choice


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
def test_the_device_follows_comfyuis_gpu(device_choice, comfy_device, comfy, choice, expected):
    comfy_device.set(comfy)
    assert device_choice.compute_device(choice) == torch.device(expected)


@pytest.mark.parametrize(
    "comfy, why", [("cpu", r" \(started with --cpu, or no GPU found\)"), ("mps", ""), ("privateuseone:0", "")]
)
def test_gpu_without_a_cuda_gpu_is_an_error_naming_the_input(device_choice, comfy_device, comfy, why):
    comfy_device.set(comfy)
    kind = comfy.split(":")[0]
    with pytest.raises(
        ValueError, match=rf"^device: 'gpu' runs HeadSeg on CUDA or ROCm GPUs only, but ComfyUI computes on {kind} "
                          rf"here{why}; choose 'auto' or 'cpu'$"
    ):
        device_choice.compute_device("gpu")


def test_an_unknown_choice_names_the_input_and_the_choices(device_choice):
    with pytest.raises(ValueError, match=r"^device: expected one of \['auto', 'gpu', 'cpu'\], got 'cuda'"):
        device_choice.compute_device("cuda")


# torch's own message: a paragraph, of which the error names only the first two sentences
TORCH_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 7.79 GiB of which 1.12 GiB is "
    "free. Including non-PyTorch memory, this process has 6.66 GiB memory in use. Of the allocated memory 6.01 GiB "
    "is allocated by PyTorch. See documentation for Memory Management"
)


def _work_that_overflows_the_gpu(calls, error=None):
    def work(device):
        calls.append(device)
        if device.type != "cpu":
            raise error or torch.cuda.OutOfMemoryError(TORCH_OOM)
        return "result"

    return work


def test_auto_falls_back_to_the_cpu_when_the_gpu_runs_out_of_memory(device_choice, comfy_device, caplog):
    comfy_device.set("cuda:0")
    calls = []
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        assert device_choice.run_on_device("auto", _work_that_overflows_the_gpu(calls), "Multi K-Means") == "result"
    assert calls == [torch.device("cuda:0"), torch.device("cpu")]
    assert comfy_device.emptied == 1  # the GPU's cache is released before the CPU run
    assert comfy_device.released == 1  # and the worker threads' cuBLAS workspaces
    assert "Multi K-Means ran out of GPU memory on cuda:0 (CUDA out of memory. Tried to allocate 2.00 GiB); " \
           "running it on the CPU instead" in caplog.text


def test_a_library_that_cannot_allocate_on_a_full_gpu_falls_back_too(device_choice, comfy_device):
    """A full GPU can fail as a RuntimeError: cuBLAS cannot create the handle of a new worker thread."""
    comfy_device.set("cuda:0")
    calls = []
    error = RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
    assert device_choice.run_on_device("auto", _work_that_overflows_the_gpu(calls, error), "Multi K-Means") == "result"
    assert calls == [torch.device("cuda:0"), torch.device("cpu")]


def test_the_failed_attempts_tensors_are_freed_before_the_cpu_runs(device_choice, comfy_device):
    """The failed attempt's tensors live in frames that its traceback keeps, in a cycle through the
    worker threads' futures: they must be gone when the CPU run starts, not at the next collection."""
    comfy_device.set("cuda:0")
    alive = []

    def work(device):
        if device.type == "cpu":
            return [ref() is not None for ref in alive]

        def worker():
            held = torch.empty(1024)  # stands for the GPU tensors of the failed attempt
            alive.append(weakref.ref(held))
            raise torch.cuda.OutOfMemoryError(TORCH_OOM)

        with ThreadPoolExecutor(2) as pool:
            futures = {pool.submit(worker): i for i in range(2)}
            for future in as_completed(futures):
                future.result()

    import gc

    gc.disable()  # only what run_on_device does may free them
    try:
        assert device_choice.run_on_device("auto", work, "Multi K-Means") == [False, False]
    finally:
        gc.enable()


def test_gpu_that_runs_out_of_memory_is_an_error_naming_the_input(device_choice, comfy_device):
    """Still an out-of-memory error, so that ComfyUI unloads its models and shows its memory tips."""
    comfy_device.set("cuda:0")
    calls = []
    with pytest.raises(torch.cuda.OutOfMemoryError,
                       match=r"^device: the GPU \(cuda:0\) ran out of memory in Multi K-Means \(CUDA out of memory. "
                             r"Tried to allocate 2.00 GiB\); choose 'auto' to fall back to the CPU, or 'cpu'$") as info:
        device_choice.run_on_device("gpu", _work_that_overflows_the_gpu(calls), "Multi K-Means")
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)
    assert calls == [torch.device("cuda:0")] and comfy_device.released == 1


def test_other_gpu_errors_are_not_hidden_by_the_fall_back(device_choice, comfy_device):
    comfy_device.set("cuda:0")

    def work(device):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        device_choice.run_on_device("auto", work, "Multi K-Means")
    assert comfy_device.emptied == 0


def test_work_that_fits_runs_once_on_the_picked_device(device_choice, comfy_device):
    comfy_device.set("cuda:0")
    calls = []
    assert device_choice.run_on_device("auto", lambda d: calls.append(d) or "ok", "x") == "ok"
    assert calls == [torch.device("cuda:0")]
    assert comfy_device.released == 1  # the GPU's worker-thread workspaces are freed after the work


def test_cpu_work_leaves_the_gpus_workspaces_alone(device_choice, comfy_device):
    comfy_device.set("cuda:0")
    assert device_choice.run_on_device("cpu", lambda d: d, "x") == torch.device("cpu")
    comfy_device.set("cpu")
    assert device_choice.run_on_device("auto", lambda d: d, "x") == torch.device("cpu")
    assert comfy_device.released == 0


def _same_sweep(a, b) -> bool:
    return list(a.results) == list(b.results) and all(
        torch.equal(a.results[k].labels, b.results[k].labels) for k in a.results
    )


def test_multi_kmeans_gives_the_same_clusters_with_device_omitted_auto_and_cpu_on_a_cpu(nodes, stack):
    omitted = nodes.MultiKMeans.execute(stack, "2,3,4", 0).args[0]  # prompts saved before the input existed
    for choice in ("auto", "cpu"):
        assert _same_sweep(nodes.MultiKMeans.execute(stack, "2,3,4", 0, choice).args[0], omitted), choice
    assert_device_input(nodes.MultiKMeans)


def assert_device_input(cls):
    """The node's `device` input: optional (prompts saved before it existed), auto / gpu / cpu, auto first."""
    (device,) = [i for i in cls.define_schema().inputs if i.id == "device"]
    assert device.optional and device.default == "auto" and list(device.options) == ["auto", "gpu", "cpu"]


def test_multi_kmeans_on_gpu_without_one_names_the_input(nodes, stack, comfy_device):
    comfy_device.set("cpu")
    with pytest.raises(ValueError, match="^device: 'gpu' runs HeadSeg on CUDA or ROCm GPUs only"):
        nodes.MultiKMeans.execute(stack, "2,3", 0, "gpu")


def stand_in_on_gpu(monkeypatch, cls):
    """cls.to("cuda...") (a FeatureStack, a Recording) returns a stand-in object for the value on the
    GPU (this machine has none); every move is logged -> (the stand-in, the devices moved to)."""
    on_gpu, moves, real_to = object(), [], cls.to

    def to(self, device):
        moves.append(torch.device(device))
        return on_gpu if torch.device(device).type == "cuda" else real_to(self, device)

    monkeypatch.setattr(cls, "to", to)
    return on_gpu, moves


def stand_in_gpu_stack(monkeypatch):
    from headseg.nodes.core.upsample import FeatureStack

    return stand_in_on_gpu(monkeypatch, FeatureStack)


@pytest.mark.parametrize("device", [None, "auto", "gpu"])
def test_multi_kmeans_clusters_on_the_gpu_and_brings_the_sweep_back(nodes, stack, comfy_device, monkeypatch, device):
    """The node's wiring when the GPU has room (a stand-in here): the stack goes to ComfyUI's GPU, the
    sweep comes back to the CPU (ComfyUI caches it). device None: a prompt saved before the input."""
    from headseg.nodes.core import kmeans as core_kmeans

    expected = nodes.MultiKMeans.execute(stack, "2,3,4", 0, "cpu").args[0]
    comfy_device.set("cuda:0")
    on_gpu, stack_moves = stand_in_gpu_stack(monkeypatch)
    sweep_moves, real_sweep_to = [], core_kmeans.ClusterSweep.to

    def sweep_to(self, dev):
        sweep_moves.append(torch.device(dev))
        return real_sweep_to(self, dev)

    def multi_kmeans(s, *args, **kwargs):
        assert s is on_gpu
        return expected  # stands for the sweep made on the GPU

    monkeypatch.setattr(core_kmeans.ClusterSweep, "to", sweep_to)
    monkeypatch.setattr(core_kmeans, "multi_kmeans", multi_kmeans)
    args = (stack, "2,3,4", 0) if device is None else (stack, "2,3,4", 0, device)
    out = nodes.MultiKMeans.execute(*args)
    assert out.args[0] is not expected and all(r.labels.device.type == "cpu" for r in out.args[0].results.values())
    assert stack_moves == [torch.device("cuda:0")] and sweep_moves == [torch.device("cpu")]
    assert comfy_device.released == 1


def test_multi_kmeans_moves_the_stack_to_the_gpu_and_falls_back_when_it_is_full(nodes, stack, comfy_device, monkeypatch):
    """The node's wiring: the stack goes to ComfyUI's GPU; there (a stand-in here) the sweep runs out
    of memory, and the clusters come from the CPU, equal to a CPU run's."""
    from headseg.nodes.core import kmeans as core_kmeans

    expected = nodes.MultiKMeans.execute(stack, "2,3,4", 0, "cpu").args[0]
    comfy_device.set("cuda:0")
    on_gpu, moves = stand_in_gpu_stack(monkeypatch)
    real_kmeans = core_kmeans.multi_kmeans

    def multi_kmeans(s, *args, **kwargs):
        if s is on_gpu:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        return real_kmeans(s, *args, **kwargs)

    monkeypatch.setattr(core_kmeans, "multi_kmeans", multi_kmeans)
    out = nodes.MultiKMeans.execute(stack, "2,3,4", 0, "auto")
    assert moves == [torch.device("cuda:0"), torch.device("cpu")]
    assert _same_sweep(out.args[0], expected)
    assert all(r.labels.device.type == "cpu" for r in out.args[0].results.values())
    assert out.args[1].shape[0] == 3 and comfy_device.emptied == 1


# ----------------------------------------------------------------------------- Head PCA
@pytest.fixture(scope="module")
def recording():
    return planted_recording([nested_scene(48, 64)], layout=small_layout(heads=2), d=8, noise=0.2, seed=3)


def _same_features(a, b) -> bool:
    return list(a.layers) == list(b.layers) and all(torch.equal(a.layers[k], b.layers[k]) for k in a.layers)


def test_head_pca_gives_the_same_features_with_device_omitted_auto_and_cpu_on_a_cpu(nodes, recording):
    omitted = nodes.HeadPCA.execute(recording, "down+up", "all", 3).args[0]  # prompts saved before the input existed
    for choice in ("auto", "cpu"):
        got = nodes.HeadPCA.execute(recording, "down+up", "all", 3, None, choice).args[0]
        assert _same_features(got, omitted), choice
    assert_device_input(nodes.HeadPCA)


def test_head_pca_on_gpu_without_one_names_the_input(nodes, recording, comfy_device):
    comfy_device.set("cpu")
    with pytest.raises(ValueError, match="^device: 'gpu' runs HeadSeg on CUDA or ROCm GPUs only"):
        nodes.HeadPCA.execute(recording, "down+up", "all", 3, None, "gpu")


def stand_in_gpu_recording(monkeypatch):
    from headseg.nodes.core.recording import Recording

    return stand_in_on_gpu(monkeypatch, Recording)


@pytest.mark.parametrize("device", [None, "auto", "gpu"])
def test_head_pca_reduces_on_the_gpu_and_brings_the_features_back(nodes, recording, comfy_device, monkeypatch, device):
    """The node's wiring when the GPU has room (a stand-in here): the selected layers go to ComfyUI's
    GPU, the features come back to the CPU (ComfyUI caches them)."""
    from headseg.nodes.core import pca as core_pca

    expected = nodes.HeadPCA.execute(recording, "down+up", "all", 3, None, "cpu").args[0]
    comfy_device.set("cuda:0")
    on_gpu, rec_moves = stand_in_gpu_recording(monkeypatch)
    feature_moves, real_features_to = [], core_pca.HeadFeatures.to

    def features_to(self, dev):
        feature_moves.append(torch.device(dev))
        return real_features_to(self, dev)

    def recording_pca(rec, components):
        assert rec is on_gpu and components == 3
        return expected  # stands for the features made on the GPU

    monkeypatch.setattr(core_pca.HeadFeatures, "to", features_to)
    monkeypatch.setattr(core_pca, "recording_pca", recording_pca)
    args = (recording, "down+up", "all", 3) + (() if device is None else (None, device))
    out = nodes.HeadPCA.execute(*args)
    assert _same_features(out.args[0], expected) and all(t.device.type == "cpu" for t in out.args[0].layers.values())
    assert rec_moves == [torch.device("cuda:0")] and feature_moves == [torch.device("cpu")]
    assert comfy_device.released == 1


def test_head_pca_falls_back_to_the_cpu_when_the_gpu_is_full(nodes, recording, comfy_device, monkeypatch, caplog):
    from headseg.nodes.core import pca as core_pca

    expected = nodes.HeadPCA.execute(recording, "down+up", "all", 3, None, "cpu").args[0]
    comfy_device.set("cuda:0")
    on_gpu, moves = stand_in_gpu_recording(monkeypatch)
    real_pca = core_pca.recording_pca

    def recording_pca(rec, components):
        if rec is on_gpu:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
        return real_pca(rec, components)

    monkeypatch.setattr(core_pca, "recording_pca", recording_pca)
    with caplog.at_level(logging.WARNING):
        out = nodes.HeadPCA.execute(recording, "down+up", "all", 3, None, "auto")
    assert moves == [torch.device("cuda:0"), torch.device("cpu")]
    assert _same_features(out.args[0], expected) and comfy_device.emptied == 1
    assert "Head PCA ran out of GPU memory" in caplog.text
