"""Where the core's time goes, stage by stage and inside k-means, on the CPU or a GPU.

    source tests/setup_env.sh && $PY tests/bench/profile_core.py [--device cuda] [--size 512]
        [--layout sd21 | sdxl] [--threads 2] [--repeats 5] [--trace FILE]

Input: the planted recording of bench_core.py. Internal functions of the core are wrapped with
timers that synchronise the device before and after (so the times add up, at the cost of the
overlap a GPU would otherwise get). On a GPU every k runs at once on the calling thread, so each
part's time is its own; on the CPU the k run on worker threads and the parts' times overlap. Then: the eigendecompositions the PCA needs, alone, on each device
and thread count; and, with --trace, torch.profiler's table of one whole run (kernel launches,
host synchronisations) written to FILE.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import runpy
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--layout", choices=("sd21", "sdxl"), default="sd21")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trace", default=None, help="write torch.profiler's table of one run to this file")
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    bench = runpy.run_path(str(REPO / "tests" / "bench" / "bench_core.py"), run_name="bench_core")
    planted = bench["import_pack"]()
    from headseg.nodes.core import kmeans as km
    from headseg.nodes.core import lattice
    from headseg.nodes.core import pca
    from headseg.nodes.core.pipeline import segment

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"

    def sync():
        if gpu:
            torch.cuda.synchronize(device)

    times: dict[str, list[float]] = collections.defaultdict(list)

    def timed(name, fn):
        def wrapper(*a, **kw):
            sync()
            t = time.perf_counter()
            out = fn(*a, **kw)
            sync()
            times[name].append(time.perf_counter() - t)
            return out

        return wrapper

    _, rec = bench["make_recording"](planted, args.size, 1.0, 0, args.layout)
    rec = rec.to(device)
    print(f"profile: torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if gpu else "") + f", {args.layout} {args.size}x{args.size}")

    def whole():
        sync()
        t = time.perf_counter()
        segment(rec)
        sync()
        return time.perf_counter() - t

    whole()  # warm-up
    plain = [whole() for _ in range(args.repeats)]
    print(f"segment() as shipped: median {statistics.median(plain) * 1e3:.1f} ms (min {min(plain) * 1e3:.1f})")

    # ------------------------------------------------------------------ stages, one k at a time
    from headseg.nodes.core import kmeans_batched as batched
    from headseg.nodes.core.recording import Recording

    wraps = {
        (Recording, "validate"): "recording: validate",
        (Recording, "select"): "recording: select layers",
        (pca, "recording_pca"): "pca: all",
        (pca, "_eigh_on_cpu"): "pca: eigh on the CPU (GPU input)",
        (km, "PreparedImage"): "kmeans: image (grids, interpolation)",
        (km.PreparedImage, "prepare"): "kmeans: prepare (working sets, lattices, moments)",
        (km.PreparedImage, "working_set"): "kmeans: working sets",
        (lattice.Lattice, "moments"): "kmeans: moments",
        (km, "starts"): "kmeans: working-set starts (one k)",
        (batched, "working_set_runs"): "kmeans: working-set starts (all k at once)",
        (lattice.Lattice, "lloyd"): "kmeans: exact Lloyd on a lattice (one k)",
        (batched.DenseLattice, "lloyd"): "kmeans: exact Lloyd on a lattice (all k at once)",
        (km, "_canonical"): "kmeans: canonical order",
        (km, "multi_kmeans"): "kmeans: all",
    }
    originals = {}
    for (owner, name), label in wraps.items():
        originals[owner, name] = getattr(owner, name)
        setattr(owner, name, timed(label, originals[owner, name]))
    import headseg.nodes.core.pipeline as pipeline_module

    for name in ("recording_pca", "multi_kmeans"):
        originals[pipeline_module, name] = getattr(pipeline_module, name)
        setattr(pipeline_module, name, getattr(pca if name == "recording_pca" else km, name))
    whole()
    times.clear()
    serial = [whole() for _ in range(args.repeats)]
    for (owner, name), fn in originals.items():
        setattr(owner, name, fn)
    print(f"segment() with a sync around each part: median {statistics.median(serial) * 1e3:.1f} ms")
    print(f"  {'part':50s} {'calls/run':>9s} {'ms/run':>8s}")
    for label, values in times.items():
        per_run = sum(values) / args.repeats
        print(f"  {label:50s} {len(values) / args.repeats:9.1f} {per_run * 1e3:8.1f}")

    # ------------------------------------------------------------------ eigh alone
    sel = rec.select(("down", "up"))
    covs = []
    for t in sel.layers.values():
        B, heads, h, w, d = t.shape
        x = t.reshape(B * heads, h * w, d).float()
        xc = x - x.mean(1, keepdim=True)
        covs.append(xc.transpose(1, 2) @ xc)
    cov = torch.cat(covs)  # [G, d, d]
    print(f"eigh of the PCA's {cov.shape[0]} covariances [{cov.shape[1]}x{cov.shape[2]}] (median of {args.repeats}):")

    def time_fn(fn, sync_fn):
        fn()
        sync_fn()
        out = []
        for _ in range(args.repeats):
            sync_fn()
            t = time.perf_counter()
            fn()
            sync_fn()
            out.append(time.perf_counter() - t)
        return statistics.median(out) * 1e3

    cpu_cov = cov.cpu()
    from concurrent.futures import ThreadPoolExecutor

    for threads in sorted({1, args.threads, os.cpu_count() or 1}):
        torch.set_num_threads(1)
        with ThreadPoolExecutor(threads) as pool:
            def chunked():
                return list(pool.map(torch.linalg.eigh, cpu_cov.tensor_split(threads)))

            print(f"  CPU, {threads:2d} worker thread(s), float32: {time_fn(chunked, lambda: None):7.2f} ms")
    torch.set_num_threads(args.threads)
    if gpu:
        for dtype in (torch.float32, torch.float64):
            c = cov.to(dtype)
            print(f"  {device}, {dtype}: {time_fn(lambda: torch.linalg.eigh(c), sync):7.2f} ms")
        print(f"  {device} -> CPU -> {device} copies alone: "
              f"{time_fn(lambda: cov.cpu().to(device), sync):7.2f} ms")

    if args.trace:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        with profile(activities=activities) as prof:
            segment(rec)
            sync()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=60)
        pathlib.Path(args.trace).write_text(table)
        counts = {e.key: e.count for e in prof.key_averages()}
        launches = sum(v for k, v in counts.items() if k in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
        syncs = sum(v for k, v in counts.items() if "Synchronize" in k or k == "cudaMemcpyAsync")
        print(f"torch.profiler, one run: {launches} kernel launches, {syncs} synchronising calls/copies "
              f"(table in {args.trace})")


if __name__ == "__main__":
    sys.exit(main())
