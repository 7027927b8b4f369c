"""Per-head PCA of recorded self-attention outputs (paper section 3): [..., N, D] -> [..., N, c].

Every head is reduced separately (centred, top-c principal components), all heads of a layer in
one batched covariance + eigh call. Signs are fixed like scikit-learn's ``svd_flip`` (v-based): for
each component the loading entry of largest absolute value is positive, so scores can be compared
with ``sklearn.decomposition.PCA(c).fit_transform`` directly.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .recording import LayerKey, Recording, power_of_two_scale


def _check_components(components, D: int, where: str = "") -> int:
    if isinstance(components, bool) or not isinstance(components, int):
        raise ValueError(f"components must be an int between 1 and the head dimension, got {components!r}")
    if not 1 <= components <= D:
        raise ValueError(
            f"components must be between 1 and the head dimension {D}{where}, got {components}"
        )
    return components


@contextmanager
def _one_thread():
    """Runs the block on one intra-op thread: the per-head products and eigh are small, and waking a
    second thread for each of them costs more than it saves."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def head_pca(x: torch.Tensor, components: int) -> torch.Tensor:
    """[..., N, D] -> [..., N, c] scores on the top-c principal components, each leading index separately.

    Centred per leading index (per head); computed in float32, or float64 for float64 input.
    Components are sorted by decreasing variance; the loading entry of largest |value| of each
    component is positive. Zero-variance heads (and components with no variance) give zeros.
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor [..., N, D], got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape [..., N, D] (at least 2-D), got shape {tuple(x.shape)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"x must be a real tensor, got {x.dtype}")
    if x.is_meta:
        raise ValueError("x is on the meta device: it holds no values")
    *lead, N, D = x.shape
    if N < 1 or D < 1:
        raise ValueError(f"x must have N >= 1 samples and D >= 1 features, got shape {tuple(x.shape)}")
    c = _check_components(components, D)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xg = x.detach().reshape(-1, N, D)  # [G, N, D], G = prod(lead), input dtype
    G = xg.shape[0]
    if G == 0:
        return torch.zeros(*lead, N, c, dtype=dtype, device=x.device)

    with _one_thread():
        scores = _pca_scores(xg, c, dtype)  # [G, N, c]
    return scores.reshape(*lead, N, c)  # [..., N, c]


def _pca_scores(xg: torch.Tensor, c: int, dtype: torch.dtype) -> torch.Tensor:
    """[G, N, D] -> [G, N, c] centred scores on the top-c components (signs fixed, no-variance zeroed).

    Heads whose largest |value| lies outside 2**-SCALE_EXP .. 2**SCALE_EXP (recording.py) are scaled
    by a power of two (exact) for the covariance and scaled back after, so tiny values do not
    underflow in it (float32 squares below ~1e-38 become 0) and large ones do not overflow.
    """
    G, N, D = xg.shape
    high, low = xg.amax(dim=1), xg.amin(dim=1)  # [G, D] each
    constant = (high == low).all(dim=1)  # [G] heads without any variation
    scale = power_of_two_scale(torch.maximum(high.abs(), low.abs()).amax(dim=1))  # [G] float64, mostly 1
    if bool((scale != 1.0).any()):  # rare: bring these heads to |values| ~ 1 by an exact power of two
        scale = scale[:, None, None]  # [G, 1, 1]
        scaled = xg.double() * scale  # [G, N, D] scaled before centring, so the mean cannot overflow
        xc = (scaled - scaled.mean(dim=1, keepdim=True)).to(dtype)  # [G, N, D] centred
    else:
        scale = None
        xc = xg - xg.mean(dim=1, keepdim=True, dtype=dtype)  # [G, N, D] centred, promoted to dtype
    cov = xc.transpose(1, 2) @ xc  # [G, D, D] (unnormalised covariance)
    if not bool(torch.isfinite(cov).all()):  # any NaN/inf in x reaches the covariance
        raise ValueError("x contains NaN or inf values")
    evals, evecs = torch.linalg.eigh(cov)  # ascending: [G, D], [G, D, D]
    loadings = evecs[..., -c:].flip(-1)  # [G, D, c], columns by decreasing variance
    variances = evals[..., -c:].flip(-1)  # [G, c]

    # svd_flip (v-based): the entry of largest |loading| of each component becomes positive
    pivot = loadings.abs().argmax(dim=1, keepdim=True)  # [G, 1, c]
    signs = torch.sign(loadings.gather(1, pivot))  # [G, 1, c], +-1 (unit vectors have a non-zero entry)
    loadings = loadings * signs  # [G, D, c]

    scores = xc @ loadings  # [G, N, c]

    # Components without variance carry only rounding noise; constant heads carry nothing.
    eps = torch.finfo(dtype).eps
    top = evals[..., -1:].clamp_min(0)  # [G, 1]
    no_variance = variances <= top * (D * eps)  # [G, c]
    no_variance = no_variance | constant[:, None]  # [G, c]
    scores = scores.masked_fill(no_variance[:, None, :], 0.0)  # [G, N, c]
    return scores if scale is None else (scores.double() / scale).to(dtype)  # [G, N, c] in the input's units


@dataclass
class HeadFeatures:
    """Principal-component scores per head: layers[key] is [B, heads, h, w, c] float32."""

    layers: dict[LayerKey, torch.Tensor]
    image_size: tuple[int, int]
    components: int

    @property
    def batch_size(self) -> int:
        if not self.layers:
            raise ValueError("HeadFeatures: layers is empty")
        return int(next(iter(self.layers.values())).shape[0])

    @property
    def num_heads(self) -> int:
        """Total number of heads over all layers."""
        return sum(int(t.shape[1]) for t in self.layers.values())

    def checked_batch_size(self) -> int:
        """The batch size B shared by every layer, after checking that each layer is a real floating
        tensor [B, heads, h, w, c] with no empty dimension -> ValueError naming the layer otherwise."""
        for key, t in self.layers.items():
            if not isinstance(t, torch.Tensor) or t.dim() != 5 or t.numel() == 0 or not t.is_floating_point():
                what = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(
                    f"features: layer {key!s} must be a real floating tensor [B, heads, h, w, c] with no "
                    f"empty dimension, got {what}"
                )
        batches = sorted({int(t.shape[0]) for t in self.layers.values()})
        if len(batches) > 1:
            raise ValueError(f"features: the layers must share one batch size, got {batches}")
        return self.batch_size


def recording_pca(rec: Recording, components: int = 8) -> HeadFeatures:
    """Recording of [B, heads, h, w, d] layers -> HeadFeatures of [B, heads, h, w, c] float32 layers.

    Layers are reduced in parallel on as many worker threads as torch has intra-op threads, each
    worker on one intra-op thread (the per-head products and eigh calls are too small to split).
    """
    if not isinstance(rec, Recording):
        raise TypeError(f"rec must be a Recording, got {type(rec).__name__}")
    rec.validate(check_finite=False)  # NaN / inf reach the covariance, checked per layer below
    if isinstance(components, bool) or not isinstance(components, int):
        raise ValueError(f"components must be an int between 1 and the head dimension, got {components!r}")
    for key, t in rec.layers.items():
        _check_components(components, int(t.shape[-1]), where=f" of layer {key.name}")

    def reduce(key: LayerKey) -> torch.Tensor:
        t = rec.layers[key]
        B, heads, h, w, d = t.shape
        flat = t.reshape(B, heads, h * w, d)  # [B, heads, N, d]
        try:
            scores = head_pca(flat, components)  # [B, heads, N, c]
        except ValueError:
            raise ValueError(f"Recording: layer {key!s} contains NaN or inf values") from None
        out = scores.reshape(B, heads, h, w, components).to(torch.float32)  # [B, heads, h, w, c]
        if scores.dtype == torch.float64 and not bool(torch.isfinite(out).all() and (out.any() or not scores.any())):
            raise ValueError(
                f"Recording: layer {key!s} has values beyond float32's range (features are float32): scale it "
                f"into about 1e-38 .. 1e38"
            )
        return out

    keys = sorted(rec.layers, key=lambda key: -rec.layers[key].numel())  # largest first: balanced workers
    workers = min(torch.get_num_threads(), len(keys))
    with _one_thread():
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                reduced = dict(zip(keys, pool.map(reduce, keys)))
        else:
            reduced = {key: reduce(key) for key in keys}
    layers = {key: reduced[key] for key in rec.layers}  # the recording's layer order
    return HeadFeatures(layers, tuple(rec.image_size), components)
