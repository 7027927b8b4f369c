"""Per-head self-attention capture while ComfyUI samples: layer discovery, attn1 replace patches, run wrapper.

What is recorded: for every UNet self-attention layer (attn1 of a BasicTransformerBlock inside
input/middle/output blocks) the per-head outputs softmax(QK^T / sqrt(d)) V, BEFORE ``to_out`` mixes the
heads, as [B, heads, h, w, d] on the layer's token grid, float16 on the CPU (float32 for a layer where a
bfloat16, float32 or float64 UNet reaches values float16 makes inf, 65520 or more).

How:
- ``patches_replace["attn1"][(block, number, depth)]`` gets a plain closure that computes the
  attention exactly as the model would (ComfyUI's ``optimized_attention`` with the layer's
  ``attn_precision``), or calls the attn1 replace patch that was already there (SAG's, another pack's)
  and records what that patch returns: the recording always holds the tensor the model goes on with.
- The closures capture only an integer id. The data lives in a module-level registry of stores, so
  any later ``ModelPatcher.clone()`` (LoRA, FreeU, ...), which deep-copies ``model_options``, still
  writes into the same store.
- An OUTER_SAMPLE wrapper marks the start and end of each sampling run: a run starts a fresh recording,
  and a finished run becomes what ``LiveRecording.snapshot()`` returns. The last keep_runs runs are kept
  with their output latents, so that ``snapshot(latent)`` gives the run that produced a LATENT; so are
  the newest MAX_KEEP_RUNS runs of the prompt that sampled last (the items of a list of latents) and the run read last,
  however many runs follow it.
- PREDICT_NOISE and CALC_COND_BATCH wrappers tell each model evaluation's main pass (recorded) from the
  extra passes guidance nodes run after CFG (not recorded), keep a (block, number) attn1 patch added
  after the record node (PAG's) from being hidden by HeadSeg's longer key, chain a (block, number,
  depth) patch set after the record node (SAG's) that replaced HeadSeg's own, and leave a layer whose
  attn1 module runs another node's code (a forward hook, an object patch), which a replace patch skips,
  to that module.
- Steps are told apart by the call's sigma against the run's sigma schedule: step i covers the sigmas in
  (sigmas[i+1], sigmas[i]] ([sigmas[i], sigmas[i+1]) on a rising schedule, FlipSigmas'; a sigma in several
  steps, repeated or revisited, goes to them in the order the sampler calls the model). Only what the
  steps option needs is kept ("last": one fp16 copy per layer, or a float32 mix when the branch has
  several entries; "mean" or a range: one float32 running sum per layer). The store itself is ``recorder_store.py``
  (its history of runs ``run_history.py``, its steps ``step_tracker.py``, why a run recorded nothing
  ``empty_run_reasons.py``), the handle ``live_recording.py``.
- Several entries of the recorded branch are mixed as ComfyUI mixes their predictions: the
  CALC_COND_BATCH wrapper asks ComfyUI's ``get_area_and_mult`` how much each entry weighs at this
  sigma, and ``entry_weights.py`` turns that into each entry's share per token.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass

import comfy.ldm.modules.attention as comfy_attention
import comfy.samplers
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample
from comfy.patcher_extension import WrappersMP

from .core.recording import BLOCK_POSITIONS, LayerKey, parse_levels
from .entry_weights import EntryMult, EntryShares, entry_shares
from .live_recording import LiveRecording
from .recorder_store import BRANCHES, _Store, log
from .run_history import HISTORY, check_keep_runs
from .step_selection import parse_steps


WRAPPER_KEY = "headseg_record_self_attention"
# transformer_options[FALLBACKS_KEY][store id][(block, number)]: the (block, number) attn1 patch (or None)
# that a record node's patches stand in for. Kept in model_options, not on the closures, so that the
# deepcopy in ModelPatcher.clone copies it together with the patch dict (the same object in both).
FALLBACKS_KEY = "headseg_fallback_patches"
POSITIONS = ("down", "middle", "up")

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


def _transformer_blocks(diffusion_model):
    """UNet module -> (LayerInfo, BasicTransformerBlock) of every self-attention layer, in UNet order."""
    groups = [("input", list(enumerate(diffusion_model.input_blocks)))]
    middle = getattr(diffusion_model, "middle_block", None)
    groups.append(("middle", [(0, middle)] if middle is not None else []))
    groups.append(("output", list(enumerate(diffusion_model.output_blocks))))
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
                    yield LayerInfo(LayerKey(block, number, depth), int(tb.n_heads), int(tb.d_head), level), tb
            if change < 0:  # an up block upsamples after its transformers
                level += change


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
    found = [layer for layer, _ in _transformer_blocks(diffusion_model)]
    if not found:
        raise ValueError(
            f"model: no UNet self-attention layer found in {name} (no BasicTransformerBlock with "
            f"self-attention inside input/middle/output blocks); HeadSeg needs an SD1.x/SD2.x/SDXL-style UNet"
        )
    return sorted(found, key=lambda layer: layer.key.sort_key)

def model_label(model) -> str:
    """ModelPatcher -> short model family name for the recording metadata: "SD2" (SD2.0 and 2.1), "SD15",
    "SDXL", ..."""
    config = getattr(getattr(model, "model", None), "model_config", None)
    names = {"SD15": "SD15", "SD20": "SD2", "SDXL": "SDXL", "SDXLRefiner": "SDXLRefiner", "SSD1B": "SSD1B"}
    for cls in type(config).__mro__ if config is not None else ():
        if cls.__name__ in names:
            return names[cls.__name__]
    return type(config).__name__ if config is not None else "unknown"

def _make_attn1_patch(store_id: int, key: LayerKey, previous, previous_is_full_key: bool):
    """Plain closure (survives deepcopy of model_options): attention as the model computes it, then record.

    ``previous``: the attn1 replace patch the layer had when the record node ran, under its
    (block, number, depth) key (``previous_is_full_key``) or under ComfyUI's (block, number) fallback key.
    A (block, number) patch stays in the patch dict, where every later clone (LoRA, FreeU, ...) deep-copies
    it and ComfyUI moves and casts the copy of the clone that samples: the patch calls that copy, found
    in the call's options (FALLBACKS_KEY, copied with the dict), and ``previous`` only where it is missing.
    """

    def headseg_attn1(q, k, v, extra_options):
        store = _REGISTRY.get(store_id)
        # A patch set after the record node that chains the one it replaced (as a pack should) calls this
        # store's patch of the layer from inside the one wrapped around it (_chaining_later_patches): only
        # the outermost records, so the recording holds what the model goes on with, once per call.
        outermost = store is not None and key not in store.patches_running
        if outermost:
            store.patches_running.add(key)
        try:
            if previous is not None:
                fn = None
                if not previous_is_full_key:  # the copy of the clone that samples
                    fn = extra_options.get(FALLBACKS_KEY, {}).get(store_id, {}).get((key.block, key.number))
                out = (previous if fn is None else fn)(q, k, v, extra_options)
            else:
                out = comfy_attention.optimized_attention(
                    q, k, v, extra_options["n_heads"],
                    attn_precision=extra_options.get("attn_precision"),
                    transformer_options=extra_options,
                )
        finally:
            if outermost:
                store.patches_running.discard(key)
        if outermost:
            try:
                # the keys' token count: another than the queries' where an attn1_patch (reference-only)
                # added tokens; k is [B, N_k, heads*d] as the block projected it
                store.observe(key, out, extra_options, kv_tokens=int(k.shape[-2]) if k.dim() == 3 else None)
            except Exception as exc:  # recording must never break sampling
                store.fail(exc)
        return out

    # read by _without_shadowing_patches (a function, and so its attributes, is kept, not copied, by
    # the deepcopy of model_options in ModelPatcher.clone)
    headseg_attn1.headseg_store_id = store_id
    headseg_attn1.headseg_previous = previous
    headseg_attn1.headseg_previous_is_full_key = previous_is_full_key
    if previous_is_full_key:
        _forward_patch_object_methods(headseg_attn1, store_id, key, previous)
    return headseg_attn1


def _forward_patch_object_methods(patch, store_id: int, key: LayerKey, previous) -> None:
    """Gives HeadSeg's ``patch`` the ``to`` and ``models`` of the patch object it replaced in the patch dict.

    ComfyUI moves and casts the patch objects it finds in ``patches_replace`` when it loads the model
    (ModelPatcher.model_patches_to(device), then (model dtype): ``obj = obj.to(...)``) and loads the
    models they name (``obj.models()``); one that HeadSeg's patch replaced under its (block, number,
    depth) key would otherwise be left on its device and dtype (a dtype or device error in its own
    code). A (block, number) patch HeadSeg stands in for is still in the dict, where ComfyUI finds it.
    """
    if callable(getattr(previous, "to", None)):
        def to(*args, **kwargs):
            moved = previous.to(*args, **kwargs)
            return patch if moved is previous else _make_attn1_patch(store_id, key, moved, True)

        patch.to = to
    if callable(getattr(previous, "models", None)):
        patch.models = lambda: previous.models()


_PATCH_CODE = _make_attn1_patch(0, None, None, False).__code__  # the code every HeadSeg attn1 patch runs


def _is_own_patch(fn) -> bool:
    """Whether attn1 patch ``fn`` is one of HeadSeg's (_make_attn1_patch), told by the code it runs: its
    headseg_* attributes are no proof, since functools.wraps copies them onto another pack's wrapper."""
    return getattr(fn, "__code__", None) is _PATCH_CODE


