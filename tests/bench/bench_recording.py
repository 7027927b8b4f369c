"""Recording benchmark: sampling time with vs without HeadSeg recording, and recording memory per image per step.

    source tests/setup_env.sh && $PY tests/bench/bench_recording.py [--runs 7] [--steps 10] [--latent 32]
                                                                    [--threads 1] [--full-forward 512]
                                                                    [--full-size sd21 sdxl --device cuda]

1. Overhead: the tiny SD2-layout UNet (tests/support/tiny_unets.py) sampled on the CPU through
   comfy.sample.sample, same model, seed and conditioning, plain and recorded runs interleaved;
   median wall time of --runs each. Target: <= 5 % extra.
2. Memory: bytes kept per image per recorded step (cond only, float16) for SD2.1 at 512x512 and
   768x768 and SDXL at 1024x1024. Layers, heads and head widths are read from ComfyUI's own UNetModel
   built with the real configs on the meta device (no weights); each layer's grid follows from the
   Downsample/Upsample modules before it (recorder.find_self_attention_layers). Target: <= 25 MB for SD2.1 at 512x512.
   --full-forward 512 (or 768) also samples one step of a full-size SD2.1 UNet (random weights, fp32,
   about 3.5 GB RAM and tens of seconds on a CPU) and measures the real recording.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import runpy
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
MB = 1e6

SD21 = {  # ComfyUI's SD2.1 UNet config (comfy/model_detection.py)
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": True, "context_dim": 1024, "num_head_channels": 64,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SDXL = {  # ComfyUI's SDXL base UNet config
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def setup_comfy(cpu: bool = True):
    """The checkout as package ``headseg`` (as tests/conftest.py does), then ComfyUI in-process, on the
    CPU unless ``cpu`` is False (then on the device ComfyUI picks when it serves)."""
    runpy.run_path(str(REPO / "tests" / "support" / "checkout.py"))["import_checkout"]()
    from headseg.tests.support.comfy_in_process import import_comfyui

    if not import_comfyui(cpu=cpu):
        sys.exit("HEADSEG_COMFYUI is not set: source tests/setup_env.sh first")


# ------------------------------------------------------------------------------------------ overhead
def bench_overhead(runs: int, steps: int, latent: int, batch: int):
    import torch

    from headseg.nodes import recorder
    from headseg.tests.support import tiny_unets as tiny

    model = tiny.build("SD2", seed=0)
    pos, neg = tiny.conditioning("SD2")
    hw = (latent, latent)
    variants = {"plain": model, "plain again (noise floor)": model}
    for mode in ("last", "mean"):
        patched, live = recorder.attach_recorder(model, steps=mode)
        variants[f"steps={mode}"] = (patched, live)

    def sample(m):
        return tiny.sample(m, pos, neg, latent_hw=hw, batch=batch, steps=steps, cfg=5.0, seed=0)

    reference = sample(model)  # warm-up
    for name, (patched, live) in [(k, v) for k, v in variants.items() if not k.startswith("plain")]:
        out = sample(patched)
        assert (out - reference).abs().max().item() <= 1e-4, f"{name} changed the sampled latent"
        assert live.snapshot().num_heads > 0

    # time spent inside the recorder itself (per-call bookkeeping, slicing, copies, running sums, end of run)
    inside = {"s": 0.0}

    def timed(fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                inside["s"] += time.perf_counter() - t
        return wrapper

    recorder._Store.observe = timed(recorder._Store.observe)
    recorder._Store.end_run = timed(recorder._Store.end_run)
    recorder._Store.begin_eval = timed(recorder._Store.begin_eval)
    recorder._Store.begin_batch = timed(recorder._Store.begin_batch)
    recorder._without_shadowing_patches = timed(recorder._without_shadowing_patches)
    recorder._without_bypassing_patches = timed(recorder._without_bypassing_patches)
    spent = {name: [] for name in variants}

    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}  # process CPU time: robust when other jobs share the cores
    order = list(variants)
    for r in range(runs):
        for name in (order if r % 2 == 0 else order[::-1]):  # interleave, alternate order against drift
            m = variants[name] if name.startswith("plain") else variants[name][0]
            inside["s"] = 0.0
            t0, c0 = time.perf_counter(), time.process_time()
            sample(m)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            spent[name].append(inside["s"] / wall[name][-1])

    base_wall, base_cpu = statistics.median(wall["plain"]), statistics.median(cpu["plain"])
    print(f"\n## Recording overhead: tiny SD2-layout UNet on CPU ({torch.get_num_threads()} thread(s)), "
          f"latent {latent}x{latent} (image {latent * 8}x{latent * 8}), batch {batch}, {steps} euler steps, cfg 5, "
          f"median of {runs}")
    print("| variant | wall median s | wall min s | wall overhead | CPU median s | CPU overhead | "
          "time inside the recorder |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in variants:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        ow = "—" if name == "plain" else f"{100 * (w / base_wall - 1):+.1f} %"
        oc = "—" if name == "plain" else f"{100 * (c / base_cpu - 1):+.1f} %"
        ins = "—" if name.startswith("plain") else f"{100 * statistics.median(spent[name]):.2f} %"
        print(f"| {name} | {w:.3f} | {min(wall[name]):.3f} | {ow} | {c:.3f} | {oc} | {ins} |")


# ------------------------------------------------------------------------------------------ full size
def full_size_model(name: str, device, dtype, seed: int = 0):
    """-> (ModelPatcher of a full-size UNet with random weights on ``device``, positive, negative, latent
    [1, 4, h, w]): "sd21" (SD2.1 v-prediction at 512x512) or "sdxl" (SDXL base at 1024x1024)."""
    import torch

    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    from headseg.tests.support.tiny_unets import init_weights

    if name == "sd21":
        config = comfy.supported_models.SD20(dict(SD21))
        make, model_type, size, context, pooled = comfy.model_base.BaseModel, "V_PREDICTION", 512, 1024, None
    else:
        config = comfy.supported_models.SDXL(dict(SDXL))
        make, model_type, size, context, pooled = comfy.model_base.SDXL, "EPS", 1024, 2048, 1280
    config.set_inference_dtype(dtype, None)
    model = make(config, model_type=getattr(comfy.model_base.ModelType, model_type), device=device)
    init_weights(model.diffusion_model, seed, device)  # drawn where they live
    model.eval()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
    gc = torch.Generator().manual_seed(seed + 1)

    def cond():
        extra = {} if pooled is None else {"pooled_output": torch.randn((1, pooled), generator=gc), "width": size,
                                           "height": size}
        return [[torch.randn((1, 77, context), generator=gc), extra]]

    return patcher, cond(), cond(), torch.zeros((1, 4, size // 8, size // 8))


def _attending_patch(patcher):
    """A clone of ``patcher`` whose self-attention layers run through ComfyUI's attn1 replace path with a
    patch that calls ComfyUI's attention and nothing else, as HeadSeg's does before it records."""
    import comfy.ldm.modules.attention as attention

    from headseg.nodes import recorder

    def attend(q, k, v, extra):
        return attention.optimized_attention(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"),
                                             transformer_options=extra)

    clone = patcher.clone()
    for layer in recorder.find_self_attention_layers(patcher.get_model_object("diffusion_model")):
        clone.set_model_attn1_replace(attend, layer.key.block, layer.key.number, layer.key.depth)
    return clone


def bench_full_size(names: list[str], device_name: str, runs: int, steps: int):
    """Sampling time and peak device memory of full-size UNets (random weights, float16 on a GPU),
    plain against recorded, runs interleaved; and how far the recorded runs' latents are from a plain
    run's, next to how far a second plain run's are."""
    import torch

    import comfy.model_management
    import comfy.sample

    from headseg.nodes import recorder

    device = torch.device(device_name) if device_name else comfy.model_management.get_torch_device()
    gpu = device.type == "cuda"
    dtype = torch.float16 if gpu else torch.float32
    what = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} thread(s)"

    def sync():
        if gpu:
            torch.cuda.synchronize(device)

    for name in names:
        patcher, pos, neg, latent = full_size_model(name, device, dtype)
        variants = {
            "plain": (patcher, None),
            "plain again (noise floor)": (patcher, None),
            "an attn1 replace patch that only attends (no HeadSeg)": (_attending_patch(patcher), None),
        }
        for mode in ("last", "mean"):
            variants[f"recording, steps={mode}"] = recorder.attach_recorder(patcher, steps=mode)
        noise = comfy.sample.prepare_noise(latent, 0)

        def sample(m, n=steps):
            with torch.inference_mode():
                return comfy.sample.sample(m, noise, n, 7.0, "euler", "normal", pos, neg, latent,
                                           disable_pbar=True, seed=0)

        # a warm-up run (loads the model, builds kernels; on a GPU the first run of a fresh process has
        # given other latents than the runs after it), then how far each variant's latent is from a
        # plain run's after one step and after all: "plain again" shows what the device itself varies
        sample(patcher)
        reference = {n: sample(patcher, n) for n in (1, steps)}
        diffs, kept = {}, {}
        for label, (m, live) in variants.items():
            if label != "plain":
                diffs[label] = [(sample(m, n) - reference[n]).abs().max().item() for n in (1, steps)]
            if live is not None:
                rec = live.snapshot()
                kept[label] = sum(t.numel() * t.element_size() for t in rec.layers.values())
        wall = {label: [] for label in variants}
        peak = {label: [] for label in variants}
        order = list(variants)
        for r in range(runs):
            for label in (order if r % 2 == 0 else order[::-1]):  # interleaved, alternating against drift
                sync()
                if gpu:
                    torch.cuda.reset_peak_memory_stats(device)
                    held = torch.cuda.memory_allocated(device)
                t0 = time.perf_counter()
                sample(variants[label][0])
                sync()
                wall[label].append(time.perf_counter() - t0)
                if gpu:
                    peak[label].append(torch.cuda.max_memory_allocated(device) - held)
        base = statistics.median(wall["plain"])
        side = latent.shape[-1] * 8
        print(f"\n## Recording overhead: full-size {name.upper()} UNet (random weights, {str(dtype)[6:]}), "
              f"{side}x{side}, batch 1, {steps} euler steps, cfg 7, on {what}; median of {runs}")
        print("| variant | wall median s | wall min s | vs plain | peak extra device memory | recording kept "
              f"| latent's max change from plain's, after 1 step / {steps} |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for label in variants:
            w = statistics.median(wall[label])
            vs = "—" if label == "plain" else f"{100 * (w / base - 1):+.1f} %"
            mem = f"{max(peak[label]) / MB:.0f} MB" if peak[label] else "—"
            rec = f"{kept[label] / MB:.1f} MB" if label in kept else "—"
            diff = " / ".join(f"{d:.1e}" for d in diffs[label]) if label in diffs else "—"
            print(f"| {label} | {w:.3f} | {min(wall[label]):.3f} | {vs} | {mem} | {rec} | {diff} |")
        del patcher, variants
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()


# ------------------------------------------------------------------------------------------ memory
def layer_table(unet_config: dict, latent_hw: tuple[int, int]):
    """Full-size UNet on the meta device -> [(LayerInfo, (h, w))] with each layer's token grid."""
    import torch

    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from headseg.nodes import recorder

    unet = UNetModel(**unet_config, device=torch.device("meta"), operations=comfy.ops.disable_weight_init)
    layers = recorder.find_self_attention_layers(unet)

    def grid(k):
        h, w = latent_hw
        for _ in range(k):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        return h, w

    return [(layer, grid(layer.level)) for layer in layers]


