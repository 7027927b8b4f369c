"""The LiveRecording a record node returns, and the runs held for LATENTs that ComfyUI's cache may hand
over after the record node's own history has let them go."""

from __future__ import annotations

import weakref

import torch

from .core.recording import LayerKey, Recording, grid_levels
from .empty_run_reasons import _NEVER_CALLED
from .recorder_store import VAE_FACTOR, _Store, _own_level
from .run_history import MAX_KEEP_RUNS, _Run, _cpu_latent, _same_bits


# The runs read for a LATENT that ComfyUI's cache may hand over again after the record node has let them go:
# id(samples tensor) -> (weak reference to it, {store id: _Run}). A run read for a LATENT stays here while
# that tensor lives, i.e. while ComfyUI caches the output that holds it: --cache-lru N keeps the outputs of
# older prompts (a list of latents is one of its N), --cache-ram keeps them until RAM runs short, and the
# classic cache keeps a sampler's output while its inputs stay the same, however many runs other samplers on
# the recorded MODEL added since. So at most HELD_RUNS runs are held, in all, those read last (_HELD_ORDER);
# the entry also goes with its tensor.
_HELD: dict = {}
HELD_RUNS = MAX_KEEP_RUNS
# (id(samples), store id) of each held run, read last at the end; a key whose run or tensor is gone is
# skipped (the weak reference's callback pops _HELD alone, on whatever thread frees the tensor)
_HELD_ORDER: dict = {}


def _held_run_exists(key: tuple) -> bool:
    entry = _HELD.get(key[0])
    return entry is not None and key[1] in entry[1]


def _mark_read(samples: torch.Tensor, store_id: int) -> None:
    """Puts the held run of ``store_id`` for ``samples`` last in the read order, and lets go of the runs
    read first while more than HELD_RUNS are held."""
    key = (id(samples), store_id)
    _HELD_ORDER.pop(key, None)
    _HELD_ORDER[key] = None
    live = [k for k in list(_HELD_ORDER) if _held_run_exists(k)]
    for k in set(_HELD_ORDER) - set(live):
        _HELD_ORDER.pop(k, None)
    for k in live[: max(len(live) - HELD_RUNS, 0)]:
        _HELD_ORDER.pop(k, None)
        entry = _HELD.get(k[0])
        if entry is not None:
            entry[1].pop(k[1], None)
            if not entry[1]:
                _HELD.pop(k[0], None)


def _hold(samples: torch.Tensor, store_id: int, run: _Run) -> None:
    """Keeps ``run`` for the LATENT tensor ``samples`` (the object ComfyUI's cache holds) while it lives,
    and while it is among the HELD_RUNS runs read last."""
    key = id(samples)
    entry = _HELD.get(key)
    if entry is None or entry[0]() is not samples:
        try:
            ref = weakref.ref(samples, lambda _ref, key=key: _HELD.pop(key, None))
        except TypeError:  # not weak-referenceable: nothing to hold it by
            return
        entry = _HELD[key] = (ref, {})
    entry[1][store_id] = run
    _mark_read(samples, store_id)


def _held(samples: torch.Tensor, store_id: int) -> _Run | None:
    """The run of ``store_id`` held for this very LATENT tensor (_hold) while it still holds that run's
    output (or last denoised latent) bit for bit, or None. A run found is read last again."""
    entry = _HELD.get(id(samples))
    run = None if entry is None or entry[0]() is not samples else entry[1].get(store_id)
    now = _cpu_latent(samples) if run is not None else None
    if now is None or not any(
        made is not None and made.shape == now.shape and _same_bits(made, now) for made in (run.latent, run.denoised)
    ):
        return None
    _mark_read(samples, store_id)
    return run