def _own_patches(fn):
    """The HeadSeg attn1 patches of the chain that starts at ``fn``, outermost first (none when ``fn`` is
    another node's patch)."""
    while _is_own_patch(fn):
        yield fn
        fn = fn.headseg_previous


def _stands_in_for(fn):
    """A HeadSeg attn1 patch -> the HeadSeg patch at the end of its chain when, without HeadSeg, ComfyUI
    would look the layer up under its (block, number) key; None when a (block, number, depth) patch of
    another node would take precedence anyway."""
    # past a patch chained onto another node's (or record node's) full-key patch
    return next((patch for patch in _own_patches(fn) if not patch.headseg_previous_is_full_key), None)


def _recording_stores(fn):
    """The stores of the record nodes whose patches are in the chain ``fn`` and that are recording a run."""
    for patch in _own_patches(fn):
        store = _REGISTRY.get(patch.headseg_store_id)
        if store is not None and store.active:
            yield store


def _without_shadowing_patches(model_options: dict, warn=None) -> dict:
    """model_options -> the same, minus HeadSeg's (block, number, depth) attn1 patches that would hide
    a (block, number) patch added after the record node: ComfyUI prefers the 3-tuple key, so without
    this PAG's perturbed pass (which adds ("middle", 0) for one call) would silently lose its effect.
    Such a layer is then not recorded in that call; ``warn(name, fn)`` is called for each, with the patch
    dropped (a chain: every record node on the model has a patch in it)."""
    transformer = model_options.get("transformer_options", {})
    attn1 = transformer.get("patches_replace", {}).get("attn1", {})
    marks = transformer.get(FALLBACKS_KEY, {})
    drop = []
    for name, fn in attn1.items():
        if not isinstance(name, tuple) or len(name) != 3 or not _is_own_patch(fn):
            continue
        short = attn1.get(name[:2])
        if short is None:
            continue
        own = _stands_in_for(fn)
        if own is not None and short is not marks.get(own.headseg_store_id, {}).get(name[:2]):
            drop.append(name)
    return _without_attn1(model_options, attn1, drop, None if warn is None else (lambda name: warn(name, attn1[name])))


