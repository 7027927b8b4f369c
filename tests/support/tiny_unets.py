"""Tiny seeded UNets with the real SD2, SD1.5 and SDXL block layouts, as ComfyUI ModelPatchers.

Same block/transformer structure (so the same self-attention layer keys) as the real models, with
narrow channels so that a few sampling steps take about a second on a CPU. Every weight is
initialised from a seeded generator (ComfyUI's ops allocate weights with torch.empty).
Needs ComfyUI importable and ``comfy.cli_args.args.cpu = True`` set before comfy.model_management.

    model = build("SD2", seed=0)                 # ModelPatcher
    pos, neg = conditioning("SD2", batch=1)      # ComfyUI conditioning lists
"""

from __future__ import annotations

import math

import torch

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models

CONTEXT_DIM = 64
CONTEXT_TOKENS = 8
SDXL_POOLED = 1280  # SDXL's adm input is pooled text (1280) + 6 size embeddings of 256 = 2816

_COMMON = {
    "in_channels": 4,
    "out_channels": 4,
    "image_size": 32,
    "model_channels": 32,
    "context_dim": CONTEXT_DIM,
    "use_spatial_transformer": True,
    "legacy": False,
    "use_checkpoint": False,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

LAYOUTS = {
    # SD2.x: 16 self-attention layers, heads = channels / 8 (SD2.1: channels / 64), linear proj.
    "SD2": dict(
        _COMMON,
        num_res_blocks=[2, 2, 2, 2],
        channel_mult=[1, 2, 4, 4],
        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
        transformer_depth_middle=1,
        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        use_linear_in_transformer=True,
        adm_in_channels=None,
        num_head_channels=8,
        num_heads=-1,
    ),
    # SD1.5: same 16 layer keys, 8 heads everywhere (head width grows with the channels), conv proj.
    "SD15": dict(
        _COMMON,
        num_res_blocks=[2, 2, 2, 2],
        channel_mult=[1, 2, 4, 4],
        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
        transformer_depth_middle=1,
        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        use_linear_in_transformer=False,
        adm_in_channels=None,
        num_heads=8,
        num_head_channels=-1,
    ),
    # SDXL: three levels, no attention at the top level, several transformers per block
    # (SDXL has depth 2 / 10; here 2 / 3), adm conditioning with pooled text + sizes.
    "SDXL": dict(
        _COMMON,
        num_res_blocks=[2, 2, 2],
        channel_mult=[1, 2, 4],
        transformer_depth=[0, 0, 2, 2, 3, 3],
        transformer_depth_middle=3,
        transformer_depth_output=[0, 0, 0, 2, 2, 2, 3, 3, 3],
        use_linear_in_transformer=True,
        adm_in_channels=SDXL_POOLED + 6 * 256,
        num_classes="sequential",
        num_head_channels=8,
        num_heads=-1,
    ),
    # A UNet with no transformer at all (resblocks only): nothing to record.
    "NOATTN": dict(
        _COMMON,
        num_res_blocks=[1, 1],
        channel_mult=[1, 2],
        transformer_depth=[0, 0],
        transformer_depth_middle=-1,
        transformer_depth_output=[0, 0, 0, 0],
        use_linear_in_transformer=True,
        adm_in_channels=None,
        num_head_channels=8,
        num_heads=-1,
    ),
}


class TinySD20(comfy.supported_models.SD20):
    unet_extra_config = {"num_heads": -1, "num_head_channels": 8, "attn_precision": torch.float32}


class TinySD15(comfy.supported_models.SD15):
    unet_extra_config = {"num_heads": 8, "num_head_channels": -1}


class TinySDXL(comfy.supported_models.SDXL):
    unet_extra_config = {"num_heads": -1, "num_head_channels": 8}


_CONFIGS = {"SD2": TinySD20, "SD15": TinySD15, "SDXL": TinySDXL, "NOATTN": TinySD20}


def init_weights(module: torch.nn.Module, seed: int, device="cpu") -> None:
    """Fills every parameter from a generator seeded on ``device`` (where the values are drawn: a
    full-size UNet on a GPU takes seconds there, minutes on a CPU): matrices ~ N(0, 1/fan_in), norm
    scales ~ 1, biases small."""
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.numel() == 0:
                continue
            if p.dim() >= 2:
                fan_in = p[0].numel()
                values = torch.randn(p.shape, generator=g, device=device) / math.sqrt(fan_in)
            elif name.endswith("weight"):  # GroupNorm / LayerNorm scale
                values = 1.0 + 0.1 * torch.randn(p.shape, generator=g, device=device)
            else:
                values = 0.05 * torch.randn(p.shape, generator=g, device=device)
            p.copy_(values.to(p.dtype))


def build(layout: str = "SD2", seed: int = 0, dtype: torch.dtype = torch.float32):
    """-> comfy.model_patcher.ModelPatcher of a tiny UNet with ``layout`` in LAYOUTS, all weights seeded."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {sorted(LAYOUTS)}, got {layout!r}")
    unet_config = dict(LAYOUTS[layout], dtype=dtype)
    config = _CONFIGS[layout](unet_config)
    config.set_inference_dtype(dtype, None)
    device = torch.device("cpu")
    if layout == "SDXL":
        model = comfy.model_base.SDXL(config, model_type=comfy.model_base.ModelType.EPS, device=device)
    else:
        model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS, device=device)
    init_weights(model.diffusion_model, seed)
    model.diffusion_model.to(dtype)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def build_dit(seed: int = 0):
    """-> ModelPatcher of a tiny SD3-layout MMDiT (a DiT: joint attention, no UNet self-attention)."""
    config = comfy.supported_models.SD3({
        "in_channels": 16,
        "patch_size": 2,
        "depth": 2,
        "pos_embed_max_size": 16,
        "num_patches": 256,
        "adm_in_channels": 32,
        "pos_embed_scaling_factor": None,
        "context_embedder_config": {
            "target": "torch.nn.Linear", "params": {"in_features": CONTEXT_DIM, "out_features": 128},
        },
    })
    device = torch.device("cpu")
    model = comfy.model_base.SD3(config, device=device)
    init_weights(model.diffusion_model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def conditioning(layout: str = "SD2", batch: int = 1, seed: int = 1):
    """-> (positive, negative) ComfyUI conditioning lists with random text embeddings."""
    g = torch.Generator().manual_seed(seed)

    def one():
        ctx = torch.randn((batch, CONTEXT_TOKENS, CONTEXT_DIM), generator=g)
        extra = {}
        if layout == "SDXL":
            extra = {"pooled_output": torch.randn((batch, SDXL_POOLED), generator=g), "width": 64, "height": 64}
        return [[ctx, extra]]

    return one(), one()


def sample(model, positive, negative, latent_hw=(8, 8), batch: int = 1, steps: int = 3, cfg: float = 5.0,
           seed: int = 0, sampler_name: str = "euler", scheduler: str = "normal", sampler_options: dict | None = None,
           **kwargs) -> torch.Tensor:
    """Samples through ComfyUI's own comfy.sample.sample -> latent [batch, 4, h, w].

    ``sampler_options`` (the settings of a sampler node such as SamplerDPMAdaptative): sampled as SamplerCustom
    does instead, with the sampler made from ``sampler_name`` and these options and the scheduler's sigmas.
    Runs under torch.inference_mode(), as ComfyUI executes every node.
    """
    import comfy.sample
    import comfy.samplers

    latent = torch.zeros((batch, 4, *latent_hw))
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        if sampler_options is not None:
            sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
            sampler = comfy.samplers.ksampler(sampler_name, sampler_options)
            return comfy.sample.sample_custom(
                model, noise, cfg, sampler, sigmas, positive, negative, latent, disable_pbar=True, seed=seed, **kwargs,
            )
        return comfy.sample.sample(
            model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
            disable_pbar=True, seed=seed, **kwargs,
        )
