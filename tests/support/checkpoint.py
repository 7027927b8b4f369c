"""A random-weight checkpoint with the full Stable Diffusion 2.1 (512, eps) architecture.

No diffusion weights can be downloaded in CI, so the end-to-end tests load this file through
ComfyUI's ordinary CheckpointLoaderSimple, which detects it as SD2: SD2.1 UNet (320 channels,
linear transformers, 16 self-attention layers, 195 heads of 64 dims), OpenCLIP-H text encoder
(stored in OpenCLIP layout, as in the original SD2.1 files) and the SD VAE. The weights are
seeded random numbers: the file tests the plumbing (layers, heads, shapes, inpainting wiring),
never segmentation quality.

Building needs no real weights and little memory: the three networks are instantiated on the
``meta`` device (shapes only) with ComfyUI's own classes, their state-dict names are converted
to the checkpoint layout with ComfyUI's own converters, and each tensor is then drawn in float16
from a seeded generator. The result (~2.6 GB) is cached under
``$HEADSEG_HOME/models/checkpoints/`` and built at most once at a time (file lock).

    python tests/support/checkpoint.py            # build if missing (progress on stderr), print the path
"""

from __future__ import annotations

import fcntl
import math
import os
import pathlib
import subprocess
import sys
import time

CHECKPOINT_NAME = "headseg-test-sd21-random.safetensors"
SEED = 2112
# Bump when the recipe changes: the file name carries it, so an old cache is not reused.
RECIPE = "1"

SD21_UNET_CONFIG = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "num_head_channels": 64,
    "num_heads": -1,
    "context_dim": 1024,
    "use_linear_in_transformer": True,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
    "use_checkpoint": False,
}

SD_VAE_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def headseg_home() -> pathlib.Path:
    return pathlib.Path(os.environ.get("HEADSEG_HOME", pathlib.Path.home() / ".cache" / "headseg"))


def checkpoints_dir() -> pathlib.Path:
    return headseg_home() / "models" / "checkpoints"


def checkpoint_path() -> pathlib.Path:
    stem, ext = CHECKPOINT_NAME.rsplit(".", 1)
    return checkpoints_dir() / f"{stem}-r{RECIPE}.{ext}"


def ensure_checkpoint(comfyui_dir: str | os.PathLike | None = None, log=print) -> pathlib.Path:
    """Path of the cached random-weight SD2.1 checkpoint; builds it (in a subprocess) if missing.

    Several processes may call this at once: one builds under an exclusive file lock, the others
    wait for it and then reuse the file.
    """
    path = checkpoint_path()
    if path.is_file():
        return path
    comfyui_dir = pathlib.Path(comfyui_dir or os.environ.get("HEADSEG_COMFYUI", ""))
    if not (comfyui_dir / "main.py").is_file():
        raise FileNotFoundError(
            f"HEADSEG_COMFYUI={str(comfyui_dir)!r} is not a ComfyUI folder (no main.py); "
            "source tests/setup_env.sh first"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / (path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():  # built by another process while we waited
            return path
        # Partial files (2.6 GB each) of builds killed before their cleanup ran (SIGTERM, SIGKILL):
        # no build runs while this process holds the lock.
        for stale in path.parent.glob(path.name + ".tmp*"):
            stale.unlink()
        log(f"[headseg] building the random-weight SD2.1 test checkpoint {path} (about a minute, once)")
        start = time.time()
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        try:
            subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--build", str(tmp), str(comfyui_dir)],
                check=True,
                cwd=str(comfyui_dir),
            )
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        log(f"[headseg] built {path.name} in {time.time() - start:.0f} s")
    return path


# ---------------------------------------------------------------------------------------------
# Building (runs in a subprocess with ComfyUI on sys.path)


def _meta_shapes(comfyui_dir: str) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape for UNet, text encoder and VAE, from ComfyUI's own classes."""
    sys.path.insert(0, comfyui_dir)
    from comfy.cli_args import args

    args.cpu = True
    import torch

    import comfy.ops
    import comfy.supported_models
    import comfy.text_encoders.sd2_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    shapes: dict[str, tuple[int, ...]] = {}
    with torch.device("meta"):
        unet = UNetModel(
            **SD21_UNET_CONFIG, dtype=torch.float16, device="meta", operations=comfy.ops.disable_weight_init
        )
        for k, v in unet.state_dict().items():
            shapes["model.diffusion_model." + k] = tuple(v.shape)
        del unet

        clip = comfy.text_encoders.sd2_clip.SD2ClipModel(device="meta", dtype=torch.float16)
        clip_sd = {k: v for k, v in clip.state_dict().items()}
        config = comfy.supported_models.SD20(dict(SD21_UNET_CONFIG))
        # HF-style "clip_h.transformer.text_model..." -> OpenCLIP "cond_stage_model.model..."
        for k, v in config.process_clip_state_dict_for_saving(clip_sd).items():
            shapes[k] = tuple(v.shape)
        del clip, clip_sd

        vae = AutoencoderKL(ddconfig=SD_VAE_DDCONFIG, embed_dim=4)
        for k, v in vae.state_dict().items():
            shapes["first_stage_model." + k] = tuple(v.shape)
        del vae
    return shapes


def _random_tensor(name: str, shape: tuple[int, ...], gen):
    """Seeded float16 values with a variance-preserving scale, so activations stay finite."""
    import torch

    leaf = name.rsplit(".", 1)[-1]
    if len(shape) == 0:  # e.g. logit_scale
        return torch.full((), math.log(100.0), dtype=torch.float16)
    if name.endswith("positional_embedding") or name.endswith("token_embedding.weight"):
        return (torch.randn(shape, generator=gen) * 0.02).half()
    if len(shape) == 1:
        # norms: weight 1, bias 0; biases 0
        return torch.ones(shape, dtype=torch.float16) if leaf == "weight" else torch.zeros(shape, dtype=torch.float16)
    fan_in = math.prod(shape[1:])
    if name.endswith("text_projection"):
        fan_in = shape[0]
    return (torch.randn(shape, generator=gen) / math.sqrt(fan_in)).half()


def build(out_path: str, comfyui_dir: str) -> None:
    import torch
    from safetensors.torch import save_file

    shapes = _meta_shapes(comfyui_dir)
    gen = torch.Generator().manual_seed(SEED)
    sd = {name: _random_tensor(name, shape, gen).contiguous() for name, shape in sorted(shapes.items())}
    n_params = sum(t.numel() for t in sd.values())
    print(f"[headseg] {len(sd)} tensors, {n_params / 1e9:.2f} B parameters -> {out_path}", file=sys.stderr, flush=True)
    save_file(sd, out_path, metadata={"headseg": f"random SD2.1 architecture, seed {SEED}, recipe {RECIPE}"})


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--build":
        build(sys.argv[2], sys.argv[3])
    else:
        # Progress on stderr, only the path on stdout: serve.sh reads the path and the user sees the build.
        print(ensure_checkpoint(log=lambda message: print(message, file=sys.stderr, flush=True)))