def _shadowed(name: tuple, fn, current=None, main: bool = False) -> None:
    """Tells every recording record node whose patch is in the chain ``fn`` that a (block, number) attn1
    patch of another node takes the layer ``name`` over in this call (_without_shadowing_patches), with a
    warning once per run, in a main pass only (PAG's perturbed pass is an extra pass: nothing to say):
    ``main`` for ``current``, the store whose CALC_COND_BATCH wrapper dropped the chain, and the others'
    own reckoning (their wrappers may not have run yet in this call)."""
    for store in _recording_stores(fn):
        if main if store is current else store.in_main:
            key = LayerKey(*name)
            store.shadowed.add(key)
            store._warn_once(
                key, "shadow", f"a ({name[0]}, {name[1]}) attn1 patch of another node takes precedence in this call"
            )


# diffusion model -> {(block, number, depth): its BasicTransformerBlock}, read at every model call
_TRANSFORMER_BLOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _attn1_modules(diffusion_model) -> dict:
    """{(block, number, depth): BasicTransformerBlock} of the UNet's self-attention layers ({} for another
    model), found once per UNet."""
    try:
        blocks = _TRANSFORMER_BLOCKS.get(diffusion_model)
        if blocks is None:
            blocks = _TRANSFORMER_BLOCKS[diffusion_model] = {
                (layer.key.block, layer.key.number, layer.key.depth): tb
                for layer, tb in _transformer_blocks(diffusion_model)
            }
    except (AttributeError, TypeError):  # no UNet, or not weak-referenceable
        return {}
    return blocks


