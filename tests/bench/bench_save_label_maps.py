"""Save Label Maps at dataset scale: the node's time, peak memory and files for a batch of large label maps
with many k, with and without Mask Merge's masks, in-process with a real ComfyUI importable.

    source tests/setup_env.sh && $PY tests/bench/bench_save_label_maps.py [--size 1024] [--batch 4]
        [--distinct 4] [--ks 2,5,6,10,20,50,100] [--repeats 3] [--threads 2] [--picture] [--torch-check]

Input: --distinct planted SD2.1-shaped recordings (tests/core/planted.py, regions nested at every k) through
Head PCA, Upsample, Multi K-Means and Mask Merge (batch_index -1, iou_threshold 0.9) as the nodes run them;
a --batch larger than --distinct repeats those images (the node's work does not depend on which image an
image is). Timed (median of --repeats, the runs of each variant alternating): the masks' check alone (every
mask compared with its cluster), the node without masks (label maps only), with masks, and with --picture
the node with the masks and the pictures too; --torch-check also times the check as it was before (each
mask compared through torch), as a reference. Then one run of the fullest variant under a resident-memory
sampler: its peak extra memory, and the files it wrote (count, MB).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_core  # noqa: E402  (this folder's module: the planted input, PeakRSS)


def torch_check(masks, clusters) -> None:
    """The check before: each mask against its cluster through torch (for --torch-check's reference)."""
    import torch

    for b, ms in enumerate(masks):
        for j, (k, cluster) in enumerate(zip(ms.k.tolist(), ms.cluster.tolist())):
            if not torch.equal(ms.masks[j], clusters.results[k].labels[b] == cluster):
                raise ValueError(f"mask {j} of image {b} is not its cluster")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels, default 1024")
    parser.add_argument("--batch", type=int, default=4, help="images saved at once, default 4")
    parser.add_argument("--distinct", type=int, default=4, help="images clustered (the batch repeats them), default 4")
    parser.add_argument("--ks", default="2,5,6,10,20,50,100", help="Multi K-Means' cluster_counts")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each variant (median), default 3")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, default 2")
    parser.add_argument("--picture", action="store_true", help="also time the node with the pictures")
    parser.add_argument("--torch-check", action="store_true", help="also time the former torch check")
    args = parser.parse_args()

    planted = bench_core.import_pack()
    from headseg.tests.support.comfy_in_process import import_comfyui

    if not import_comfyui(cpu=True):
        sys.exit("ComfyUI is not importable: run `source tests/setup_env.sh` first (it sets HEADSEG_COMFYUI)")
    import folder_paths
    import torch

    torch.set_num_threads(args.threads)
    scratch = tempfile.mkdtemp(prefix="headseg-bench-")
    output = os.path.join(scratch, "output")  # the saved files alone (the stage nodes' previews go to temp)
    os.mkdir(output)
    folder_paths.set_temp_directory(os.path.join(scratch, "temp"))
    folder_paths.set_output_directory(output)
    from headseg.nodes import label_map_nodes
    from headseg.nodes.head_pca_node import HeadPCA
    from headseg.nodes.kmeans_node import MultiKMeans
    from headseg.nodes.mask_merge_node import MaskMerge
    from headseg.nodes.upsample_nodes import Upsample
    from headseg.nodes.core.kmeans import parse_cluster_counts

    ks = parse_cluster_counts(args.ks)
    n, B = min(args.distinct, args.batch), args.batch
    # nested regions at every k: cut sizes must grow by at most 4x a level (planted.split_scene)
    cuts = [k for k in ks if k > 1]
    scenes = [planted.split_scene(args.size, args.size, cut_sizes=cuts, seed=s) for s in range(n)]
    rec = planted.planted_recording(scenes, planted.sd21_layout(), d=64, noise=1.0, seed=0)
    start = time.perf_counter()
    stack = Upsample.execute(HeadPCA.execute(rec, "down+up", "all", 8, device="cpu").args[0], "bilinear", False).args[0]
    del rec
    sweep = MultiKMeans.execute(stack, args.ks, 0, "cpu").args[0]
    del stack
    merged = MaskMerge.execute(sweep, 0.9, 0.0, -1).args[0]
    made = time.perf_counter() - start
    if B > n:  # the batch repeats the clustered images (the masks by reference: no copy)
        sweep.results = {
            k: r.__class__(r.k, r.labels.repeat((B + n - 1) // n, 1, 1)[:B], r.centroids.repeat((B + n - 1) // n, 1, 1)[:B],
                           r.inertia.repeat((B + n - 1) // n)[:B], r.n_iter)
            for k, r in sweep.results.items()
        }
        merged = [merged[b % n] for b in range(B)]
    ramp = torch.linspace(0, 1, args.size)
    pictures = torch.stack([ramp[:, None].expand(-1, args.size), ramp[None, :].expand(args.size, -1),
                            (ramp[:, None] * ramp[None, :])], -1)  # [H, W, 3]
    grain = 0.03 * torch.randn(B, args.size, args.size, 3, generator=torch.Generator().manual_seed(0))
    pictures = (pictures + grain).clamp(0, 1)  # [B, H, W, 3]: smooth shading plus a little grain

    runs = iter(range(10**9))
    variants = {
        "the masks' check alone": lambda: label_map_nodes._mask_entries(merged, sweep),
        "the node, label maps only": lambda: label_map_nodes.SaveLabelMaps.execute(sweep, f"r{next(runs)}/x"),
        "the node with the masks": lambda: label_map_nodes.SaveLabelMaps.execute(sweep, f"r{next(runs)}/x", masks=merged),
    }
    if args.picture:
        variants["the node with the masks and the pictures"] = lambda: label_map_nodes.SaveLabelMaps.execute(
            sweep, f"r{next(runs)}/x", image=pictures, masks=merged)
    if args.torch_check:
        variants["reference: the former torch check alone"] = lambda: torch_check(merged, sweep)
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, call in variants.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
        for entry in os.listdir(output):  # the files of these runs (hundreds of MB at batch 16)
            shutil.rmtree(os.path.join(output, entry))

    fullest = list(variants)[3 if args.picture else 2]
    with bench_core.PeakRSS() as rss:
        variants[fullest]()
    files = [p for p in pathlib.Path(output).rglob("*") if p.is_file()]
    masks = [len(ms) for ms in merged]
    print(f"# {args.size}x{args.size} px, batch {B} ({n} distinct), k = {args.ks}, {sum(masks)} merged masks "
          f"({min(masks)} - {max(masks)} per image), torch {torch.__version__}, {args.threads} threads "
          f"(input made in {made:.0f} s)")
    print(f"| step | seconds (median of {args.repeats}) |")
    print("| --- | ---: |")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.3f} |")
    print(f"\n{fullest}: peak extra memory {rss.extra_mb:.0f} MB (RSS), {len(files)} files, "
          f"{sum(p.stat().st_size for p in files) / 1e6:.1f} MB")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
