"""HeadSeg_RecordSelfAttention: patch a MODEL so that sampling records every self-attention head."""

from __future__ import annotations

from comfy_api.latest import io

from . import recorder
from .node_utils import combo_error
from .run_history import HISTORY, MAX_KEEP_RUNS
from .types import Recording as RecordingSocket


class RecordSelfAttention(io.ComfyNode):
    """MODEL -> patched MODEL clone + live recording handle (filled when a sampler runs the clone)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="HeadSeg_RecordSelfAttention",
            display_name="HeadSeg Record Self-Attention",
            category="HeadSeg",
            description=(
                "Patches the model so that, while a sampler runs it, the output of every self-attention head "
                "(softmax(QK^T/sqrt d)·V, before the heads are mixed) is recorded for each UNet layer, in float16 "
                "on the CPU. Sample with the MODEL output; the RECORDING keeps the last sampling runs (keep_runs), the "
                "runs of the prompt that sampled last (its newest 64: one per item of a list of latents) and the run "
                "read last, and the "
                "node that reads it takes the run that produced its LATENT. Works with SD1.x, SD2.x and SDXL UNets (DiT models such as Flux or SD3 are "
                "refused). Chains attn1 patches set before or after it (SAG's, another pack's; one set after it under a "
                "layer's (block, number) key alone takes that layer over, unrecorded, with a warning) and survives "
                "later LoRA/FreeU clones; SAG and PAG keep their effect and their extra passes are not "
                "recorded. Recording does not change the sampled image."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip="The diffusion model (an SD1.x, SD2.x or SDXL UNet) to record. It is not modified: "
                            "a patched clone is returned.",
                ),
                io.Boolean.Input(
                    "down", default=True,
                    tooltip="Record the self-attention layers of the down (input) blocks. Off: those layers are "
                            "not patched at all. At least one of down / middle / up must be on.",
                ),
                io.Boolean.Input(
                    "middle", default=True,
                    tooltip="Record the middle block's self-attention (the coarsest grid: 1/8 of the latent on "
                            "SD1.x/SD2.x, 1/4 on SDXL). The paper's best masks leave it out; HeadPCA can drop it "
                            "later. Off: not patched (a UNet without a middle transformer has none to record).",
                ),
                io.Boolean.Input(
                    "up", default=True,
                    tooltip="Record the self-attention layers of the up (output) blocks. Off: those layers are not "
                            "patched at all.",
                ),
                io.String.Input(
                    "levels", default="all",
                    tooltip="Token-grid levels to record: 'all', or comma-separated levels such as '0,1'. "
                            "0 = the latent grid (image/8, e.g. 64x64 at 512 px), 1 = 1/2, 2 = 1/4, 3 = 1/8. "
                            "Fewer levels = less memory. A level the model lacks is skipped with a log line (SDXL has "
                            "none at 0); none of the model's levels is an error.",
                ),
                io.String.Input(
                    "steps", default="last",
                    tooltip="Which sampling steps to keep: 'last' (the final step, least memory), 'mean' (average over "
                            "all steps), or 0-based step indices 'N' or 'A-B' (average over steps A..B inclusive; "
                            "0 = the first step: the noisiest, or the least noisy on a rising schedule such as "
                            "FlipSigmas'). Steps count from the start of each sampling run: KSamplerAdvanced's "
                            "start_at_step, or the first sigma of SplitSigmas' low_sigmas, is step 0. Steps are "
                            "told apart by sigma. A range partly past the run's last step keeps the steps the run has (with a "
                            "log line); a step or range wholly past it records nothing, and Head PCA says so. "
                            "'mean' and ranges keep a float32 running sum "
                            "on the sampling device (GPU) until the run ends, twice the "
                            "float16 size: ~46 MB per image for SD2.1 at 512x512, ~420 MB for SDXL at 1024x1024.",
                ),
                io.Combo.Input(
                    "branch", options=list(recorder.BRANCHES), default="cond",
                    tooltip="CFG branch to record: 'cond' (positive prompt, default) or 'uncond' (negative prompt; "
                            "empty when cfg = 1, since ComfyUI then skips the uncond pass).",
                ),
                io.Int.Input(
                    "keep_runs", default=HISTORY, min=1, max=MAX_KEEP_RUNS,
                    optional=True,  # prompts saved before it existed leave it out: 3, as then
                    tooltip="Sampling runs of the recorded MODEL kept across prompts (1 .. 64, default 3), so that "
                            "a LATENT from a sampler that ran before others on this MODEL (a hires fix, an "
                            "inpainting pass) still finds its run. Each costs its recording's memory (about 23 MB "
                            "per image for SD2.1 at 512x512, 210 MB for SDXL at 1024x1024); 1 keeps the least. The "
                            "run read last and the runs of the prompt that sampled last (its newest 64: one per item of a list of latents, one per tile of a tiled upscaler) are kept besides them, whatever keep_runs says, and so is the run read for a LATENT while ComfyUI's cache keeps that LATENT (--cache-lru), for the 64 runs read last of all record nodes (a LATENT read from two record nodes holds two of them).",
                ),
            ],
            outputs=[
                io.Model.Output(
                    display_name="MODEL",
                    tooltip="Patched clone of the model: sample with it; the sampled latent is the same as "
                            "without recording.",
                ),
                RecordingSocket.Output(
                    display_name="RECORDING",
                    tooltip="Live recording of the sampling runs with the patched model (the last keep_runs, "
                            "the newest 64 runs of the prompt that sampled last and the run read last are kept): per layer [batch, heads, h, w, d] float16 (float32 for a layer where a "
                            "bfloat16, float32 or float64 UNet reaches values float16 makes inf, 65520 or more; about 23 MB per image and run "
                            "for SD2.1 at 512x512 with every layer). Connect the sampler's LATENT to the node "
                            "that reads it: that node runs after sampling and reads that LATENT's run.",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, levels="all", steps="last", branch="cond"):  # keep_runs: its widget's min and max
        # Only these are checked here (no **kwargs), so ComfyUI still checks the other widgets itself.
        for parse, value in ((recorder.parse_levels, levels), (recorder.parse_steps, steps)):
            if not isinstance(value, str):
                continue  # linked from another node: checked at execution
            try:
                parse(value)
            except (TypeError, ValueError) as exc:
                return str(exc)
        return combo_error("branch", branch, recorder.BRANCHES) or True

    @classmethod
    def execute(
        cls, model, down=True, middle=True, up=True, levels="all", steps="last", branch="cond",
        keep_runs=HISTORY,
    ) -> io.NodeOutput:
        positions = [name for name, on in (("down", down), ("middle", middle), ("up", up)) if on]
        if not positions:
            raise ValueError("down/middle/up: switch on at least one position to record")
        patched, live = recorder.attach_recorder(
            model, positions=positions, levels=levels, steps=steps, branch=branch, keep_runs=keep_runs
        )
        return io.NodeOutput(patched, live)