# CrossAttention.forward when HeadSeg was imported: ComfyUI's own (or a pack's for every module)
_IMPORTED_FORWARD = comfy_attention.CrossAttention.forward


def _runs_other_code(module) -> bool:
    """Whether calling attn1 ``module`` runs more than CrossAttention.forward: a forward hook another node
    put on it, or a forward it swapped in (an object patch of the module or of its forward; undoing an
    object patch of the forward leaves the module's own bound forward set on it, which is no other code,
    also once a pack has replaced CrossAttention.forward since).
    CrossAttention.forward is read now, not at import: a pack that replaced it for every module (which any
    attn1 replace patch skips, with or without HeadSeg) leaves the layers recorded whenever it loaded."""
    own = vars(module).get("forward")
    forward = comfy_attention.CrossAttention.forward
    return bool(
        getattr(module, "_forward_hooks", None) or getattr(module, "_forward_pre_hooks", None)
        or getattr(type(module), "forward", None) is not forward
        or (own is not None and (getattr(own, "__func__", None) not in (forward, _IMPORTED_FORWARD)
                                 or getattr(own, "__self__", None) is not module))
    )


def _attends_alone(fn) -> bool:
    """Whether HeadSeg attn1 patch ``fn`` computes the attention itself: no other node's patch at the end
    of its chain (without HeadSeg, ComfyUI would call the layer's attn1 module there)."""
    return any(patch.headseg_previous is None for patch in _own_patches(fn))


def _without_bypassing_patches(model_options: dict, diffusion_model, warn=None) -> dict:
    """model_options -> the same, minus HeadSeg's attn1 patches of layers whose attn1 module runs another
    node's code (_runs_other_code): ComfyUI calls a replace patch instead of the module, so that code
    (a forward hook, an object patch) would never run and the picture would change. Such a layer is left
    to its module and not recorded in that call; ``warn(name, fn)`` is called for each, with the patch
    dropped (a chain: every record node on the model has a patch in it)."""
    attn1 = model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    blocks = _attn1_modules(diffusion_model)  # the attn1 module itself is read at each call (an object patch swaps it)
    drop = [
        name for name, fn in attn1.items()
        if _is_own_patch(fn) and (tb := blocks.get(name)) is not None and _runs_other_code(tb.attn1)
        and _attends_alone(fn)
    ]
    return _without_attn1(model_options, attn1, drop, None if warn is None else (lambda name: warn(name, attn1[name])))


def _left_to_module(name: tuple, fn) -> None:
    """Tells every recording record node whose patch is in the chain ``fn`` (a layer ``name`` left to its
    attn1 module: _without_bypassing_patches) that the layer is left to it, with a warning once per run.
    The first record node's CALC_COND_BATCH wrapper to run drops the whole chain, so the record nodes
    chained before or after it never see the patch: each must still say why it lacks the layer."""
    for store in _recording_stores(fn):
        key = LayerKey(*name)
        store.left_to_module.add(key)
        store._warn_once(
            key, "module",
            "its self-attention module runs another node's code (a forward hook, or a forward swapped in "
            "by an object patch), which an attn1 replace patch would skip: the layer is left to it",
        )


def _without_attn1(model_options: dict, attn1: dict, drop: list, warn=None) -> dict:
    """model_options without the attn1 replace patches named in ``drop`` (itself when none; ``warn(name)``
    called for each)."""
    if not drop:
        return model_options
    if warn is not None:
        for name in drop:
            warn(name)
    return _with_attn1(model_options, {name: fn for name, fn in attn1.items() if name not in drop})


