"""Per-head self-attention capture while ComfyUI samples: layer discovery, attn1 replace patches, run wrapper.

What is recorded: for every UNet self-attention layer (attn1 of a BasicTransformerBlock inside
input/middle/output blocks) the per-head outputs softmax(QK^T / sqrt(d)) V, BEFORE ``to_out`` mixes the
heads, as [B, heads, h, w, d] on the layer's token grid, float16 on the CPU.

How:
- ``patches_replace["attn1"][(block, number, depth)]`` gets a plain closure that computes the
  attention exactly as the model would (ComfyUI's ``optimized_attention`` with the layer's
  ``attn_precision``), or calls the attn1 replace patch that was already there (SAG, PAG, another pack)
  and records what that patch returns: the recording always holds the tensor the model goes on with.
- The closures capture only an integer id. The data lives in a module-level registry of stores, so
  any later ``ModelPatcher.clone()`` (LoRA, FreeU, ...), which deep-copies ``model_options``, still
  writes into the same store.
- An OUTER_SAMPLE wrapper marks the start and end of each sampling run: a run starts a fresh recording,
  and a finished run becomes what ``LiveRecording.snapshot()`` returns. The last HISTORY runs are kept
  with their output latents, so that ``snapshot(latent)`` gives the run that produced a LATENT.
- Steps are told apart by the call's sigma against the run's sigma schedule: step i covers the sigmas in
  (sigmas[i+1], sigmas[i]]. Only what the steps option needs is kept ("last": one fp16 copy per layer;
  "mean" or a range: one float32 running sum per layer).
"""

from __future__ import annotations

import collections
import itertools
import logging
import weakref
from dataclasses import dataclass

import torch

import comfy.ldm.modules.attention as comfy_attention
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample
from comfy.patcher_extension import WrappersMP

from .core.recording import BLOCK_POSITIONS, LayerKey, Recording, parse_levels

log = logging.getLogger("HeadSeg")

WRAPPER_KEY = "headseg_record_self_attention"
BRANCHES = {"cond": 0, "uncond": 1}
POSITIONS = ("down", "middle", "up")
VAE_FACTOR = 8  # pixels per latent cell for the SD-family UNets this records
RECORD_DTYPE = torch.float16
# Sampling runs kept per record node, so that a LATENT finds its own run when other samplers used
# the recorded MODEL after it (a hires fix, an inpainting pass).
HISTORY = 3
# Why a run recorded nothing when the recorded layers never ran (the MODEL used was not the patched one).
_NEVER_CALLED = "the self-attention layers were never called during the last sampling run"

# store id -> _Store. Weak: a store lives as long as its LiveRecording (the node output) lives;
# a patched model whose recording was dropped samples normally and records nothing.
_REGISTRY: "weakref.WeakValueDictionary[int, _Store]" = weakref.WeakValueDictionary()
_IDS = itertools.count(1)


@dataclass(frozen=True)
class LayerInfo:
    """One self-attention layer found in the UNet: key, head count, head width, grid level (0 = latent grid)."""

    key: LayerKey
    heads: int
    dim_head: int
    level: int


def _resampling(module) -> int:
    """+1 per downsampling, -1 per upsampling among a UNet block's direct children."""
    steps = 0
    for child in module.children():
        if getattr(child, "updown", False):  # ResBlock that resamples (resblock_updown UNets)
            child = getattr(child, "h_upd", None)
        if isinstance(child, Downsample):
            steps += 1
        elif isinstance(child, Upsample):
            steps -= 1
    return steps


