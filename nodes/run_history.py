"""The finished sampling runs a record node keeps, so that a LATENT finds the run that produced it:
RunHistory, the part of the recorder store (``recorder_store.py``) that keeps, lets go of and finds
runs (_Run), and how many it keeps (HISTORY, MAX_KEEP_RUNS, the record node's keep_runs)."""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from .core.recording import Recording

log = logging.getLogger("HeadSeg")

# Sampling runs kept per record node by default (its keep_runs input), so that a LATENT finds its own
# run when other samplers used the recorded MODEL after it (a hires fix, an inpainting pass). Kept
# beyond them: the run read last (RunHistory.pinned: an inpainting pass re-run click after click must
# not push out the image it inpaints, which Head PCA reads again when one of its inputs changes), and
# the newest MAX_KEEP_RUNS runs of the prompt that sampled last (a list of latents is sampled item
# after item before Head PCA reads any).
HISTORY = 3
MAX_KEEP_RUNS = 64


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


def _cpu_latent(x) -> torch.Tensor | None:
    """A sampler's latent as a float32 CPU tensor (a copy), or None when it is not a plain tensor."""
    if not isinstance(x, torch.Tensor) or x.is_nested:
        return None
    return x.detach().to(device="cpu", dtype=torch.float32, copy=True)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two float32 tensors of one shape hold the same bits (NaN matches NaN, unlike torch.equal:
    a sampler's output with NaN in it is still its own)."""
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


class RunHistory:
    """The history part of a record node's store (_Store): the runs kept, oldest first (history), the run
    read last (pinned), and how many runs newer ones pushed out (dropped). Reads the store's ``failure``
    and ``prompt`` (the run that ends, or that ended last)."""

    def _start_history(self, keep_runs: int) -> None:
        self.keep_runs = keep_runs  # the latest runs kept whatever else is kept (_remember)
        self.dropped = 0  # runs pushed out of the history by newer ones
        # the runs kept (_remember), oldest first
        self.history: list[_Run] = []
        self.pinned: _Run | None = None  # the run that run_of found last
        # the last prompt whose runs went past MAX_KEEP_RUNS (warned once): a prompt's runs come one after the
        # other, so one id does; a set of them grew with every such prompt of a long session
        self._capped_prompt: str | None = None

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
