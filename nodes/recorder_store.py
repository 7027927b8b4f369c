"""What one record node keeps while ComfyUI samples: the per-run store of head outputs (written by the
attn1 patches of ``recorder.py``) and its history of finished runs, which the LiveRecording the node
returns (``live_recording.py``) reads; the step selection is ``step_selection.py``'s.

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
from typing import NamedTuple

import torch

from .core.numerics import FP16_OVERFLOW
from .core.recording import LayerKey, Recording, grid_levels
from .step_selection import StepSelection, steps_label

log = logging.getLogger("HeadSeg")

BRANCHES = {"cond": 0, "uncond": 1}
VAE_FACTOR = 8  # pixels per latent cell for the SD-family UNets this records
RECORD_DTYPE = torch.float16
# Sampling runs kept per record node by default (its keep_runs input), so that a LATENT finds its own
# run when other samplers used the recorded MODEL after it (a hires fix, an inpainting pass). Kept
# beyond them: the run read last
# (_Store.pinned: an inpainting pass re-run click after click must not push out the image it
# inpaints, which Head PCA reads again when one of its inputs changes), and the newest MAX_KEEP_RUNS
# runs of the prompt that sampled last (a list of latents is sampled item after item before Head PCA
# reads any).
HISTORY = 3
MAX_KEEP_RUNS = 64
# Why the model did not run at steps the sampler went through, where a conditioning entry was active.
_SKIPPED_BY_CACHE = (
    "a node that reuses earlier model outputs instead of running the model, such as EasyCache or LazyCache, "
    "skipped them"
)
# Why a sampler that does not report the schedule's steps made no model call in some of them (LazyCache
# skips whole evaluations, under such a sampler as under any other).
_OWN_SIGMAS = (
    "samplers such as dpm_fast and dpm_adaptive choose their own sigmas, and a node such as LazyCache skips "
    "whole model evaluations"
)
# Why a run recorded nothing when the recorded layers never ran (the MODEL used was not the patched one).
_NEVER_CALLED = "the self-attention layers were never called during the last sampling run"




def check_keep_runs(value) -> int:
    """The record node's keep_runs -> int; ValueError naming it unless an integer from 1 to MAX_KEEP_RUNS."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_KEEP_RUNS:
        raise ValueError(f"keep_runs: expected an integer from 1 to {MAX_KEEP_RUNS}, got {value!r}")
    return int(value)




class _Run(NamedTuple):
    """One finished sampling run as a record node keeps it."""

    latent: torch.Tensor | None  # the sampler's output on the CPU (float32), matched to a LATENT
    recording: Recording | None
    failure: str  # why it recorded nothing ("" when it did)
    prompt: str | None  # the ComfyUI prompt it ran in (None outside one)
    # the sampler's last denoised latent as SamplerCustom's denoised_output gives it (CPU, float32), matched
    # to a LATENT too; None when the sampler reported none
    denoised: torch.Tensor | None = None


def _current_prompt() -> str | None:
    """The id of the ComfyUI prompt being executed on this thread, or None (outside a prompt, or a
    ComfyUI without execution contexts)."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    context = get_executing_context()
    return None if context is None else getattr(context, "prompt_id", None)


def _own_level(layer, grids: list) -> int:
    """The grid level a layer runs at on a latent of these grids (grid_levels): its own, or the 1x1
    grid's where the latent runs out of halvings (the UNet keeps downsampling 1x1 to 1x1)."""
    return min(layer.level, len(grids) - 1)


def _sigma_value(sig) -> float:
    """A model call's sigma (a tensor of one sigma per image, or a number) as a float: for a tensor on
    a GPU this waits for the GPU to reach it."""
    return float(sig.max()) if torch.is_tensor(sig) else float(sig)


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