def find_self_attention_layers(diffusion_model) -> list[LayerInfo]:
    """UNet module -> every self-attention layer (attn1 of a BasicTransformerBlock), in UNet order.

    Walks ``input_blocks``, ``middle_block`` and ``output_blocks``; the depth is the block's index inside
    its SpatialTransformer, as in ComfyUI's (block, number, transformer_index) patch keys.
    ValueError for a model without UNet self-attention (a DiT such as Flux or SD3, or a UNet with no
    transformer blocks).
    """
    name = type(diffusion_model).__name__
    if not (hasattr(diffusion_model, "input_blocks") and hasattr(diffusion_model, "output_blocks")):
        raise ValueError(
            f"model: HeadSeg records the self-attention of a UNet (SD1.x, SD2.x, SDXL); this model's "
            f"diffusion model is {name}, which has no input_blocks/output_blocks (a DiT such as Flux or SD3?)"
        )
    groups = [("input", list(enumerate(diffusion_model.input_blocks)))]
    middle = getattr(diffusion_model, "middle_block", None)
    groups.append(("middle", [(0, middle)] if middle is not None else []))
    groups.append(("output", list(enumerate(diffusion_model.output_blocks))))

    found = []
    level = 0
    for block, numbered in groups:
        for number, module in numbered:
            change = _resampling(module)
            if change > 0:  # a down block runs its transformers after its own downsampling
                level += change
            for sub in module.children():
                if not isinstance(sub, comfy_attention.SpatialTransformer):
                    continue
                for depth, tb in enumerate(sub.transformer_blocks):
                    if not isinstance(tb, comfy_attention.BasicTransformerBlock) or tb.disable_self_attn:
                        continue
                    found.append(LayerInfo(LayerKey(block, number, depth), int(tb.n_heads), int(tb.d_head), level))
            if change < 0:  # an up block upsamples after its transformers
                level += change
    if not found:
        raise ValueError(
            f"model: no UNet self-attention layer found in {name} (no BasicTransformerBlock with "
            f"self-attention inside input/middle/output blocks); HeadSeg needs an SD1.x/SD2.x/SDXL-style UNet"
        )
    return sorted(found, key=lambda layer: layer.key.sort_key)


@dataclass(frozen=True)
class StepSelection:
    """Which sampling steps are recorded: mode "last", "mean", or "range" over [first, last] (0-based)."""

    mode: str
    first: int = 0
    last: int = 0

    @property
    def label(self) -> str:
        if self.mode != "range":
            return self.mode
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


def parse_steps(text: str) -> StepSelection:
    """'last' | 'mean' | 'N' | 'A-B' (0-based step indices, inclusive) -> StepSelection."""
    if not isinstance(text, str):
        raise TypeError(f"steps: expected a string such as 'last', 'mean' or '3-7', got {type(text).__name__}")
    t = text.strip().lower().replace(" ", "")
    if t in ("last", "mean"):
        return StepSelection(t)
    parts = t.split("-")
    if 1 <= len(parts) <= 2 and all(p.isdecimal() for p in parts):
        first, last = int(parts[0]), int(parts[-1])
        if first <= last:
            return StepSelection("range", first, last)
    raise ValueError(
        f"steps: expected 'last', 'mean', a step 'N' or a range 'A-B' with A <= B (0-based, inclusive), got {text!r}"
    )


