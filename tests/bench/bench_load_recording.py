"""Load Recording's cost: peak extra memory (RSS) and wall time of load_recording on SD2.1-sized recording files.

    source tests/setup_env.sh && $PY tests/bench/bench_load_recording.py [--runs 7] [--batch 1 8] [--size 512]
                                                                         [--against OTHER_CHECKOUT]

For each --batch, a float16 recording of SD2.1's 16 layers (195 heads, d = 64) at --size pixels is saved with
save_recording, then loaded --runs times, each in a fresh Python process (peak RSS is per process): the peak
resident memory over the load minus the resident memory before it (Linux: the peak is reset through
/proc/self/clear_refs before the load), and the load's wall time. Medians of the runs; the file is in the page
cache (written just before), so the time is the read and the checks, not the disk. --against also loads each
file with another checkout of the pack (e.g. a git worktree of an earlier version), the two alternating run by
run, so that both see the same load of the machine.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[2]
MB = 1e6

# One load in a fresh process: prints the peak extra RSS (bytes) and the wall time (s).
_ONE_LOAD = """
import os, runpy, sys, time
runpy.run_path(sys.argv[1])["import_checkout"]()
import torch
from headseg.nodes.core.recording_file import load_recording

def status(field):
    with open("/proc/self/status", encoding="ascii") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field + ":"))

torch.set_num_threads(1)
with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
    fh.write("5")  # resets the peak (VmHWM) to the resident memory now
before = status("VmRSS")
start = time.perf_counter()
rec = load_recording(sys.argv[2])
took = time.perf_counter() - start
print(status("VmHWM") - before, took, sum(t.numel() * t.element_size() for t in rec.layers.values()))
"""


def make_file(folder: pathlib.Path, batch: int, size: int) -> pathlib.Path:
    import torch

    from headseg.nodes.core.recording import Recording
    from headseg.nodes.core.recording_file import save_recording
    from headseg.tests.core.planted import sd21_layout

    g = torch.Generator().manual_seed(0)
    layers = {}
    for key, heads, level in sd21_layout():  # 16 layers, 195 heads
        side = size // 8 >> level
        layers[key] = torch.randn(batch, heads, side, side, 64, generator=g).half()
    path = folder / f"sd21_{size}_b{batch}.safetensors"
    save_recording(Recording(layers, (size, size), "SD21", "last", "cond"), path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--against", type=pathlib.Path, help="another checkout of the pack to load the same files with")
    args = ap.parse_args()
    if not sys.platform.startswith("linux"):
        sys.exit("reads Linux's /proc/self: run it on Linux")
    import runpy

    runpy.run_path(str(REPO / "tests" / "support" / "checkout.py"))["import_checkout"]()
    checkouts = {"this checkout": REPO / "tests" / "support" / "checkout.py"}
    if args.against is not None:
        checkouts[str(args.against)] = args.against.resolve() / "tests" / "support" / "checkout.py"
    print(f"| recording (SD2.1, {args.size}×{args.size}) | checkout | file | peak extra RSS | × file | load time |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batch:
            path = make_file(pathlib.Path(tmp), batch, args.size)
            peaks = {name: [] for name in checkouts}
            times = {name: [] for name in checkouts}
            for _ in range(args.runs):
                for name, checkout in checkouts.items():
                    done = subprocess.run(
                        [sys.executable, "-c", _ONE_LOAD, str(checkout), str(path)],
                        capture_output=True, text=True, check=True,
                    )
                    peak, took, _held = done.stdout.split()
                    peaks[name].append(int(peak))
                    times[name].append(float(took))
            size = path.stat().st_size
            for name in checkouts:
                peak = statistics.median(peaks[name])
                print(
                    f"| batch {batch} | {name} | {size / MB:.1f} MB | {peak / MB:.1f} MB | {peak / size:.2f} | "
                    f"{statistics.median(times[name]) * 1000:.0f} ms |"
                )

if __name__ == "__main__":
    main()
