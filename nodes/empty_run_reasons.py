"""Why a sampling run recorded nothing: the message a record node keeps with such a run (why_empty), which
Head PCA and the other readers of its LiveRecording give as their error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .step_selection import steps_label
from .step_tracker import _OWN_SIGMAS, _SKIPPED_BY_CACHE

if TYPE_CHECKING:
    from .recorder_store import _Store

# Why a run recorded nothing when the recorded layers never ran (the MODEL used was not the patched one).
_NEVER_CALLED = "the self-attention layers were never called during the last sampling run"


def why_empty(store: _Store) -> str:
    """Why the run ``store`` just ended recorded no layer: the reason it stopped recording (its failure),
    or what its calls show (no call at all, none of the recorded branch, none at the chosen steps, none
    left once other patches' calls were left out)."""
    n_steps = store.n_steps
    if store.failure:
        return store.failure
    store._settle_estimates()
    if store.seen_calls == 0 and (store.left_to_module or store.shadowed):
        why = []
        if store.left_to_module:
            why.append(
                "the self-attention modules of the recorded layers run another node's code (a forward hook, or a "
                "forward swapped in by an object patch), which HeadSeg's patches would skip: they were left to it "
                "and not recorded (see the log); sample without that node to record them"
            )
        if store.shadowed:
            names = ", ".join(key.name for key in sorted(store.shadowed, key=lambda key: key.sort_key))
            why.append(
                f"{'the' if not why else 'the other'} recorded layers ({names}) were taken over by another node's "
                "attn1 patch set after Record Self-Attention under their (block, number) key, which ComfyUI calls "
                "in their place: they were left to it and not recorded (see the log); place that node before "
                "Record Self-Attention, which then runs its patch and records what it returns"
            )
        return "; ".join(why)
    if store.seen_calls == 0:
        return _NEVER_CALLED
    if store.seen_branch == 0:
        hint = (
            " (with cfg = 1 ComfyUI skips the uncond pass: choose branch 'cond', or a cfg above 1)"
            if store.branch == "uncond"
            else ""
        )
        return f"branch: no model call held the '{store.branch}' branch{hint}"
    if store.wanted_calls and store.crop_calls == store.wanted_calls:
        return (
            f"branch: the '{store.branch}' conditioning covered only part of the image in every model call "
            "(ConditioningSetArea, or a mask with 'set_cond_area: mask bounds'); HeadSeg records calls on "
            "the whole latent: add a conditioning entry for the whole image"
        )
    last = max(n_steps - 1, 0)
    wanted = store.steps.first if store.steps.mode == "range" else last
    asked = range(wanted, min(store.steps.last, last) + 1) if store.steps.mode == "range" else [last]
    if store.steps.mode in ("range", "last") and asked and store._not_run(asked) == list(asked):
        ran = f" ({steps_label(store.steps_run)})" if store.steps_run else ""
        if store._skipped_by_cache(asked):
            return (
                f"steps: the sampler went through step {asked[-1]} but the model did not run at step(s) "
                f"{steps_label(store._skipped_by_cache(range(n_steps)))} ({_SKIPPED_BY_CACHE}): choose "
                f"steps 'mean', steps the model ran{ran}, or an end_percent below 1 on that node"
            )
        return (
            f"steps: no conditioning entry was active at step(s) {steps_label(store._not_run(range(n_steps)))}, "
            "so the model did not run there (a timestep range, e.g. ConditioningSetTimestepRange, ends the "
            "conditioning early, and at cfg = 1 there is no uncond pass): choose steps the model "
            f"ran{ran}, 'mean', or widen its timestep range"
        )
    if store.steps.mode in ("range", "last") and wanted > store.max_step and wanted <= store.max_step_any:
        return (
            f"steps: the '{store.branch}' conditioning was not active at step {wanted}: its model calls stopped "
            f"at step {store.max_step} (a timestep range, e.g. ConditioningSetTimestepRange, ends it early): "
            f"choose steps up to {store.max_step}, 'mean', or widen its timestep range"
        )
    if (store.steps.mode == "range" and store.steps.first <= store.max_step and asked
            and store._not_evaluated(asked) == list(asked)):  # steps between those evaluated (LazyCache)
        ran = f" ({steps_label(store.steps_run)})" if store.steps_run else ""
        return (
            f"steps: range {store.steps.label} selected, but the sampler evaluated the model at none of the "
            f"sigmas of step(s) {steps_label(asked)} ({_OWN_SIGMAS}): choose steps the model ran{ran}, or 'mean'"
        )
    if store.steps.mode == "range" and store.steps.first > store.max_step:
        if store.steps.first <= last and store._not_evaluated(asked) == list(asked):  # within the run
            return (
                f"steps: range {store.steps.label} selected, but the sampler evaluated the model only down "
                f"to sigma {store.min_sigma:.4g} (in step {store.max_step_any} of its steps 0-{last}; "
                f"{_OWN_SIGMAS}): choose {store._steps_it_ran()}, or 'mean'"
            )
        if store.max_step < last:  # past the run, and 'last' would record nothing either
            skipped = store._skipped_by_cache(range(n_steps))
            if last in skipped:  # the sampler went through the last step; a cache node ran no model there
                return (
                    f"steps: range {store.steps.label} selected but the sampler ran {n_steps} steps (0-{last}), "
                    f"and the model did not run at step(s) {steps_label(skipped)} ({_SKIPPED_BY_CACHE}): choose "
                    f"{store._steps_it_ran()}, 'mean', or an end_percent below 1 on that node"
                )
            if store.max_step_any < last:
                why = (f" and evaluated the model only down to sigma {store.min_sigma:.4g} (in step "
                       f"{store.max_step_any}; {_OWN_SIGMAS})")
                instead = "or 'mean'"
            else:
                why = (f", and the '{store.branch}' conditioning was not active after step {store.max_step} (a "
                       "timestep range, e.g. ConditioningSetTimestepRange, ends it early)")
                instead = "'mean', or widen its timestep range"
            return (
                f"steps: range {store.steps.label} selected but the sampler ran {n_steps} steps (0-{last})"
                f"{why}: choose {store._steps_it_ran()}, {instead}"
            )
        return (
            f"steps: range {store.steps.label} selected but the sampler ran {n_steps} steps "
            f"(0-{last}): choose steps within them, or 'last'"
        )
    if store.steps.mode == "last" and store.max_step < last:
        return (
            f"steps: 'last' is step {last} (sigma at most {store.sigmas[last]:.4g}), but the sampler evaluated "
            f"the model only down to sigma {store.min_sigma:.4g} (in step {store.max_step_any} of its steps "
            f"0-{last}; {_OWN_SIGMAS}): choose {store._steps_it_ran()}, or 'mean'"
        )
    if store.foreign_calls:  # (nothing was recorded: the calls left to record were all such calls)
        return (
            "another patch (such as reference-only or StyleAligned) added another image's tokens to the keys "
            "and values of the self-attention calls left to record (see the log): HeadSeg records "
            "self-attention over a layer's own tokens; sample without that patch, or choose steps where it is off"
        )
    if store.wanted_calls and store.regrid_calls:
        return (
            "steps: at every chosen step a patch such as Kohya Deep Shrink (PatchModelAddDownscale) resized "
            "the token grids: choose steps outside its range (its end_percent), e.g. 'last'"
        )
    return (
        "no layer could be recorded (levels selection matched no grid, or another patch changed the "
        "token count of every layer; see the log)"
    )