def _grids(latent_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """(H, W) latent -> [(H, W), (ceil(H/2), ceil(W/2)), ...] down to (1, 1): the grid of each level."""
    h, w = latent_hw
    grids = [(h, w)]
    while (h, w) != (1, 1):
        h, w = -(-h // 2), -(-w // 2)
        grids.append((h, w))
    return grids


def model_label(model) -> str:
    """ModelPatcher -> short model family name for the recording metadata: "SD2" (SD2.0 and 2.1), "SD15",
    "SDXL", ..."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    names = {"SD15": "SD15", "SD20": "SD2", "SDXL": "SDXL", "SDXLRefiner": "SDXLRefiner", "SSD1B": "SSD1B"}
    for cls in type(config).__mro__ if config is not None else ():
        if cls.__name__ in names:
            return names[cls.__name__]
    return type(config).__name__ if config is not None else "unknown"


def _cpu_latent(x) -> torch.Tensor | None:
    """A sampler's latent as a float32 CPU tensor (a copy), or None when it is not a plain tensor."""
    if not isinstance(x, torch.Tensor) or x.is_nested:
        return None
    return x.detach().to(device="cpu", dtype=torch.float32, copy=True)


class _Store:
    """What one record node's patched model writes during sampling. Lives in _REGISTRY, never in model_options."""

    def __init__(self, layers, levels, steps: StepSelection, branch: str, model: str):
        self.layers = {layer.key: layer for layer in layers}
        self.levels = levels
        self.steps = steps
        self.branch = branch
        self.branch_index = BRANCHES[branch]
        self.model = model
        self.runs = 0
        self.failure = ""  # why the current or most recent run recorded nothing
        # the last HISTORY runs, oldest first: (output latent on the CPU or None, Recording or None, failure)
        self.history: collections.deque = collections.deque(maxlen=HISTORY)
        self._reset_run(None, None)

    # -- run boundaries (OUTER_SAMPLE wrapper) -------------------------------------------------
    def _reset_run(self, latent_shape, sigmas):
        self.active = latent_shape is not None
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else None
        self.sigmas = sigmas  # python floats, len = steps + 1
        self.acc: dict[LayerKey, torch.Tensor] = {}
        self.count: dict[LayerKey, int] = {}
        self.seen_branch = 0  # calls that held the recorded branch
        self.seen_calls = 0
        self._failed = False  # recording failed part-way through this run
        self.called: set[LayerKey] = set()  # layers whose patch ran this run
        self.max_step = -1
        self._sig_obj = None
        self._sig_step = 0
        self._warned: set = set()

    def begin_run(self, noise: torch.Tensor, sigmas: torch.Tensor):
        sig = [float(s) for s in sigmas.detach().flatten().cpu()]
        self.failure = ""
        self._reset_run(noise.shape, sig)

    def end_run(self, output=None):
        """Closes the run; ``output`` is the sampler's output latent, kept to match a LATENT to this run."""
        if not self.active:
            if self._failed:  # the run stopped recording part-way: keep why, for its LATENT
                self.history.append((_cpu_latent(output), None, self.failure))
                self._failed = False
            return
        layers = {}
        for key in sorted(self.acc, key=lambda k: k.sort_key):
            acc = self.acc[key]
            if self.steps.mode != "last":
                acc = (acc / self.count[key]).to(device="cpu", dtype=RECORD_DTYPE)  # mean over calls
            layers[key] = acc
        never = [key.name for key in self.layers if key not in self.called]
        if never and self.seen_calls:
            log.warning(
                "HeadSeg: layers %s were not run through HeadSeg's patch in this sampling run (another node "
                "replaced their attn1 patch after HeadSeg_RecordSelfAttention?): they are not recorded",
                ", ".join(never),
            )
        B, C, H, W = self.latent_shape[:4]
        self.runs += 1
        rec = None
        if layers:
            rec = Recording(
                layers=layers,
                image_size=(H * VAE_FACTOR, W * VAE_FACTOR),
                model=self.model,
                steps=self.steps.label,
                branch=self.branch,
            )
        self.failure = "" if layers else self._why_empty()
        self.history.append((_cpu_latent(output), rec, self.failure))
        self._reset_run(None, None)

    def latest(self):
        """(Recording or None, failure) of the most recent finished run; (None, failure) before any."""
        return self.history[-1][1:] if self.history else (None, self.failure)

    def run_of(self, samples: torch.Tensor):
        """The newest kept run whose output latent equals ``samples`` -> (Recording or None, failure),
        or None when no kept run produced it."""
        samples = _cpu_latent(samples)
        if samples is None:
            return None
        for output, rec, failure in reversed(self.history):
            if output is not None and output.shape == samples.shape and torch.equal(output, samples):
                return rec, failure
        return None

    def abort_run(self):
        self._reset_run(None, None)

    def fail(self, exc: BaseException):
        """A bug or an unforeseen layout while recording: log it, stop recording this run, never break sampling."""
        log.error("HeadSeg: recording stopped for this run: %s: %s", type(exc).__name__, exc)
        self.failure = f"recording failed: {type(exc).__name__}: {exc}"
        failed_in_run = self.active
        self._reset_run(None, None)
        self._failed = failed_in_run

    def _why_empty(self) -> str:
        n_steps = max(len(self.sigmas or []) - 1, 0)
        if self.failure:
            return self.failure
        if self.seen_calls == 0:
            return _NEVER_CALLED
        if self.seen_branch == 0:
            hint = (
                " (with cfg = 1 ComfyUI skips the uncond pass: choose branch 'cond', or a cfg above 1)"
                if self.branch == "uncond"
                else ""
            )
            return f"branch: no model call held the '{self.branch}' branch{hint}"
        if self.steps.mode == "range" and self.steps.first > self.max_step:
            return (
                f"steps: range {self.steps.label} selected but the sampler ran {n_steps} steps "
                f"(0-{max(n_steps - 1, 0)}): choose steps within them, or 'last'"
            )
        return (
            "no layer could be recorded (levels selection matched no grid, or another patch changed the "
            "token count of every layer; see the log)"
        )

    # -- per call -------------------------------------------------------------------------------
    def _step_of(self, extra_options) -> int:
        """The step a model call belongs to: i such that sigmas[i+1] < sigma <= sigmas[i]."""
        sig = extra_options.get("sigmas")
        if sig is None:
            return 0
        if sig is self._sig_obj:
            return self._sig_step
        schedule = self.sigmas
        s = float(sig.max()) if torch.is_tensor(sig) else float(sig)
        step = max(len(schedule) - 2, 0)
        for i in range(len(schedule) - 1):
            nxt = schedule[i + 1]
            if s > nxt + 1e-5 * max(abs(nxt), 1e-3):
                step = i
                break
        self._sig_obj, self._sig_step = sig, step
        return step

    def _wants(self, step: int) -> bool:
        if self.steps.mode == "last":
            return step == max(len(self.sigmas) - 2, 0)
        if self.steps.mode == "mean":
            return True
        return self.steps.first <= step <= self.steps.last

    def _warn_once(self, key: LayerKey, what: str, message: str):
        if (key, what) not in self._warned:
            self._warned.add((key, what))
            log.warning("HeadSeg: not recording %s: %s", key.name, message)

    def observe(self, key: LayerKey, out: torch.Tensor, extra_options: dict):
        """Record one attn1 output [B_all, N, heads*d] (the tensor that goes on to to_out)."""
        if not self.active:
            return
        self.seen_calls += 1
        self.called.add(key)
        cond_or_uncond = list(extra_options.get("cond_or_uncond") or [0])
        if self.branch_index not in cond_or_uncond:
            return
        self.seen_branch += 1
        step = self._step_of(extra_options)
        self.max_step = max(self.max_step, step)
        if not self._wants(step):
            return

        B, _, H, W = self.latent_shape[:4]
        shape = extra_options.get("activations_shape")
        original = extra_options.get("original_shape")
        if shape is None or len(shape) != 4:
            self._warn_once(key, "grid", "no activations_shape in the patch options")
            return
        h, w = int(shape[-2]), int(shape[-1])
        if original is not None and tuple(original[-2:]) != (H, W):
            self._warn_once(key, "area", f"the model was called on a {tuple(original[-2:])} crop of the {H}x{W} latent")
            return
        grids = _grids((H, W))
        level = grids.index((h, w)) if (h, w) in grids else None
        if level is None:
            self._warn_once(key, "level", f"token grid {h}x{w} fits no level of the {H}x{W} latent")
            return
        if self.levels is not None and level not in self.levels:
            return
        B_all, N, inner = out.shape
        heads = int(extra_options.get("n_heads", self.layers[key].heads))
        if N != h * w:
            self._warn_once(
                key, "tokens",
                f"{N} tokens but a {h}x{w} grid (another patch such as HyperTile or ToMe changed the token count)",
            )
            return
        if inner % heads:
            self._warn_once(key, "heads", f"width {inner} is not a multiple of {heads} heads")
            return
        chunks = len(cond_or_uncond)
        b = B_all // chunks
        if b != B or b * chunks != B_all:
            self._warn_once(key, "batch", f"batch {B_all} does not split into {chunks} chunks of the latent batch {B}")
            return
        i = cond_or_uncond.index(self.branch_index)
        D = inner // heads
        x = out[i * b : (i + 1) * b]  # [b, N, heads*D]
        x = x.reshape(b, h, w, heads, D).permute(0, 3, 1, 2, 4)  # [b, heads, h, w, D]

        if self.steps.mode == "last":
            kept = torch.empty((b, heads, h, w, D), dtype=RECORD_DTYPE, device="cpu")
            kept.copy_(x)  # one copy: cast + move + contiguous
            self.acc[key] = kept
            self.count[key] = 1
        elif key in self.acc:
            self.acc[key] += x  # float32 running sum on the sampling device
            self.count[key] += 1
        else:
            self.acc[key] = x.to(torch.float32).contiguous()
            self.count[key] = 1


class LiveRecording:
    """Handle returned by HeadSeg_RecordSelfAttention; filled while the patched model samples.

    ``snapshot(latent)`` gives the Recording of the run that produced ``latent``; ``snapshot()`` the
    most recent finished run.
    """

    def __init__(self, store: _Store, store_id: int, layers: list[LayerInfo]):
        self._store = store  # the strong reference that keeps the registry entry alive
        self.store_id = store_id
        self.layers = list(layers)

    @property
    def runs(self) -> int:
        """Number of sampling runs finished since the record node ran."""
        return self._store.runs

    def snapshot(self, latent: torch.Tensor | None = None) -> Recording:
        """-> Recording of the sampling run whose output latent is ``latent`` [B, C, h, w] (the sampler's
        LATENT samples), or of the most recent finished run when ``latent`` is None.

        New object, tensors shared, never mutated. ValueError naming `latent` when none of the last
        HISTORY runs of the recorded MODEL produced ``latent``.
        """
        store = self._store
        if latent is None:
            found = store.latest()
        elif not any(out is not None for out, _, _ in store.history):
            found = (None, store.failure)  # nothing recorded yet: the message below says so, and why
        else:
            found = store.run_of(latent)
        if found is None:
            raise ValueError(self._no_run_message(latent))
        rec, failure = found
        if rec is None:
            if failure and failure != _NEVER_CALLED:  # the run happened: its own reason comes first
                raise ValueError(f"recording: the sampling run recorded nothing: {failure}")
            why = f" ({failure})" if failure else ""
            raise ValueError(
                "recording: nothing recorded yet: connect the sampler's LATENT output to the node that reads "
                "the recording so it runs after sampling, and sample with the MODEL from "
                f"HeadSeg_RecordSelfAttention{why}"
            )
        out = Recording(
            layers=dict(rec.layers),
            image_size=rec.image_size,
            model=rec.model,
            steps=rec.steps,
            branch=rec.branch,
        )
        return out.validate(check_finite=False)  # NaN / inf: named per layer by Head PCA and Save Recording

    def _no_run_message(self, latent) -> str:
        def dims(t):
            return "x".join(str(n) for n in t.shape)

        shape = dims(latent) if isinstance(latent, torch.Tensor) else type(latent).__name__
        runs = [out for out, _, _ in self._store.history if out is not None]
        kept = ", ".join(dims(out) for out in runs)
        return (
            f"latent: this LATENT ({shape}) is not the output of any of the last {len(runs)} sampling run(s) of "
            f"the recorded MODEL (their outputs: {kept}). Connect the LATENT output of the sampler that sampled "
            "with the MODEL from Record Self-Attention directly, with no node in between."
        )

    def __repr__(self):
        return f"LiveRecording(id={self.store_id}, layers={len(self.layers)}, runs={self.runs})"


def _make_attn1_patch(store_id: int, key: LayerKey, previous):
    """Plain closure (survives deepcopy of model_options): attention as the model computes it, then record."""

    def headseg_attn1(q, k, v, extra_options):
        if previous is not None:
            out = previous(q, k, v, extra_options)
        else:
            out = comfy_attention.optimized_attention(
                q, k, v, extra_options["n_heads"],
                attn_precision=extra_options.get("attn_precision"),
                transformer_options=extra_options,
            )
        store = _REGISTRY.get(store_id)
        if store is not None:
            try:
                store.observe(key, out, extra_options)
            except Exception as exc:  # recording must never break sampling
                store.fail(exc)
        return out

    return headseg_attn1


def _make_outer_sample_wrapper(store_id: int):
    """OUTER_SAMPLE wrapper: (executor, noise, latent_image, sampler, sigmas, ...) marks one sampling run."""

    def headseg_outer_sample(executor, *args, **kwargs):
        store = _REGISTRY.get(store_id)
        if store is None:
            return executor(*args, **kwargs)
        noise = args[0] if len(args) > 0 else kwargs["noise"]
        sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
        store.begin_run(noise, sigmas)
        try:
            output = executor(*args, **kwargs)
        except BaseException:
            store.abort_run()
            raise
        try:
            store.end_run(output)
        except Exception as exc:  # recording must never break sampling
            store.fail(exc)
            try:
                store.end_run(output)  # keeps the failure with this run's latent
            except Exception:
                pass
        return output

    return headseg_outer_sample


def attach_recorder(model, positions=POSITIONS, levels: str | None = "all", steps: str = "last", branch: str = "cond"):
    """ModelPatcher -> (patched clone, LiveRecording). The input model is never modified.

    positions: any of "down", "middle", "up"; levels: "all" or "0,1,.." (0 = latent grid);
    steps: "last" | "mean" | "N" | "A-B" (0-based); branch: "cond" | "uncond".
    """
    positions = tuple(positions)
    bad = [p for p in positions if p not in POSITIONS]
    if bad or not positions:
        raise ValueError(f"positions: expected one or more of {list(POSITIONS)}, got {list(positions)}")
    chosen_levels = parse_levels(levels if levels is not None else "all")
    level_set = None if chosen_levels is None else frozenset(chosen_levels)
    step_sel = parse_steps(steps)
    if branch not in BRANCHES:
        raise ValueError(f"branch: expected 'cond' or 'uncond', got {branch!r}")
    if not hasattr(model, "clone") or not hasattr(model, "get_model_object"):
        raise TypeError(f"model: expected a ComfyUI MODEL (ModelPatcher), got {type(model).__name__}")

    layers = find_self_attention_layers(model.get_model_object("diffusion_model"))
    chosen = [layer for layer in layers if BLOCK_POSITIONS[layer.key.block] in positions]
    if not chosen:
        have = sorted({BLOCK_POSITIONS[layer.key.block] for layer in layers})
        raise ValueError(f"positions: this model has self-attention only in {have}, none in {list(positions)}")

    if level_set is not None:
        have = sorted({layer.level for layer in chosen})
        if not level_set & set(have):
            raise ValueError(
                f"levels: the chosen positions of this model have self-attention at grid levels {have} "
                f"(0 = latent grid), none at {sorted(level_set)}"
            )
    store = _Store(chosen, level_set, step_sel, branch, model_label(model))
    store_id = next(_IDS)
    _REGISTRY[store_id] = store

    patched = model.clone()
    existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    for layer in chosen:
        k = layer.key
        previous = existing.get((k.block, k.number, k.depth))
        if previous is None:
            # ComfyUI falls back to a (block, number) key for every depth when no 3-tuple key is set
            previous = existing.get((k.block, k.number))
        patched.set_model_attn1_replace(_make_attn1_patch(store_id, k, previous), k.block, k.number, k.depth)
    patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _make_outer_sample_wrapper(store_id))
    return patched, LiveRecording(store, store_id, chosen)