def bench_memory(full_forward: list[int]):
    cases = [("SD2.1", SD21, 512), ("SD2.1", SD21, 768), ("SDXL", SDXL, 1024)]
    print("\n## Recording memory per image per recorded step (cond branch, float16, all positions and levels)")
    print("| model | image | layers | heads | by grid (layers x heads x d @ grid) | MB | MB without middle | "
          "steps=mean running sum (fp32, MB) |")
    print("|---|---|---:|---:|---|---:|---:|---:|")
    for name, config, size in cases:
        table = layer_table(config, (size // 8, size // 8))
        groups = {}
        total = no_mid = 0
        for layer, (h, w) in table:
            nbytes = layer.heads * layer.dim_head * h * w * 2
            total += nbytes
            if layer.key.block != "middle":
                no_mid += nbytes
            g = groups.setdefault((h, w, layer.heads, layer.dim_head), 0)
            groups[(h, w, layer.heads, layer.dim_head)] = g + 1
        desc = ", ".join(f"{n}x{H}x{d}@{h}²" for (h, w, H, d), n in sorted(groups.items(), key=lambda t: -t[0][0]))
        heads = sum(layer.heads for layer, _ in table)
        print(f"| {name} | {size}x{size} | {len(table)} | {heads} | {desc} | {total / MB:.1f} | {no_mid / MB:.1f} | "
              f"{2 * total / MB:.1f} |")

    for size in full_forward:
        measured, seconds, expected = full_forward_sd21(size)
        print(f"\nFull-size SD2.1 UNet (random weights), one real step at {size}x{size}, cfg 1: recording holds "
              f"{measured / MB:.1f} MB (table: {expected / MB:.1f} MB), step took {seconds:.1f} s on the CPU")


def full_forward_sd21(size: int):
    import torch

    import comfy.model_base
    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models

    from headseg.nodes import recorder
    from headseg.tests.support.tiny_unets import init_weights

    config = comfy.supported_models.SD20(dict(SD21))
    config.set_inference_dtype(torch.float32, None)
    device = torch.device("cpu")
    model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.V_PREDICTION, device=device)
    init_weights(model.diffusion_model, seed=0)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)
    patched, live = recorder.attach_recorder(patcher)
    g = torch.Generator().manual_seed(0)
    pos = [[torch.randn((1, 77, 1024), generator=g), {}]]
    latent = torch.zeros((1, 4, size // 8, size // 8))
    noise = torch.randn(latent.shape, generator=g)
    t0 = time.perf_counter()
    with torch.inference_mode():
        comfy.sample.sample(patched, noise, 1, 1.0, "euler", "normal", pos, pos, latent, disable_pbar=True, seed=0)
    seconds = time.perf_counter() - t0
    rec = live.snapshot()
    measured = sum(t.numel() * t.element_size() for t in rec.layers.values())
    expected = sum(layer.heads * layer.dim_head * h * w * 2 for layer, (h, w) in layer_table(SD21, (size // 8,) * 2))
    assert rec.num_heads == 195, rec.num_heads
    return measured, seconds, expected


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=7, help="timed runs per variant (median reported; 0 skips the overhead part)")
    ap.add_argument("--steps", type=int, default=10, help="sampling steps per run")
    ap.add_argument("--latent", type=int, default=32, help="latent side of the tiny-model runs (image = 8x)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--full-forward", type=int, nargs="*", default=[], metavar="SIZE",
                    help="also sample one step of a full-size SD2.1 UNet at SIZE (512, 768)")
    ap.add_argument("--full-size", nargs="+", choices=("sd21", "sdxl"), default=[], metavar="MODEL",
                    help="instead of the tiny model, time full-size UNets with random weights (sd21 at 512x512, "
                         "sdxl at 1024x1024) on --device; meant for a GPU")
    ap.add_argument("--device", default="", help="device of --full-size (default: the one ComfyUI picks)")
    args = ap.parse_args()
    setup_comfy(cpu=not args.full_size or args.device == "cpu")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.full_size:
        bench_full_size(args.full_size, args.device, max(args.runs, 1), args.steps)
    elif args.runs > 0:
        bench_overhead(args.runs, args.steps, args.latent, args.batch)
    bench_memory(args.full_forward)


if __name__ == "__main__":
    main()