def _with_attn1(model_options: dict, attn1: dict) -> dict:
    """model_options with its attn1 replace patches swapped for ``attn1`` (dicts copied down to it)."""
    options = dict(model_options)
    transformer = dict(options.get("transformer_options", {}))
    replace = dict(transformer.get("patches_replace", {}))
    replace["attn1"] = attn1
    transformer["patches_replace"] = replace
    options["transformer_options"] = transformer
    return options


def _runs_through(fn, store_id: int) -> bool:
    """Whether attn1 patch ``fn`` is, or chains to, a patch of record node ``store_id``."""
    return any(patch.headseg_store_id == store_id for patch in _own_patches(fn))


def _chaining_later_patches(model_options: dict, store_id: int, layers) -> dict:
    """model_options -> the same, where another node's (block, number, depth) attn1 patch set after the
    record node (SAG applied after it replaces the middle layer's) is wrapped, for this call, in a
    HeadSeg patch that runs it and records what it returns, as if it had been there first."""
    attn1 = model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    wrapped = {}
    for key in layers:
        name = (key.block, key.number, key.depth)
        fn = attn1.get(name)
        if fn is not None and not _runs_through(fn, store_id):
            wrapped[name] = _make_attn1_patch(store_id, key, fn, True)
    if not wrapped:
        return model_options
    return _with_attn1(model_options, {**attn1, **wrapped})


def _make_predict_noise_wrapper(store_id: int):
    """PREDICT_NOISE wrapper: (executor, x, timestep, ...) marks one model evaluation of the guider."""

    def headseg_predict_noise(executor, *args, **kwargs):
        store = _REGISTRY.get(store_id)
        if store is not None and store.active:
            store.begin_eval()
        return executor(*args, **kwargs)

    return headseg_predict_noise


def _branch_weights(branch: list, x: torch.Tensor, timestep) -> EntryShares | None:
    """The shares of one branch's entries at this call, from ComfyUI's own weighing of each entry
    (``get_area_and_mult``: strength, mask, timestep range, area; None while an entry is inactive)."""
    entries = []
    for entry in branch:
        p = comfy.samplers.get_area_and_mult(entry, x, timestep)
        if p is None:
            continue
        default = "default" in entry  # weighed by what the others leave (finalize_default_conds)
        entries.append(EntryMult(p.uuid, None if default else p.mult[:, 0], p.area, default))  # mult [B, h', w']
    return entry_shares(entries, x.shape)


def _any_entry_active(conds, x: torch.Tensor, timestep) -> bool:
    """Whether ComfyUI would run one of the entries of ``conds`` (a list of branches, None where one is
    skipped) at this call: its ``get_area_and_mult`` returns None for an entry outside its timestep range."""
    return any(
        comfy.samplers.get_area_and_mult(entry, x, timestep) is not None
        for branch in (conds if isinstance(conds, (list, tuple)) else [])
        for entry in (branch or [])
    )


def _make_calc_cond_batch_wrapper(store_id: int):
    """CALC_COND_BATCH wrapper: (executor, model, conds, x, timestep, model_options): records only in an
    evaluation's main pass, and lets (block, number) attn1 patches added after the record node run
    (always, even when this store records nothing: the sampled image must not depend on it)."""

    def headseg_calc_cond_batch(executor, *args, **kwargs):
        store = _REGISTRY.get(store_id)
        recording = store is not None and store.active
        original = args, kwargs
        saved = (store.batch_main, store.shares, store.shares_tag) if recording else None
        try:
            if recording:
                def arg(i, name):
                    return args[i] if len(args) > i else kwargs.get(name)

                conds, x, timestep = arg(1, "conds"), arg(2, "x_in"), arg(3, "timestep")
                main = store.begin_batch(conds, lambda branch: _branch_weights(branch, x, timestep))
            else:
                main = False
            diffusion_model = getattr(args[0] if args else kwargs.get("model"), "diffusion_model", None)

            def shadowed(name, fn):
                _shadowed(name, fn, store if recording else None, recording and main)

            def adjust(options):
                # (both told to every record node in the chain, whether or not this one records)
                options = _without_shadowing_patches(options, shadowed)
                options = _without_bypassing_patches(options, diffusion_model, _left_to_module)
                return _chaining_later_patches(options, store_id, store.layers) if recording else options

            if len(args) > 4:
                args = (*args[:4], adjust(args[4]), *args[5:])
            elif "model_options" in kwargs:
                kwargs = {**kwargs, "model_options": adjust(kwargs["model_options"])}
        except Exception as exc:  # recording must never break sampling
            if recording:
                store.fail(exc)
            return executor(*original[0], **original[1])
        if not recording:
            return executor(*args, **kwargs)
        store.batch_main = main
        calls = store.seen_calls
        try:
            out = executor(*args, **kwargs)
        finally:
            store.batch_main, store.shares, store.shares_tag = saved
        # the model did not run in a main pass: keep why, for the messages about steps ('mean' needs none)
        if main and store.active and store.seen_calls == calls and store.steps.mode != "mean":
            try:
                store.note_idle(timestep, _any_entry_active(conds, x, timestep))
            except Exception as exc:  # recording must never break sampling
                store.fail(exc)
        return out

    return headseg_calc_cond_batch


