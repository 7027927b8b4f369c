"""What one record node keeps while ComfyUI samples: the per-run store of head outputs (written by the
attn1 patches of ``recorder.py``) and its history of finished runs, which the LiveRecording the node
returns (``live_recording.py``) reads. The store (_Store) is made of its parts: the history of runs
(``run_history.py``), the steps of the run's schedule its model calls fall in (``step_tracker.py``), and
why a run recorded nothing (``empty_run_reasons.py``); the step selection is ``step_selection.py``'s.

A run (one OUTER_SAMPLE call) is made of model evaluations (the guider's predict_noise calls); an
evaluation's main pass is made of its calc_cond_batch calls that run a conditioning index for the
first time in that evaluation, and only main passes are recorded: the extra passes that guidance
nodes (SAG, PAG) run after CFG repeat an index on a changed input or model. Several conditioning
entries of the recorded branch are mixed as ComfyUI mixes their predictions (``entry_weights.py``:
strength, mask, timestep range, default entries), however ComfyUI batched them.
"""

from __future__ import annotations

import logging
import math

import torch

from .core.numerics import FP16_OVERFLOW
from .core.recording import LayerKey, Recording, grid_levels
from .empty_run_reasons import why_empty
from .run_history import HISTORY, RunHistory, _current_prompt
from .step_selection import StepSelection, steps_label
from .step_tracker import StepTracker

log = logging.getLogger("HeadSeg")

BRANCHES = {"cond": 0, "uncond": 1}
VAE_FACTOR = 8  # pixels per latent cell for the SD-family UNets this records
RECORD_DTYPE = torch.float16


def _own_level(layer, grids: list) -> int:
    """The grid level a layer runs at on a latent of these grids (grid_levels): its own, or the 1x1
    grid's where the latent runs out of halvings (the UNet keeps downsampling 1x1 to 1x1)."""
    return min(layer.level, len(grids) - 1)