def _cpu_latent(x) -> torch.Tensor | None:
    """A sampler's latent as a float32 CPU tensor (a copy), or None when it is not a plain tensor."""
    if not isinstance(x, torch.Tensor) or x.is_nested:
        return None
    return x.detach().to(device="cpu", dtype=torch.float32, copy=True)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two float32 tensors of one shape hold the same bits (NaN matches NaN, unlike torch.equal:
    a sampler's output with NaN in it is still its own)."""
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


class _Store:
    """What one record node's patched model writes during sampling. Lives in _REGISTRY, never in model_options."""

    def __init__(self, layers, levels, steps: StepSelection, branch: str, model: str, keep_runs: int = HISTORY):
        self.layers = {layer.key: layer for layer in layers}
        self.levels = levels
        self.steps = steps
        self.branch = branch
        self.branch_index = BRANCHES[branch]
        self.model = model
        self.keep_runs = keep_runs  # the latest runs kept whatever else is kept (_remember)
        self.runs = 0
        self.dropped = 0  # runs pushed out of the history by newer ones
        self.failure = ""  # why the current or most recent run recorded nothing
        # the runs kept (_remember), oldest first
        self.history: list[_Run] = []
        self.pinned: _Run | None = None  # the run that run_of found last
        # the last prompt whose runs went past MAX_KEEP_RUNS (warned once): a prompt's runs come one after the
        # other, so one id does; a set of them grew with every such prompt of a long session
        self._capped_prompt: str | None = None
        self.patches_running: set[LayerKey] = set()  # layers whose HeadSeg attn1 patch is running (recorder.py)
        self._reset_run(None, None)

    # -- run boundaries (OUTER_SAMPLE wrapper) -------------------------------------------------
    def _reset_run(self, latent_shape, sigmas):
        self.active = latent_shape is not None
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else None
        # the token grid of each level of this run's latent, ending at 1x1 (looked up at every model call)
        self.grids = grid_levels(self.latent_shape[2:4]) if self.active else []
        self.sigmas = sigmas  # python floats, len = steps + 1
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
        self.max_step = -1  # latest step of a recorded-branch call
        self.max_step_any = -1  # latest step of any main-pass call (either branch)
        self.steps_run: set[int] = set()  # the steps of the main-pass calls whose step was read
        # step -> whether a conditioning entry was active in a main-pass calc_cond_batch call at that step
        # that ran no recorded layer (note_idle): False = none was (a timestep range), so the model had
        # nothing to run there; True = one was, yet the model did not run (a cache node skipped it)
        self.idle_steps: dict[int, bool] = {}
        self.min_sigma = float("inf")  # lowest sigma of a main-pass call
        self._sig_obj = None
        self._sig_step = 0
        self._sig_eval = None  # the model evaluation (eval_id) of the call whose step _sig_step is
        self._sig_estimated = False  # _sig_step is an estimate from the step reports (no sigma read)
        # (sigma, estimated step) of the evaluations whose step was estimated (any branch, and the recorded
        # branch's): read only when a message needs the steps seen (_settle_estimates), never while sampling
        self._estimated_sig = {"any": [], "branch": []}
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
        # the sampler's own step reports (step_done), when it is one whose reports count the schedule's
        # steps: they tell 'last' which calls are certainly earlier without reading their sigma
        self.reports_steps = False
        self.reported = -1  # the latest step the sampler reported done
        self.evals_since_report = 0  # model evaluations since that report (or since the run began)

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

    def step_done(self, step) -> None:
        """The sampler reports that it finished ``step`` (its progress callback)."""
        if self.active:
            self.reported = max(self.reported, int(step))
            self.evals_since_report = 0

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
                cached = self._skipped_by_cache(skipped)
                unseen = self._not_evaluated(i for i in skipped if i not in cached)
                inactive = [i for i in skipped if i not in cached and i not in unseen]
                if cached:
                    why.append(f"the model did not run at step(s) {steps_label(cached)} ({_SKIPPED_BY_CACHE})")
                if unseen:
                    why.append(f"the sampler evaluated the model at none of the sigmas of step(s) "
                               f"{steps_label(unseen)} ({_OWN_SIGMAS})")
                if inactive:
                    why.append(
                        f"the '{self.branch}' conditioning was not called at step(s) {steps_label(inactive)} "
                        "(a timestep range ends or starts it there)"
                    )
                log.warning("HeadSeg: steps %s: %s: recorded steps %s", self.steps.label, "; ".join(why), label)
        if layers:
            rec = Recording(
                layers=layers,
                image_size=(H * VAE_FACTOR, W * VAE_FACTOR),
                model=self.model,
                steps=label,
                branch=self.branch,
            )
        self.failure = "" if layers else self._why_empty()
        self._remember(output, rec, denoised)
        self._reset_run(None, None)

    def _remember(self, output, rec, denoised=None):
        """Keeps a finished run: the last keep_runs runs stay, the run read last (pinned) however old it
        is, and the runs of the prompt this one ran in, the newest MAX_KEEP_RUNS of them (a loop, a
        tiled upscaler or a prompt id an API client sends again must not hold runs without bound);
        the others go."""
        self.history.append(_Run(_cpu_latent(output), rec, self.failure, self.prompt, _cpu_latent(denoised)))
        first_recent = len(self.history) - self.keep_runs
        kept, capped, of_prompt = [], False, 0  # of_prompt: runs of this prompt seen, newest first
        for i in reversed(range(len(self.history))):
            run = self.history[i]
            same = self.prompt is not None and run.prompt == self.prompt
            of_prompt += same
            if i >= first_recent or run is self.pinned or (same and of_prompt <= MAX_KEEP_RUNS):
                kept.append(run)
            elif same:
                capped = True
        kept.reverse()  # oldest first again
        if capped and self.prompt != self._capped_prompt:
            self._capped_prompt = self.prompt
            log.warning(
                "HeadSeg: prompt %s sampled the recorded MODEL more than %d times (a loop, a tiled upscaler, "
                "or a prompt id sent again): only its newest %d runs are kept", self.prompt, MAX_KEEP_RUNS,
                MAX_KEEP_RUNS,
            )
        self.dropped += len(self.history) - len(kept)
        self.history = kept

    def latest(self):
        """(Recording or None, failure) of the most recent finished run; (None, failure) before any."""
        return (self.history[-1].recording, self.history[-1].failure) if self.history else (None, self.failure)

    def run_of(self, samples: torch.Tensor):
        """The newest kept run whose output latent (or last denoised latent: SamplerCustom's
        denoised_output) equals ``samples`` -> (Recording or None, failure), or None when no kept run
        produced it."""
        samples = _cpu_latent(samples)
        if samples is None:
            return None
        for run in reversed(self.history):
            for made in (run.latent, run.denoised):
                if made is not None and made.shape == samples.shape and _same_bits(made, samples):
                    self.pinned = run
                    return run.recording, run.failure
        return None

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

    @property
    def n_steps(self) -> int:
        """Steps of the current run's sigma schedule."""
        return max(len(self.sigmas or []) - 1, 0)

    def _settle_estimates(self):
        """Folds the calls whose step was only estimated into the steps and sigmas seen, reading their
        sigma now (for a message; the estimate is right about 'before the last step', but a corrector
        within step i, e.g. dpmpp_sde's, would count as step i + 1)."""
        for which, sigs in self._estimated_sig.items():
            for sig, estimate in sigs:
                step = self._read_step(sig, estimate)
                self.max_step_any = max(self.max_step_any, step)
                self.steps_run.add(step)
                if which == "branch":
                    self.max_step = max(self.max_step, step)
        self._estimated_sig = {"any": [], "branch": []}

    def note_idle(self, sigma, active: bool) -> None:
        """A main-pass calc_cond_batch call at ``sigma`` ran no recorded layer; ``active``: whether one of
        its conditioning entries was active there (ComfyUI's get_area_and_mult). Rare: read at once."""
        step = self._schedule_step(_sigma_value(sigma), self._order_floor())
        self._sig_obj, self._sig_step, self._sig_estimated, self._sig_eval = sigma, step, False, self.eval_id
        self.idle_steps[step] = self.idle_steps.get(step, False) or active

    def _not_run(self, steps) -> list[int]:
        """Of ``steps``, those the sampler went through with no main-pass model call in them: reported
        done (step_done) by a sampler whose reports count the schedule's steps, or, by any other sampler,
        asked for a prediction there that ran no recorded layer (note_idle). Only once the run's calls are
        placed (_settle_estimates; 'mean' places none)."""
        if self.steps.mode == "mean":
            return []
        if not self.reports_steps:  # (uni_pc, dpm_fast, a rising schedule): only the calls it made tell
            return [i for i in steps if i in self.idle_steps and i not in self.steps_run]
        return [i for i in steps if i <= self.reported and i not in self.steps_run]

    def _not_evaluated(self, steps) -> list[int]:
        """Of ``steps``, those in which a sampler that does not report the schedule's steps (dpm_fast,
        dpm_adaptive: they choose their own sigmas) asked for no prediction at all (nor did the guider run:
        LazyCache), main pass or not run."""
        if self.reports_steps or self.steps.mode == "mean":
            return []
        return [i for i in steps if i not in self.steps_run and i not in self.idle_steps]

    def _skipped_by_cache(self, steps) -> list[int]:
        """Of ``steps``, those where the model did not run though a conditioning entry was active, or
        the guider was not even asked (LazyCache skips whole evaluations): not a timestep range's doing."""
        return [i for i in self._not_run(steps) if self.idle_steps.get(i, True)]

    def _steps_it_ran(self) -> str:
        """The steps to choose instead of steps the recorded branch never reached (it ran up to step
        max_step): those up to max_step, or the steps the model ran where it skipped some before
        (LazyCache)."""
        if any(i not in self.steps_run for i in range(self.max_step)):
            return f"steps the model ran ({steps_label(self.steps_run)})"
        return f"steps up to {self.max_step}"

    def _why_empty(self) -> str:
        n_steps = self.n_steps
        if self.failure:
            return self.failure
        self._settle_estimates()
        if self.seen_calls == 0 and (self.left_to_module or self.shadowed):
            why = []
            if self.left_to_module:
                why.append(
                    "the self-attention modules of the recorded layers run another node's code (a forward hook, or a "
                    "forward swapped in by an object patch), which HeadSeg's patches would skip: they were left to it "
                    "and not recorded (see the log); sample without that node to record them"
                )
            if self.shadowed:
                names = ", ".join(key.name for key in sorted(self.shadowed, key=lambda key: key.sort_key))
                why.append(
                    f"{'the' if not why else 'the other'} recorded layers ({names}) were taken over by another node's "
                    "attn1 patch set after Record Self-Attention under their (block, number) key, which ComfyUI calls "
                    "in their place: they were left to it and not recorded (see the log); place that node before "
                    "Record Self-Attention, which then runs its patch and records what it returns"
                )
            return "; ".join(why)
        if self.seen_calls == 0:
            return _NEVER_CALLED
        if self.seen_branch == 0:
            hint = (
                " (with cfg = 1 ComfyUI skips the uncond pass: choose branch 'cond', or a cfg above 1)"
                if self.branch == "uncond"
                else ""
            )
            return f"branch: no model call held the '{self.branch}' branch{hint}"
        if self.wanted_calls and self.crop_calls == self.wanted_calls:
            return (
                f"branch: the '{self.branch}' conditioning covered only part of the image in every model call "
                "(ConditioningSetArea, or a mask with 'set_cond_area: mask bounds'); HeadSeg records calls on "
                "the whole latent: add a conditioning entry for the whole image"
            )
        last = max(n_steps - 1, 0)
        wanted = self.steps.first if self.steps.mode == "range" else last
        asked = range(wanted, min(self.steps.last, last) + 1) if self.steps.mode == "range" else [last]
        if self.steps.mode in ("range", "last") and asked and self._not_run(asked) == list(asked):
            ran = f" ({steps_label(self.steps_run)})" if self.steps_run else ""
            if self._skipped_by_cache(asked):
                return (
                    f"steps: the sampler went through step {asked[-1]} but the model did not run at step(s) "
                    f"{steps_label(self._skipped_by_cache(range(n_steps)))} ({_SKIPPED_BY_CACHE}): choose "
                    f"steps 'mean', steps the model ran{ran}, or an end_percent below 1 on that node"
                )
            return (
                f"steps: no conditioning entry was active at step(s) {steps_label(self._not_run(range(n_steps)))}, "
                "so the model did not run there (a timestep range, e.g. ConditioningSetTimestepRange, ends the "
                "conditioning early, and at cfg = 1 there is no uncond pass): choose steps the model "
                f"ran{ran}, 'mean', or widen its timestep range"
            )
        if self.steps.mode in ("range", "last") and wanted > self.max_step and wanted <= self.max_step_any:
            return (
                f"steps: the '{self.branch}' conditioning was not active at step {wanted}: its model calls stopped "
                f"at step {self.max_step} (a timestep range, e.g. ConditioningSetTimestepRange, ends it early): "
                f"choose steps up to {self.max_step}, 'mean', or widen its timestep range"
            )
        if (self.steps.mode == "range" and self.steps.first <= self.max_step and asked
                and self._not_evaluated(asked) == list(asked)):  # steps between those evaluated (LazyCache)
            ran = f" ({steps_label(self.steps_run)})" if self.steps_run else ""
            return (
                f"steps: range {self.steps.label} selected, but the sampler evaluated the model at none of the "
                f"sigmas of step(s) {steps_label(asked)} ({_OWN_SIGMAS}): choose steps the model ran{ran}, or 'mean'"
            )
        if self.steps.mode == "range" and self.steps.first > self.max_step:
            if self.steps.first <= last and self._not_evaluated(asked) == list(asked):  # within the run
                return (
                    f"steps: range {self.steps.label} selected, but the sampler evaluated the model only down "
                    f"to sigma {self.min_sigma:.4g} (in step {self.max_step_any} of its steps 0-{last}; "
                    f"{_OWN_SIGMAS}): choose {self._steps_it_ran()}, or 'mean'"
                )
            if self.max_step < last:  # past the run, and 'last' would record nothing either
                skipped = self._skipped_by_cache(range(n_steps))
                if last in skipped:  # the sampler went through the last step; a cache node ran no model there
                    return (
                        f"steps: range {self.steps.label} selected but the sampler ran {n_steps} steps (0-{last}), "
                        f"and the model did not run at step(s) {steps_label(skipped)} ({_SKIPPED_BY_CACHE}): choose "
                        f"{self._steps_it_ran()}, 'mean', or an end_percent below 1 on that node"
                    )
                if self.max_step_any < last:
                    why = (f" and evaluated the model only down to sigma {self.min_sigma:.4g} (in step "
                           f"{self.max_step_any}; {_OWN_SIGMAS})")
                    instead = "or 'mean'"
                else:
                    why = (f", and the '{self.branch}' conditioning was not active after step {self.max_step} (a "
                           "timestep range, e.g. ConditioningSetTimestepRange, ends it early)")
                    instead = "'mean', or widen its timestep range"
                return (
                    f"steps: range {self.steps.label} selected but the sampler ran {n_steps} steps (0-{last})"
                    f"{why}: choose {self._steps_it_ran()}, {instead}"
                )
            return (
                f"steps: range {self.steps.label} selected but the sampler ran {n_steps} steps "
                f"(0-{last}): choose steps within them, or 'last'"
            )
        if self.steps.mode == "last" and self.max_step < last:
            return (
                f"steps: 'last' is step {last} (sigma at most {self.sigmas[last]:.4g}), but the sampler evaluated "
                f"the model only down to sigma {self.min_sigma:.4g} (in step {self.max_step_any} of its steps "
                f"0-{last}; {_OWN_SIGMAS}): choose {self._steps_it_ran()}, or 'mean'"
            )
        if self.foreign_calls:  # (nothing was recorded: the calls left to record were all such calls)
            return (
                "another patch (such as reference-only or StyleAligned) added another image's tokens to the keys "
                "and values of the self-attention calls left to record (see the log): HeadSeg records "
                "self-attention over a layer's own tokens; sample without that patch, or choose steps where it is off"
            )
        if self.wanted_calls and self.regrid_calls:
            return (
                "steps: at every chosen step a patch such as Kohya Deep Shrink (PatchModelAddDownscale) resized "
                "the token grids: choose steps outside its range (its end_percent), e.g. 'last'"
            )
        return (
            "no layer could be recorded (levels selection matched no grid, or another patch changed the "
            "token count of every layer; see the log)"
        )

    # -- per call -------------------------------------------------------------------------------
    def _step_of(self, extra_options) -> int:
        """The step a model call belongs to (_schedule_step: sigmas[i+1] < sigma <= sigmas[i] on a falling
        schedule), estimated from the sampler's step reports where that tells 'last' enough."""
        sig = extra_options.get("sigmas")
        if sig is None:
            self._sig_estimated = False
            return 0
        if sig is self._sig_obj and self._sig_eval == self.eval_id:
            return self._sig_step
        if self._before_last_by_reports():  # an estimate: certainly before the last step (see observe)
            self._sig_obj, self._sig_step, self._sig_estimated = sig, self.reported + 1, True
            self._sig_eval = self.eval_id
            return self._sig_step
        step = self._read_step(sig, self._order_floor())
        self._sig_obj, self._sig_step, self._sig_estimated, self._sig_eval = sig, step, False, self.eval_id
        return step

    def _read_step(self, sig, floor: int) -> int:
        """The step of a call's sigma, read (a device sync on a GPU); ``floor``: see _schedule_step."""
        s = _sigma_value(sig)
        self.min_sigma = min(self.min_sigma, s)
        return self._schedule_step(s, floor)

    def _order_floor(self) -> int:
        """The earliest step the model call being placed can be in where its sigma fits several steps:
        the step of the call placed before it (samplers go through the schedule in order), or the one
        after that when that step is zero-length (a repeated sigma) and this call starts another model
        evaluation (a zero-length step of a first-order sampler is one evaluation)."""
        step = self._sig_step if self._sig_obj is not None else -1
        another_eval = self.eval_id != self._sig_eval or self.eval_id == 0  # (0: no guider, each call counts)
        if another_eval and 0 <= step < self.n_steps and self._zero_length(step):
            step += 1
        return step

    def _zero_length(self, i: int) -> bool:
        """Whether step i of this run's schedule starts and ends at one sigma (the `simple` scheduler
        repeats sigmas at a denoise below steps / 1000)."""
        cur, nxt = self.sigmas[i], self.sigmas[i + 1]
        return abs(cur - nxt) <= 1e-5 * max(abs(nxt), 1e-3)

    def _schedule_step(self, s: float, floor: int = -1) -> int:
        """The step i of this run's schedule that ``s`` belongs to: sigmas[i+1] < s <= sigmas[i] where the
        schedule falls (step 0 above sigmas[0] too), sigmas[i] <= s < sigmas[i+1] where it rises
        (FlipSigmas' ascending schedule for unsampling), s = sigmas[i] where step i is zero-length (a
        repeated sigma); the last step when none. Where s fits several steps (a repeated sigma, a
        hand-made schedule that falls and rises again, as a restart schedule does), the first of them at
        or after ``floor`` (how far the sampler got: _order_floor), else the last of them."""
        schedule = self.sigmas
        found, first = set(), None
        for i in range(len(schedule) - 1):
            cur, nxt = schedule[i], schedule[i + 1]
            tol, tol_cur = 1e-5 * max(abs(nxt), 1e-3), 1e-5 * max(abs(cur), 1e-3)
            if first is None and ((s > nxt + tol) if nxt <= cur else (s < nxt - tol)):
                first = i  # the first step s is in, or above (a sigma raised by s_churn counts there)
                found.add(i)
            if self._zero_length(i):
                if abs(s - cur) <= tol_cur:
                    found.add(i)
            elif (nxt + tol < s <= cur + tol_cur) if nxt < cur else (cur - tol_cur <= s < nxt - tol):
                found.add(i)
        if not found:
            return max(len(schedule) - 2, 0)
        found = sorted(found)
        later = [i for i in found if i >= floor]
        return later[0] if later else found[-1]

    def _before_last_by_reports(self) -> bool:
        """'last' only: whether the model call being made is certainly in an earlier step than the last,
        known without reading its sigma (on a GPU a device sync at every model call, about half of
        recording's cost there). After the sampler reported step i, its next evaluation is the first
        of step i + 1, or a corrector of step i (heun's at sigma i + 1, dpmpp_sde's, sa_solver_pece's
        within step i): either way before the last step while i + 2 < last, on a schedule that never
        rises (begin_run). Its step is then an estimate, kept out of the steps seen (_settle_estimates)."""
        last = len(self.sigmas or []) - 2
        return (
            self.steps.mode == "last" and self.reports_steps and self.evals_since_report == 1
            and self.reported + 2 < last
        )

    def _note_estimate(self, which: str, extra_options) -> None:
        """Keeps the sigma of a call whose step was estimated, with that estimate, once per model call (its
        layers share it)."""
        sigs, sig = self._estimated_sig[which], extra_options.get("sigmas")
        if not sigs or sigs[-1][0] is not sig:
            sigs.append((sig, self._sig_step))

    def _wants(self, step: int) -> bool:
        if self.steps.mode == "last":
            return step == max(len(self.sigmas) - 2, 0)
        if self.steps.mode == "mean":
            return True
        return self.steps.first <= step <= self.steps.last

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
