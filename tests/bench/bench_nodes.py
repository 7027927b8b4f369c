"""Node benchmark: HeadSeg's stage nodes as ComfyUI runs them (previews, colour maps, MASK outputs and
all), in-process on the same planted input as bench_core.py, against the bare core in the same run.

    source tests/setup_env.sh && $PY tests/bench/bench_nodes.py [--size 512] [--width W] [--batch 1]
        [--layout sd21 | sdxl] [--repeats 5] [--threads 2] [--error-map] [--batch-index -1] [--device gpu]

Each node's execute() is timed (median of --repeats; the preview PNGs are written to a temporary
folder as ComfyUI writes them), then the chain runs once more under a resident-memory sampler: the
peak extra memory of each node, and the size of every node's outputs, which ComfyUI keeps in its
cache until the inputs change: all of them (as in a prompt queued past the server's hook, or a node run
outside ComfyUI) and, run once more as in a prompt queued to the server, those the chain reads (each node's
first output, and Mask Select's mask, as an inpainting pass reads it): outputs no node reads are not kept
(nodes/output_links.py). Head PCA is timed in that prompt too, with its peak extra memory: no node reads its
pca_rgb picture there; and, one run after the other, with a Preview Image reading pca_rgb. "core" is
segment()'s stages alone (bench_core.py's total) at the same size, measured in the same run: the ratio
(without Upsampling Error Map, a stage the core does not run) is what the nodes add (pictures, PNGs, MASK
copies).
Each chain is a new image (Mask Select writes its picture's PNG); "a click" is Mask Select run again
at another pixel of the same image, as when the user clicks the picker, timed after each chain, and
"another index" Mask Select run once more at that pixel with the next index, as when the user picks
a thumbnail and queues again (its thumbnails are the click's: no PNG is written).
With --device gpu, ComfyUI picks its GPU (as when it serves on one) and Head PCA and Multi K-Means run
with device = gpu (the recording and the stack stay on the CPU, as ComfyUI hands them over); "core" is
then segment() on the recording moved to the GPU. The peak memory column stays the process's resident
memory (the GPU's is not in it).
"""

from __future__ import annotations

import argparse
import atexit
import copy
import dataclasses
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_core  # noqa: E402  (this folder's module: the planted input, PeakRSS, the core stages)

KS = ",".join(map(str, bench_core.KS))