def _kept_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a head output ``x`` (or a mean of several) is kept in: RECORD_DTYPE (float16), or float32 where
    x is not float16 and holds finite values that float16 would make inf (65520 and beyond, past float16's range
    of 65504, as float32 rounds them: a bfloat16, float32 or float64 UNet's own values). The model's own NaN / inf
    stay float16, as recorded. Reads x's extremes only for an x that is not float16 already (on a GPU a wait, before
    the copy to the CPU waits anyway)."""
    if x.dtype == RECORD_DTYPE or x.numel() == 0:
        return RECORD_DTYPE
    # read as float32 holds them: torch casts a float64 UNet's values (--fp64-unet) to float16 through float32,
    # so 65519.999 is inf in float16
    lo, hi = (float(v.to(torch.float32)) for v in torch.aminmax(x))
    if math.isfinite(lo) and math.isfinite(hi) and max(-lo, hi) >= FP16_OVERFLOW:
        return torch.float32
    return RECORD_DTYPE


class _Store(RunHistory, StepTracker):
    """What one record node's patched model writes during sampling. Lives in _REGISTRY, never in model_options."""

    def __init__(self, layers, levels, steps: StepSelection, branch: str, model: str, keep_runs: int = HISTORY):
        self.layers = {layer.key: layer for layer in layers}
        self.levels = levels
        self.steps = steps
        self.branch = branch
        self.branch_index = BRANCHES[branch]
        self.model = model
        self.runs = 0
        self.failure = ""  # why the current or most recent run recorded nothing
        self._start_history(keep_runs)
        self.patches_running: set[LayerKey] = set()  # layers whose HeadSeg attn1 patch is running (recorder.py)
        self._reset_run(None, None)

    # -- run boundaries (OUTER_SAMPLE wrapper) -------------------------------------------------
    def _reset_run(self, latent_shape, sigmas):
        self.active = latent_shape is not None
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else None
        # the token grid of each level of this run's latent, ending at 1x1 (looked up at every model call)
        self.grids = grid_levels(self.latent_shape[2:4]) if self.active else []
        self._reset_steps(sigmas)
        self.prompt = _current_prompt() if self.active else None  # the ComfyUI prompt this run is part of
        self.acc: dict[LayerKey, torch.Tensor] = {}
        self.count: dict[LayerKey, float | torch.Tensor] = {}  # what acc holds: entries, or shares per token
        self.seen_branch = 0  # calls that held the recorded branch
        self.seen_calls = 0
        self._failed = False  # recording failed part-way through this run
        self.called: set[LayerKey] = set()  # layers whose patch ran this run
        # layers left to their attn1 module this run, which runs another node's code (recorder.py)
        self.left_to_module: set[LayerKey] = set()
        # layers whose patch a (block, number) attn1 patch of another node took over in a main pass (recorder.py)
        self.shadowed: set[LayerKey] = set()
        self._warned: set = set()
        self.acc_eval: dict[LayerKey, tuple] = {}  # the model evaluation acc[key] last added (its tag)
        # inside a calc_cond_batch call: EntryShares of the recorded branch, None, or a function that
        # makes them (called at the first recorded layer: steps that are not kept never pay for them)
        self.shares = None
        self.shares_tag = None  # the evaluation those shares belong to
        self.batches = 0  # calc_cond_batch calls so far in this run
        self.eval_id = 0  # model evaluations (guider predict_noise calls) so far in this run
        self.seen_conds: set[int] = set()  # conditioning indices already run in the current evaluation
        self.batch_main = None  # inside a calc_cond_batch call: whether it is part of the main pass
        self.wanted_calls = 0  # recorded-branch calls in a chosen step
        self.crop_calls = 0  # of these, calls on an area crop of the latent (not recorded)
        self.regrid_calls = 0  # of these, calls of a layer on another level than its own (Deep Shrink)
        self.foreign_calls = 0  # of these, calls whose keys and values another patch changed (reference-only)
        self.wanted_steps: set[int] = set()  # the chosen steps the branch was called at

    def begin_run(self, noise: torch.Tensor, sigmas: torch.Tensor, reports_steps: bool = False):
        """A sampling run starts. reports_steps: the sampler reports each step of ``sigmas`` as it
        finishes it, after that step's model evaluations (step_done), as k-diffusion's samplers do."""
        sig = [float(s) for s in sigmas.detach().flatten().cpu()]
        self.failure = ""
        self._reset_run(noise.shape, sig)
        # the reports place a call only on a schedule that never rises (FlipSigmas' ascending one, a
        # hand-made one that rises again: a call there may belong to 'last' out of order)
        self.reports_steps = reports_steps and all(a >= b for a, b in zip(sig, sig[1:]))

    def begin_eval(self):
        """A guider's predict_noise call starts: one model evaluation (PREDICT_NOISE wrapper)."""
        self.eval_id += 1
        self.evals_since_report += 1
        self.seen_conds = set()

    def begin_batch(self, conds, shares_of=None) -> bool:
        """A calc_cond_batch call over ``conds`` (a list, None where a branch is skipped) starts ->
        whether it belongs to the evaluation's main pass: it runs a conditioning index that this
        evaluation has not run yet. CFG runs [cond, uncond] once (or as [cond, None] then [None,
        uncond]); the extra passes of guidance nodes after CFG (SAG's blurred uncond, PAG's
        perturbed cond) run an index again, on a changed input or model: not recorded. Without a
        guider evaluation around it (a custom sampling path) every call counts. In a main call,
        ``shares_of(entries of the recorded branch)`` makes ``shares`` (entry_weights.EntryShares), on
        first use."""
        indices = {i for i, c in enumerate(conds) if c is not None} if isinstance(conds, (list, tuple)) else {0}
        main = self.eval_id == 0 or not indices <= self.seen_conds
        self.seen_conds |= indices
        self.batches += 1
        self.shares, self.shares_tag = None, ("shares", self.eval_id or -self.batches)
        branch = conds[self.branch_index] if isinstance(conds, (list, tuple)) and len(conds) > self.branch_index else None
        if main and branch is not None and shares_of is not None:
            self.shares = lambda: shares_of(branch)
        return main

    def _current_shares(self):
        """The recorded branch's EntryShares in this call (made on first use), or None."""
        if callable(self.shares):
            make, self.shares = self.shares, None
            try:
                self.shares = make()
            except Exception as exc:  # a conditioning this does not know: its entries then count alike
                if ("shares",) not in self._warned:
                    self._warned.add(("shares",))
                    log.warning("HeadSeg: the '%s' entries are averaged with equal weights (%s: %s)",
                                self.branch, type(exc).__name__, exc)
        return self.shares

    @property
    def in_main(self) -> bool:
        """Whether the model call being made belongs to an evaluation's main pass; outside any
        calc_cond_batch call, only before this evaluation's first one."""
        if self.batch_main is not None:
            return self.batch_main
        return self.eval_id == 0 or not self.seen_conds

    def end_run(self, output=None, denoised=None):
        """Closes the run; ``output`` is the sampler's output latent, and ``denoised`` its last denoised
        latent (SamplerCustom's denoised_output) or None, kept to match a LATENT to this run."""
        if not self.active:
            if self._failed:  # the run stopped recording part-way: keep why, for its LATENT
                self._remember(output, None, denoised)  # with its prompt, which _stop kept
                self._failed = False
                self.prompt = None
            return
        layers = {}
        for key in sorted(self.acc, key=lambda k: k.sort_key):
            acc, n = self.acc[key], self.count[key]  # n: a number, or per token [b, 1, h, w, 1]
            if isinstance(n, torch.Tensor):
                n = n.to(acc.device).clamp(min=1e-12)  # (defensive: every token's recorded shares add up to > 0)
            elif n == 1 and acc.dtype == RECORD_DTYPE and acc.device.type == "cpu":
                layers[key] = acc  # one entry of one step, kept as recorded
                continue
            mean = acc.to(torch.float32) / n
            layers[key] = mean.to(device="cpu", dtype=_kept_dtype(mean)).contiguous()
        wide = [key.name for key, t in layers.items() if t.dtype != RECORD_DTYPE]
        if wide:
            log.warning(
                "HeadSeg: layer(s) %s hold values beyond float16's range (65520 or more, which float16 makes inf) in this run, the UNet's own (it "
                "computes in bfloat16, float32 or float64): kept in float32, at twice the memory (Save Recording "
                "writes them in float32 too)", ", ".join(wide),
            )
        never = [key.name for key in self.layers
                 if key not in self.called and key not in self.left_to_module and key not in self.shadowed]
        if never and self.seen_calls:
            log.warning(
                "HeadSeg: layers %s were not run through HeadSeg's patch in this sampling run (another node's "
                "(block, number) attn1 patch took precedence, or removed HeadSeg's?): they are not recorded",
                ", ".join(never),
            )
        B, C, H, W = self.latent_shape[:4]
        self.runs += 1
        rec = None
        label = self.steps.label
        n_steps = self.n_steps
        if layers and self.steps.mode == "range":
            # the asked steps the run has: a range typed as '0-999999999' (up to the end) would otherwise be
            # a set of a billion steps here, which took the server's memory
            asked = range(self.steps.first, min(self.steps.last, n_steps - 1) + 1)
            if self.steps.last >= n_steps or self.wanted_steps != set(asked):  # fewer steps than asked: say which
                label = steps_label(self.wanted_steps)
                why = []
                if self.steps.last >= n_steps:
                    why.append(f"the sampling run had {n_steps} steps (0-{n_steps - 1})")
                skipped = [i for i in asked if i not in self.wanted_steps]
                why += self._why_skipped(skipped)
                log.warning("HeadSeg: steps %s: %s: recorded steps %s", self.steps.label, "; ".join(why), label)
        if layers:
            rec = Recording(
                layers=layers,
                image_size=(H * VAE_FACTOR, W * VAE_FACTOR),
                model=self.model,
                steps=label,
                branch=self.branch,
            )
        self.failure = "" if layers else why_empty(self)
        self._remember(output, rec, denoised)
        self._reset_run(None, None)

    def abort_run(self):
        self._reset_run(None, None)

    def fail(self, exc: BaseException):
        """A bug or an unforeseen layout while recording: log it, stop recording this run, never break sampling."""
        log.error("HeadSeg: recording stopped for this run: %s: %s", type(exc).__name__, exc)
        self._stop(f"recording failed: {type(exc).__name__}: {exc}")

    def refuse(self, reason: str):
        """A sampling setup whose calls cannot be recorded faithfully: say so once, record nothing this run."""
        if self.active:
            log.warning("HeadSeg: not recording this sampling run: %s", reason)
            self._stop(reason)

    def _stop(self, reason: str):
        self.failure = reason
        failed_in_run, prompt = self.active, self.prompt
        self._reset_run(None, None)
        self._failed = failed_in_run
        if failed_in_run:  # end_run keeps the failed run with the prompt it ran in
            self.prompt = prompt

    def _warn_once(self, key: LayerKey, what: str, message: str, some_calls: bool = False):
        """Logs ``message`` once per run for this layer and reason: as why the layer is not recorded, or with
        ``some_calls``, as a whole sentence about the calls left out (the layer's other calls are kept)."""
        if (key, what) not in self._warned:
            self._warned.add((key, what))
            if some_calls:
                log.warning("HeadSeg: %s", message)
            else:
                log.warning("HeadSeg: not recording %s: %s", key.name, message)

    def observe(self, key: LayerKey, out: torch.Tensor, extra_options: dict, kv_tokens: int | None = None):
        """Record one attn1 output [B_all, N, heads*d] (the tensor that goes on to to_out). kv_tokens: the
        token count of the call's keys and values (None: not known); self-attention over the layer's own
        tokens has N of them, or fewer where a patch downsampled them (ToDo's token downsampling: still the
        layer's own, recorded); a call with more (an attn1 patch such as reference-only or StyleAligned
        appended another image's tokens) is left out."""
        if not self.active:
            return
        self.seen_calls += 1
        self.called.add(key)
        if not self.in_main:  # an extra pass of a guidance node (SAG, PAG), after CFG
            return
        cond_or_uncond = list(extra_options.get("cond_or_uncond") or [0])
        if extra_options.get("context_window") is not None:
            self.refuse(
                "context windows (Context Windows node) run the model on windows of the latent batch; HeadSeg "
                "records model calls on the whole batch: sample without context windows"
            )
            return
        if max(cond_or_uncond) >= len(BRANCHES):
            self.refuse(
                "branch: this guider passes more than two conditionings per model call (DualCFGGuider, "
                "PerpNegGuider), so 'cond' and 'uncond' do not name its prompts; HeadSeg records ComfyUI's "
                "standard CFG guider"
            )
            return
        # 'mean' records every step, so it never asks which step a call belongs to: reading the call's
        # sigma waits for the GPU (a device sync at every model call), which costs several percent of
        # sampling there; 'last' and ranges need it (and their messages the steps seen)
        step = None if self.steps.mode == "mean" else self._step_of(extra_options)
        estimated = step is not None and self._sig_estimated
        if estimated:  # its step is read only if a message needs it (_settle_estimates)
            self._note_estimate("any", extra_options)
        elif step is not None:
            self.max_step_any = max(self.max_step_any, step)
            self.steps_run.add(step)
        if self.branch_index not in cond_or_uncond:
            return
        self.seen_branch += 1
        if estimated:
            self._note_estimate("branch", extra_options)
        elif step is not None:
            self.max_step = max(self.max_step, step)
        if step is not None:
            if not self._wants(step):  # (an estimated step is never the last one)
                return
            self.wanted_steps.add(step)
        self.wanted_calls += 1

        B, _, H, W = self.latent_shape[:4]
        shape = extra_options.get("activations_shape")
        original = extra_options.get("original_shape")
        if shape is None or len(shape) != 4:
            self._warn_once(key, "grid", "no activations_shape in the patch options")
            return
        h, w = int(shape[-2]), int(shape[-1])
        if original is not None and tuple(original[-2:]) != (H, W):
            self.crop_calls += 1
            if ("area",) not in self._warned:  # every layer sees the crop: said once per run, not per layer
                self._warned.add(("area",))
                h_crop, w_crop = (int(n) for n in original[-2:])
                log.warning(
                    "HeadSeg: not recording the model calls on a %dx%d crop of the %dx%d latent (a conditioning "
                    "entry limited to an area: ConditioningSetArea, or a mask with 'set_cond_area: mask bounds'); "
                    "the recording holds the entries on the whole image", h_crop, w_crop, H, W,
                )
            return
        grids = self.grids  # ends at 1x1, where the UNet's further downsamplings stay
        if key in self.layers:  # the layer's own grid, and the level it is selected by
            level = _own_level(self.layers[key], grids)
        elif (h, w) in grids:
            level = grids.index((h, w))
        else:
            self._warn_once(key, "level", f"token grid {h}x{w} fits no level of the {H}x{W} latent")
            return
        if self.levels is not None and level not in self.levels:
            return
        if (h, w) != grids[level]:  # Kohya Deep Shrink (PatchModelAddDownscale) resizes it at some steps
            self.regrid_calls += 1
            self._warn_once(
                key, "regrid",
                f"leaving out the steps at which {key.name}'s token grid is {h}x{w} instead of its own "
                f"{grids[level][0]}x{grids[level][1]} (a patch such as Kohya Deep Shrink resized it)",
                some_calls=True,
            )
            return
        B_all, N, inner = out.shape
        heads = int(extra_options.get("n_heads", self.layers[key].heads))
        if N != h * w:
            self._warn_once(
                key, "tokens",
                f"leaving out the calls of {key.name} whose token count another patch changed (such as HyperTile or "
                f"ToMe): {N} tokens but a {h}x{w} grid",
                some_calls=True,
            )
            return
        if kv_tokens is not None and kv_tokens > N:  # fewer: the layer's own, downsampled (ToDo)
            self.foreign_calls += 1
            self._warn_once(
                key, "keys",
                f"leaving out the calls of {key.name} whose keys and values another patch changed (such as "
                f"reference-only or StyleAligned, which add another image's tokens): {kv_tokens} key tokens for "
                f"{N} query tokens",
                some_calls=True,
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
        # Several entries of the branch (ConditioningCombine, ConditioningSetMask) share one call, or get
        # one call each when memory is short: each adds its head outputs times its share of ComfyUI's
        # prediction, and its share to count (per token), so that acc / count is the mix of the entries
        # that ran. Without shares (entries ComfyUI did not label) every entry counts the same.
        entries = [j for j, c in enumerate(cond_or_uncond) if c == self.branch_index]
        E, D = len(entries), inner // heads
        parts = out.reshape(chunks, b, N, inner)  # [chunks, b, N, heads*D]
        uuids, shares = extra_options.get("uuids"), self._current_shares()
        weighted = (
            shares is not None and isinstance(uuids, (list, tuple)) and len(uuids) == chunks
            and any(uuids[j] in shares for j in entries)
        )
        as_is = E == 1  # x is then a view of the model's own output (copied before it is kept)
        if weighted:
            tag = self.shares_tag
            # an entry without a share (ComfyUI ran a default entry its own rounding left room for) counts 0
            weights = [shares.share(uuids[j], (h, w), out.device) if uuids[j] in shares else 0.0 for j in entries]
            as_is = as_is and not isinstance(weights[0], torch.Tensor) and weights[0] == 1.0
            if as_is:
                x = parts[entries[0]]  # [b, N, heads*D]: the one entry
            else:
                x = sum(
                    parts[j].to(torch.float32) * (s.reshape(b, N, 1) if isinstance(s, torch.Tensor) else s)
                    for j, s in zip(entries, weights)
                )  # [b, N, heads*D]
            mass = sum(weights)  # float, or [b, h, w]: the shares of the entries in this call
            if isinstance(mass, torch.Tensor):
                mass = mass.reshape(b, 1, h, w, 1).to(torch.float32)  # broadcasts over heads and d
        else:
            tag, mass = ("eval", self.eval_id), E
            x = parts[entries[0]] if E == 1 else parts[entries].to(torch.float32).sum(0)  # [b, N, heads*D]
        x = x.reshape(b, h, w, heads, D).permute(0, 3, 1, 2, 4)  # [b, heads, h, w, D]

        if self.steps.mode == "last":
            mass = mass.to("cpu") if isinstance(mass, torch.Tensor) else mass
            if key in self.acc and self.acc_eval.get(key) == tag:  # more entries of this evaluation
                self.acc[key] = self.acc[key].to(torch.float32) + x.to(device="cpu", dtype=torch.float32)
                self.count[key] = self.count[key] + mass
                return
            if as_is:  # float32 only for values beyond float16's range (_kept_dtype)
                kept = torch.empty((b, heads, h, w, D), dtype=_kept_dtype(x), device="cpu")
            else:  # a sum or a mix of entries
                kept = torch.empty((b, heads, h, w, D), dtype=torch.float32, device="cpu")
            kept.copy_(x)  # one copy: cast + move + contiguous (never a view of the model's output)
            self.acc[key], self.count[key] = kept, mass
        elif key in self.acc:
            self.acc[key] += x  # float32 running sum on the sampling device
            self.count[key] = self.count[key] + mass
        else:
            self.acc[key] = torch.empty((b, heads, h, w, D), dtype=torch.float32, device=x.device).copy_(x)
            self.count[key] = mass
        self.acc_eval[key] = tag