class LiveRecording:
    """Handle returned by HeadSeg_RecordSelfAttention; filled while the patched model samples.

    ``snapshot(latent)`` gives the Recording of the run that produced ``latent``; ``snapshot()`` the
    most recent finished run.
    """

    def __init__(self, store: _Store, store_id: int, layers: list):
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

        New object, tensors shared, never mutated. ValueError naming `latent` when none of the kept
        runs of the recorded MODEL (RunHistory._remember) produced ``latent`` and no run read for this very
        tensor is still held (_hold: ComfyUI's cache may hand over a sampler's LATENT after its run left the
        history; the HELD_RUNS runs read last are held).
        """
        store = self._store
        if latent is None:
            found = store.latest()
        elif not any(run.latent is not None for run in store.history):
            found = (None, store.failure)  # nothing recorded yet: the message below says so, and why
        else:
            found = store.run_of(latent)
            if found is not None:
                _hold(latent, self.store_id, store.pinned)  # run_of pins the run it found
            else:  # pushed out of the history, but ComfyUI's cache still holds the LATENT it was read for
                run = _held(latent, self.store_id)
                found = None if run is None else (run.recording, run.failure)
        if found is None:
            raise ValueError(self._no_run_message(latent))
        rec, failure = found
        if rec is None:
            if failure and failure != _NEVER_CALLED:  # the run happened: its own reason comes first
                raise ValueError(f"recording: the sampling run recorded nothing: {failure}")
            why = f" ({failure})" if failure else ""
            # a LATENT from a sampler this record node never saw: a sampler on another MODEL, or one taken
            # from ComfyUI's cache while the record node ran anew (a cache that drops the largest outputs
            # first, as --cache-ram does, counts a MODEL's whole size against the record node)
            cached = (
                "; if the sampler does both already, ComfyUI ran Record Self-Attention anew but took the "
                "sampler's LATENT from its cache (its cache dropped the record node's output, as --cache-ram "
                "can): change any input of the sampler, such as its seed, and queue again"
            ) if latent is not None else ""
            raise ValueError(
                "recording: nothing recorded yet: connect the sampler's LATENT output to the node that reads "
                "the recording so it runs after sampling, and sample with the MODEL from "
                "HeadSeg_RecordSelfAttention, with at least one step (denoise above 0); a model merge keeps the "
                f"patches of its first model only, so give the recorded MODEL to ModelMergeSimple as model1{cached}{why}"
            )
        out = Recording(
            layers=dict(rec.layers),
            image_size=rec.image_size,
            model=rec.model,
            steps=rec.steps,
            branch=rec.branch,
        )
        return out.validate(check_finite=False)  # NaN / inf: refused per layer by Head PCA, noted by Save Recording

    def unrecorded(self, rec: Recording) -> list[tuple[LayerKey, int]]:
        """The layers this record node was set to record (its positions and levels) that a run of it,
        ``rec``, lacks -> [(key, grid level)], in model order: skipped while sampling because another
        patch changed their token count, grid or keys, left to an attn1 module that runs another node's
        code, or to another node's (block, number) attn1 patch set after the record node (the log said so
        at the time)."""
        H, W = rec.image_size
        grids = grid_levels((max(H // VAE_FACTOR, 1), max(W // VAE_FACTOR, 1)))
        levels = self._store.levels
        wanted = [(layer.key, _own_level(layer, grids)) for layer in self.layers]
        return [(key, level) for key, level in wanted
                if key not in rec.layers and (levels is None or level in levels)]

    def _no_run_message(self, latent) -> str:
        def dims(t):
            return "x".join(str(n) for n in t.shape)

        shape = dims(latent) if isinstance(latent, torch.Tensor) else type(latent).__name__
        runs = [run.latent for run in self._store.history if run.latent is not None]
        kept = ", ".join(dims(out) for out in runs)
        full = (
            f" Only the last {self._store.keep_runs} run(s) (Record Self-Attention's keep_runs), the newest "
            f"{MAX_KEEP_RUNS} runs of the prompt that sampled last and the run read last are kept, and "
            f"{self._store.dropped} older one(s) are "
            "gone: a LATENT of an earlier run is no longer there (every sampler that uses the recorded MODEL adds "
            "a run, e.g. an inpainting pass each time it runs). Raise keep_runs: Record Self-Attention then runs "
            "again, and so does the sampler, even where ComfyUI would hand this LATENT over from its cache "
            "(--cache-lru), where sampling with the same inputs again would not."
            if self._store.dropped
            else ""
        )
        same_shape = isinstance(latent, torch.Tensor) and any(out.shape == latent.shape for out in runs)
        no_step = (
            " If the sampler of this LATENT used the MODEL of another Record Self-Attention, read that node's "
            "recording instead; a model merge keeps the patches of its first model only, so give the recorded "
            "MODEL to ModelMergeSimple as model1. A sampler that takes no step (denoise 0, or a start step at or "
            "past its last step) returns its input LATENT without running the model, so nothing is recorded for "
            "it: give it at least one step."
            if same_shape
            else ""
        )
        if isinstance(latent, torch.Tensor) and latent.numel() and not bool(latent.any()):
            # all zeros: Empty Latent Image's, returned by a sampler that took no step (of any shape)
            no_step = (
                " This LATENT is all zeros, as Empty Latent Image makes it: no sampler changed it. A sampler that "
                "takes no step (denoise 0, or a start step at or past its last step) returns its input LATENT "
                "without running the model, so nothing is recorded for it: give it at least one step."
            )
        return (
            f"latent: this LATENT ({shape}) is not the output of any of the last {len(runs)} sampling run(s) of "
            f"the recorded MODEL (their outputs: {kept}). Connect the LATENT output of the sampler that sampled "
            f"with the MODEL from Record Self-Attention directly, with no node in between.{no_step}{full}"
        )

    def __repr__(self):
        return f"LiveRecording(id={self.store_id}, layers={len(self.layers)}, runs={self.runs})"
