"""Independent reference for recorded heads: each layer's input and weights, recomputed in float64.

``AttentionProbe`` finds the self-attention modules by their parameter names (not through the
recorder), puts a forward pre-hook on each attn1.to_q (the projection of the layer's own input, which
runs whether or not a replace patch is installed) and logs, per call, the input, the to_q/to_k/to_v
weights in effect, the sigma and the CFG chunk layout of the model call (from a UNet function
wrapper). ``per_head`` recomputes softmax(Q K^T / sqrt(d)) V per head in float64.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

_NAME = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(?:(\d+)\.)?\d+\.transformer_blocks\.(\d+)\.attn1$")
_BLOCK = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}


def self_attention_modules(diffusion_model) -> dict[str, torch.nn.Module]:
    """'input.1.0' -> attn1 module, found by module name ('input_blocks.1.1.transformer_blocks.0.attn1')."""
    found = {}
    for name, module in diffusion_model.named_modules():
        m = _NAME.match(name)
        if m:
            block, number, depth = _BLOCK[m.group(1)], m.group(2) or "0", m.group(3)
            found[f"{block}.{int(number)}.{int(depth)}"] = module
    return found


@dataclass
class Call:
    cond_or_uncond: list
    sigma: float
    x: torch.Tensor  # [B_all, N, C] float64: the layer input (after norm1)
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    heads: int
    context: torch.Tensor | None = None  # [B_all, tokens, dim]: the cross-attention context of each chunk


class AttentionProbe:
    """Context manager: logs every self-attention call of ``patcher``'s UNet while sampling with ``patcher``."""

    def __init__(self, patcher):
        self.patcher = patcher
        self.modules = self_attention_modules(patcher.model.diffusion_model)
        self.calls: dict[str, list[Call]] = {name: [] for name in self.modules}
        self._current = None
        self._handles = []

    def _wrapper(self, apply_model, args):
        context = args["c"].get("c_crossattn")
        self._current = (list(args["cond_or_uncond"]), float(args["timestep"].max()), context)
        try:
            return apply_model(args["input"], args["timestep"], **args["c"])
        finally:
            self._current = None

    def __enter__(self):
        self.patcher.set_model_unet_function_wrapper(self._wrapper)
        for name, attn in self.modules.items():
            def hook(module, inputs, name=name, attn=attn):
                cu, sigma, context = self._current
                w = lambda lin: lin.weight.detach().to(torch.float64).clone()  # noqa: E731
                x = inputs[0].detach().to(torch.float64).clone()
                ctx = context.detach().clone() if isinstance(context, torch.Tensor) else None
                self.calls[name].append(
                    Call(cu, sigma, x, w(attn.to_q), w(attn.to_k), w(attn.to_v), attn.heads, ctx)
                )
            self._handles.append(attn.to_q.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.patcher.model_options.pop("model_function_wrapper", None)
        return False

    def branch_calls(self, name: str, branch: int = 0) -> list[Call]:
        return [c for c in self.calls[name] if branch in c.cond_or_uncond]


def per_head(call: Call, grid: tuple[int, int], branch: int = 0) -> torch.Tensor:
    """Call -> [b, heads, h, w, d] float64 = softmax(Q K^T / sqrt(d)) V of the ``branch`` chunk."""
    chunks = len(call.cond_or_uncond)
    b = call.x.shape[0] // chunks
    i = call.cond_or_uncond.index(branch)
    x = call.x[i * b : (i + 1) * b]  # [b, N, C]
    q, k, v = x @ call.wq.T, x @ call.wk.T, x @ call.wv.T  # [b, N, heads*d]
    _, N, inner = q.shape
    H = call.heads
    d = inner // H
    q, k, v = (t.view(b, N, H, d).transpose(1, 2) for t in (q, k, v))  # [b, H, N, d]
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # [b, H, N, N]
    out = p @ v  # [b, H, N, d]
    h, w = grid
    assert h * w == N, (grid, N)
    return out.view(b, H, h, w, d)


def chunk_outputs(call: Call, grid: tuple[int, int], branch: int = 0) -> list:
    """-> [(context [tokens, dim] or None, per_head output [b, heads, h, w, d] float64)], one per chunk
    of ``call`` labelled ``branch`` (several where several conditioning entries share the call)."""
    chunks = len(call.cond_or_uncond)
    b = call.x.shape[0] // chunks
    found = []
    for j, label in enumerate(call.cond_or_uncond):
        if label == branch:
            one = Call([branch], call.sigma, call.x[j * b : (j + 1) * b], call.wq, call.wk, call.wv, call.heads)
            found.append((call.context[j * b] if call.context is not None else None, per_head(one, grid, branch)))
    return found


def grid_for(latent_hw: tuple[int, int], tokens: int) -> tuple[int, int]:
    """The ceil-halved latent grid with ``tokens`` cells."""
    h, w = latent_hw
    while h * w != tokens:
        if h == 1 and w == 1:
            raise AssertionError(f"{tokens} tokens fit no grid of the {latent_hw} latent")
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


def reference(probe: AttentionProbe, name: str, latent_hw, steps: str = "last", branch: int = 0,
              sigmas: list[float] | None = None) -> torch.Tensor:
    """Reference recording of layer ``name``: 'last' = last call holding the branch; 'mean' = mean of all such calls;
    'A-B' = mean over calls whose sigma is one of sigmas[A..B] (first-order samplers)."""
    calls = probe.branch_calls(name, branch)
    assert calls, f"no call of {name} held branch {branch}"
    grid = grid_for(latent_hw, calls[0].x.shape[1])
    if steps == "last":
        return per_head(calls[-1], grid, branch)
    if steps != "mean":
        first, _, last = steps.partition("-")
        wanted = sigmas[int(first) : int(last or first) + 1]
        calls = [c for c in calls if any(abs(c.sigma - s) <= 1e-5 * max(s, 1e-3) for s in wanted)]
        assert calls, f"no call of {name} at sigmas {wanted}"
    return torch.stack([per_head(c, grid, branch) for c in calls]).mean(0)