def _reports_schedule_steps(sampler) -> bool:
    """Whether ``sampler`` is one of k-diffusion's samplers as ComfyUI runs them (KSAMPLER): their
    progress callback reports step i of the schedule after its model evaluations. Others (ComfyUI's
    dpm_fast / dpm_adaptive, which choose their own sigmas, UniPC, other packs' samplers) are not
    assumed to."""
    function = getattr(sampler, "sampler_function", None)
    return isinstance(sampler, comfy.samplers.KSAMPLER) and getattr(function, "__module__", None) == _K_DIFFUSION


_K_DIFFUSION = "comfy.k_diffusion.sampling"


def _with_step_reports(args: tuple, kwargs: dict, store_id: int, reports: bool, seen: dict):
    """outer_sample's (args, kwargs) with its callback (argument 5) wrapped so that every step the
    sampler reports also reaches the store (``reports``: only for samplers whose reports count the
    schedule's steps, _reports_schedule_steps), and the latest denoised latent it reports, (step, x0,
    x, total_steps) as ComfyUI's samplers call it, lands in ``seen["x0"]`` (SamplerCustom's
    denoised_output is made of it); the callback given, if any, still gets every call."""
    given = args[5] if len(args) > 5 else kwargs.get("callback")

    def headseg_step_report(step, *rest, **more):
        seen["x0"] = rest[0] if rest else None
        store = _REGISTRY.get(store_id)
        if store is not None and reports:
            try:
                store.step_done(step)
            except Exception as exc:  # recording must never break sampling
                store.fail(exc)
        if given is not None:
            return given(step, *rest, **more)

    if len(args) > 5:
        return (*args[:5], headseg_step_report, *args[6:]), kwargs
    return args, {**kwargs, "callback": headseg_step_report}


def _denoised_latent(executor, x0) -> torch.Tensor | None:
    """The last denoised latent a sampler reported -> that latent as SamplerCustom and SamplerCustomAdvanced
    give it (denoised_output: the guider's model's process_latent_out of it on the CPU), or None (also
    where that fails: a latent this cannot match must not cost the run its recording)."""
    model = getattr(getattr(getattr(executor, "class_obj", None), "model_patcher", None), "model", None)
    if not isinstance(x0, torch.Tensor) or x0.is_nested or not hasattr(model, "process_latent_out"):
        return None
    try:
        return model.process_latent_out(x0.cpu())
    except Exception:
        return None


def _make_outer_sample_wrapper(store_id: int):
    """OUTER_SAMPLE wrapper: (executor, noise, latent_image, sampler, sigmas, ...) marks one sampling run."""

    def headseg_outer_sample(executor, *args, **kwargs):
        store = _REGISTRY.get(store_id)
        if store is None:
            return executor(*args, **kwargs)
        noise = args[0] if len(args) > 0 else kwargs["noise"]
        sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
        reports = _reports_schedule_steps(args[2] if len(args) > 2 else kwargs.get("sampler"))
        # hear the sampler's step reports ('last' then reads fewer sigmas: see StepTracker._step_of) and its
        # last denoised latent (a LATENT of SamplerCustom's denoised_output then finds this run too)
        seen = {}
        args, kwargs = _with_step_reports(args, kwargs, store_id, reports, seen)
        store.begin_run(noise, sigmas, reports_steps=reports)
        try:
            output = executor(*args, **kwargs)
        except BaseException:
            store.abort_run()
            raise
        denoised = None
        try:
            denoised = _denoised_latent(executor, seen.get("x0"))
            store.end_run(output, denoised)
        except Exception as exc:  # recording must never break sampling
            store.fail(exc)
            try:
                store.end_run(output, denoised)  # keeps the failure with this run's latent
            except Exception:
                pass
        return output

    return headseg_outer_sample