def output_bytes(value, seen: set) -> int:
    """Bytes of the tensors a node output holds (storages counted once over all outputs)."""
    import torch

    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(output_bytes(getattr(value, f.name), seen) for f in dataclasses.fields(value))
    if isinstance(value, dict):
        return sum(output_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(output_bytes(v, seen) for v in value)
    return 0


def queued_prompt(steps) -> dict:
    """The chain of ``steps`` as an API prompt queued to the server (through nodes/output_links.py's hook): each
    node reads the first output of the one before, and an inpainting pass reads Mask Select's mask."""
    from headseg.nodes.output_links import annotate

    prompt = {
        name: {"class_type": cls.GET_SCHEMA().node_id, "inputs": {"source": [source, 0]} if source else {}}
        for name, cls, _, source in steps
    }
    prompt["inpainting"] = {"class_type": "SetLatentNoiseMask", "inputs": {"mask": ["Mask Select At Pixel", 0]}}
    annotate(prompt)
    return prompt


def in_prompt(prompt: dict, node_id: str, cls, call):
    """``call(node class)`` as ComfyUI's executor runs the node ``node_id`` of ``prompt``: with its hidden PROMPT
    and the executing node's id."""
    from comfy_api.latest import io
    from comfy_execution.utils import CurrentNodeContext

    with CurrentNodeContext("bench", node_id):
        return call(cls.PREPARE_CLASS_CLONE({io.Hidden.prompt: prompt}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image height in pixels, default 512")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels, default = --size")
    parser.add_argument("--batch", type=int, default=1, help="images in the batch, default 1")
    parser.add_argument("--layout", choices=("sd21", "sdxl"), default="sd21")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each node (median), default 5")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, default 2")
    parser.add_argument("--error-map", action="store_true", help="also time Upsampling Error Map (explore example)")
    parser.add_argument("--batch-index", type=int, default=0, help="Mask Merge's batch_index (-1 = every image), default 0")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="where Head PCA and Multi K-Means run (their device input), default cpu")
    args = parser.parse_args()

    bench_core.import_pack()  # the checkout as package `headseg`
    from headseg.tests.support.comfy_in_process import import_comfyui

    if not import_comfyui(cpu=args.device == "cpu"):
        sys.exit("ComfyUI is not importable: run `source tests/setup_env.sh` first (it sets HEADSEG_COMFYUI)")
    import folder_paths
    import torch

    torch.set_num_threads(args.threads)
    scratch = tempfile.mkdtemp(prefix="headseg-bench-")  # the previews' PNGs (tens of MB a run)
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    folder_paths.set_temp_directory(scratch)
    folder_paths.set_output_directory(scratch)
    from headseg.nodes.head_pca_node import HeadPCA
    from headseg.nodes.kmeans_node import MultiKMeans
    from headseg.nodes.mask_merge_node import MaskMerge
    from headseg.nodes.mask_select_node import MaskSelectAtPixel
    from headseg.nodes.upsample_nodes import Upsample, UpsamplingErrorMap

    planted = sys.modules["headseg_planted"]
    H, W, B = args.size, args.width or args.size, args.batch
    scene = planted.split_scene(H, W, cut_sizes=bench_core.KS, seed=0)
    layers = planted.sdxl_layout() if args.layout == "sdxl" else planted.sd21_layout()
    rec = planted.planted_recording([scene] * B, layers, d=64, noise=1.0, seed=0)
    # a photo-like picture for the overlays: smooth shading plus a little grain (PNG cost depends on it)
    ramp_y, ramp_x = torch.linspace(0, 1, H)[:, None, None], torch.linspace(0, 1, W)[None, :, None]
    shade = torch.cat([ramp_y.expand(H, W, 1), ramp_x.expand(H, W, 1), (ramp_y * ramp_x).expand(H, W, 1)], -1)
    grain = 0.03 * torch.randn(B, H, W, 3, generator=torch.Generator().manual_seed(0))
    picture = (shade + grain).clamp(0, 1)  # [B, H, W, 3]

    # (name, node class, its run: (class, values so far) -> NodeOutput, the node its first input reads)
    steps = [
        ("Head PCA", HeadPCA, lambda c, v: c.execute(rec, "down+up", "all", 8, device=args.device), None),
        ("Upsample", Upsample, lambda c, v: c.execute(v["Head PCA"], "bilinear", False), "Head PCA"),
        ("Multi K-Means", MultiKMeans, lambda c, v: c.execute(v["Upsample"], KS, 0, args.device), "Upsample"),
        ("Mask Merge", MaskMerge, lambda c, v: c.execute(v["Multi K-Means"], 0.9, 0.0, args.batch_index), "Multi K-Means"),
        ("Mask Select At Pixel", MaskSelectAtPixel, lambda c, v: c.execute(v["Mask Merge"], W // 2, H // 2, 0, picture),
         "Mask Merge"),
    ]  # fmt: skip
    if args.error_map:
        steps.insert(2, ("Upsampling Error Map", UpsamplingErrorMap, lambda c, v: c.execute(v["Upsample"]), "Upsample"))
    chain_prompt = queued_prompt(steps)

    from headseg.nodes import previews

    def run_chain(times=None):
        values, outputs = {}, {}
        for name, cls, call, _ in steps:
            previews._saved_previews.clear()  # a new image: Mask Select writes its picture's PNG again
            start = time.perf_counter()
            out = call(cls, values)
            if times is not None:
                times.setdefault(name, []).append(time.perf_counter() - start)
            values[name], outputs[name] = out.args[0], out.args
        return outputs

    core_rec = rec.to("cuda") if args.device == "gpu" else rec  # the bare core on the nodes' device
    run_chain()  # warm-up
    times, core, clicks, indices = {}, [], [], []
    for i in range(args.repeats):
        outputs = run_chain(times)
        # the user clicks another pixel: only Mask Select runs again, on the picture it has written
        start = time.perf_counter()
        MaskSelectAtPixel.execute(outputs["Mask Merge"][0], W // 3 + i, H // 3, 0, picture)
        clicks.append(time.perf_counter() - start)
        start = time.perf_counter()
        MaskSelectAtPixel.execute(outputs["Mask Merge"][0], W // 3 + i, H // 3, 1, picture)
        indices.append(time.perf_counter() - start)
        timings = {}
        bench_core.run_ours(core_rec, 0, timings)
        core.append(timings["total (sum of stages)"][0][0])

    peaks, sizes = {}, {}
    values, kept, seen = {}, [], set()
    for name, cls, call, _ in steps:
        previews._saved_previews.clear()  # a new image, as in the timed chains
        with bench_core.PeakRSS() as rss:
            out = call(cls, values)
        values[name] = out.args[0]
        kept.append(out.args)  # as ComfyUI's cache does; a freed storage's address could be reused
        peaks[name] = rss.extra_mb
        sizes[name] = output_bytes(out.args, seen) / 1e6
    read_sizes, seen = {}, set()  # the same chain as in a prompt queued to the server
    for name, cls, call, _ in steps:
        previews._saved_previews.clear()
        out = in_prompt(chain_prompt, name, cls, lambda c: call(c, values))
        kept.append(out.args)
        read_sizes[name] = output_bytes(out.args, seen) / 1e6
    # Head PCA as ComfyUI runs it in that prompt, where no node reads pca_rgb, and in one where a Preview Image
    # reads it, one after the other (the same load on both): timed, and their peaks
    from headseg.nodes.output_links import annotate

    read_prompt = copy.deepcopy(chain_prompt)
    read_prompt["pca_rgb preview"] = {"class_type": "PreviewImage", "inputs": {"images": ["Head PCA", 1]}}
    annotate(read_prompt)
    pca_name, pca_cls, pca_call, _ = steps[0]
    pca_runs = {"unread": chain_prompt, "read": read_prompt}
    pca_times, pca_peaks = {name: [] for name in pca_runs}, {}
    for _ in range(args.repeats):
        for name, prompt in pca_runs.items():
            previews._saved_previews.clear()
            start = time.perf_counter()
            in_prompt(prompt, pca_name, pca_cls, lambda c: pca_call(c, {}))
            pca_times[name].append(time.perf_counter() - start)
    for name, prompt in pca_runs.items():
        previews._saved_previews.clear()
        with bench_core.PeakRSS() as rss:
            in_prompt(prompt, pca_name, pca_cls, lambda c: pca_call(c, {}))
        pca_peaks[name] = rss.extra_mb

    where = f", Head PCA and Multi K-Means on {torch.cuda.get_device_name()}" if args.device == "gpu" else ""
    print(f"# {args.layout}, {W}x{H} px, batch {B}, k = {KS}, torch {torch.__version__}, {args.threads} threads{where}")
    print(f"| node | seconds (median of {args.repeats}) | peak extra memory (MB) | all outputs (MB) | "
          "outputs kept in the cache, only those read (MB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, *_ in steps:
        print(f"| {name} | {medians[name]:.3f} | {peaks[name]:.0f} | {sizes[name]:.0f} | {read_sizes[name]:.0f} |")
    total = sum(medians.values())
    core_total = statistics.median(core)
    print(f"| **all nodes** | **{total:.3f}** | | **{sum(sizes.values()):.0f}** | **{sum(read_sizes.values()):.0f}** |")
    print(f"| core alone (segment's stages, same run) | {core_total:.3f} | | |")
    for name, what in (("unread", "no node reads `pca_rgb`"), ("read", "a Preview Image reads `pca_rgb`")):
        print(f"| Head PCA queued, {what} | {statistics.median(pca_times[name]):.3f} | {pca_peaks[name]:.0f} | | |")
    print(f"| Mask Select At Pixel again, another pixel (a click) | {statistics.median(clicks):.3f} | | |")
    print(f"| Mask Select At Pixel again, the same pixel, another index | {statistics.median(indices):.3f} | | |")
    # the core computes no error map: the ratio leaves it out, so that it is what the nodes add to the same stages
    staged = total - medians.get("Upsampling Error Map", 0.0)
    but = " (all nodes but Upsampling Error Map)" if args.error_map else ""
    print(f"\nnodes / core: {staged / core_total:.2f}x{but}  (the recording itself: {output_bytes(rec.layers, set()) / 1e6:.0f} MB)")
    # Mask Merge runs on the calling thread, so every tensor it allocates is seen by PeakBytes (a
    # dispatch mode, which does not see the worker threads of Head PCA or Multi K-Means)
    from headseg.tests.support.peak_memory import PeakBytes

    with PeakBytes() as allocated:
        MaskMerge.execute(values["Multi K-Means"], 0.9, 0.0, args.batch_index)
    print(f"Mask Merge (batch_index {args.batch_index}): peak of the tensors it allocates {allocated.peak / 1e6:.0f} MB "
          f"(its outputs {sizes['Mask Merge']:.0f} MB)")


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