def attach_recorder(
    model, positions=POSITIONS, levels: str | None = "all", steps: str = "last", branch: str = "cond",
    keep_runs: int = HISTORY,
):
    """ModelPatcher -> (patched clone, LiveRecording). The input model is never modified.

    positions: any of "down", "middle", "up"; levels: "all" or "0,1,.." (0 = latent grid);
    steps: "last" | "mean" | "N" | "A-B" (0-based); branch: "cond" | "uncond"; keep_runs: the latest
    sampling runs kept (besides the run read last and the newest MAX_KEEP_RUNS runs of the prompt that
    sampled last).
    """
    positions = tuple(positions)
    bad = [p for p in positions if p not in POSITIONS]
    if bad or not positions:
        raise ValueError(f"positions: expected one or more of {list(POSITIONS)}, got {list(positions)}")
    chosen_levels = parse_levels(levels if levels is not None else "all")
    level_set = None if chosen_levels is None else frozenset(chosen_levels)
    step_sel = parse_steps(steps)
    keep_runs = check_keep_runs(keep_runs)
    if branch not in BRANCHES:
        raise ValueError(f"branch: expected 'cond' or 'uncond', got {branch!r}")
    if not hasattr(model, "clone") or not hasattr(model, "get_model_object"):
        raise TypeError(f"model: expected a ComfyUI MODEL (ModelPatcher), got {type(model).__name__}")

    layers = find_self_attention_layers(model.get_model_object("diffusion_model"))
    chosen = [layer for layer in layers if BLOCK_POSITIONS[layer.key.block] in positions]
    if not chosen:
        have = sorted({BLOCK_POSITIONS[layer.key.block] for layer in layers})
        # named by the record node's switches (down / middle / up), e.g. KOALA's UNet has no middle transformer
        raise ValueError(
            f"down/middle/up: this model has self-attention only in {have}, none in {list(positions)}: switch on "
            f"{' or '.join(have)}"
        )

    if level_set is not None:
        have = sorted({layer.level for layer in chosen})
        if not level_set & set(have):
            raise ValueError(
                f"levels: the chosen positions of this model have self-attention at grid levels {have} "
                f"(0 = latent grid), none at {sorted(level_set)}"
            )
        if level_set - set(have):  # e.g. '0,1' on SDXL, whose latent grid has no self-attention: not an error
            log.warning(
                "HeadSeg Record Self-Attention: levels %s: the chosen positions of this model have self-attention "
                "at grid levels %s only; level(s) %s are skipped",
                ",".join(map(str, sorted(level_set))), have, sorted(level_set - set(have)),
            )
    store = _Store(chosen, level_set, step_sel, branch, model_label(model), keep_runs)
    store_id = next(_IDS)
    _REGISTRY[store_id] = store

    patched = model.clone()
    existing = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    fallbacks = {}
    for layer in chosen:
        k = layer.key
        previous = existing.get((k.block, k.number, k.depth))
        full_key = previous is not None
        if previous is None:
            # ComfyUI falls back to a (block, number) key for every depth when no 3-tuple key is set
            previous = existing.get((k.block, k.number))
            fallbacks[k.block, k.number] = previous
        patch = _make_attn1_patch(store_id, k, previous, full_key)
        patched.set_model_attn1_replace(patch, k.block, k.number, k.depth)
    transformer = patched.model_options.setdefault("transformer_options", {})
    transformer[FALLBACKS_KEY] = {**transformer.get(FALLBACKS_KEY, {}), store_id: fallbacks}
    patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _make_outer_sample_wrapper(store_id))
    patched.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, WRAPPER_KEY, _make_predict_noise_wrapper(store_id))
    patched.add_wrapper_with_key(WrappersMP.CALC_COND_BATCH, WRAPPER_KEY, _make_calc_cond_batch_wrapper(store_id))
    return patched, LiveRecording(store, store_id, chosen)
