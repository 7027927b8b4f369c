"""Per-head PCA of recorded self-attention outputs (paper section 3): [..., N, D] -> [..., N, c].

Every head is reduced separately (centred, top-c principal components), all heads of a layer in
one batched covariance + eigh call (on a GPU: the covariances of every layer of one grid at once,
decomposed on the CPU over torch's threads). Signs are fixed like scikit-learn's ``svd_flip``
(v-based): for each component the loading entry of largest absolute value is positive, so scores
can be compared with ``sklearn.decomposition.PCA(c).fit_transform`` directly.
"""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .numerics import FEATURE_DTYPES, check_one_device, full_float32_matmul, power_of_two_scale
from .recording import LayerKey, NonFiniteLayerError, Recording, layers_text
from .values import is_int


def _check_components(components, D: int, where: str = "") -> int:
    if not is_int(components):
        raise ValueError(f"components must be an int between 1 and the head dimension, got {components!r}")
    if not 1 <= components <= D:
        raise ValueError(
            f"components must be between 1 and the head dimension {D}{where}, got {components}"
        )
    return int(components)


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
    if x.is_floating_point() and x.dtype not in FEATURE_DTYPES:  # float8: too few digits and few kernels
        raise ValueError(f"x must be float16, bfloat16, float32, float64 or integers, got {x.dtype}")
    if x.is_meta:
        raise ValueError("x is on the meta device: it holds no values")
    *lead, N, D = x.shape
    if N < 1 or D < 1:
        raise ValueError(f"x must have N >= 1 samples and D >= 1 features, got shape {tuple(x.shape)}")
    c = _check_components(components, D)
    dtype = _work_dtype(x)
    xg = x.detach().reshape(-1, N, D)  # [G, N, D], G = prod(lead), input dtype
    G = xg.shape[0]
    if G == 0:
        return torch.zeros(*lead, N, c, dtype=dtype, device=x.device)

    with _one_thread():
        scores = _pca_scores(xg, c, dtype)  # [G, N, c]
    return scores.reshape(*lead, N, c)  # [..., N, c]


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype heads are reduced in: float64 for float64 input, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _centred(xg: torch.Tensor, dtype: torch.dtype):
    """[G, N, D] -> (xc [G, N, D] centred in dtype, constant [G] bool, scale [G, 1, 1] float64 or None).

    Heads whose largest |value| lies outside 2**-SCALE_EXP .. 2**SCALE_EXP (numerics.py) are scaled
    by a power of two (exact) for the covariance and scaled back after, so tiny values do not
    underflow in it (float32 squares below ~1e-38 become 0) and large ones do not overflow; such heads
    and integer ones are centred in float64.
    """
    high, low = xg.amax(dim=1), xg.amin(dim=1)  # [G, D] each
    constant = (high == low).all(dim=1)  # [G] heads without any variation
    scale = power_of_two_scale(torch.maximum(high.abs(), low.abs()).amax(dim=1))  # [G] float64, mostly 1
    # rare: bring these heads to |values| ~ 1 by an exact power of two. Integer heads are centred in
    # float64 too: float32 holds integers exactly only up to 2**24, and a spread of a few units about
    # 1e8 would vanish in the conversion
    if bool((scale != 1.0).any()) or not xg.is_floating_point():
        scale = scale[:, None, None]  # [G, 1, 1]
        scaled = xg.double() * scale  # [G, N, D] scaled before centring, so the mean cannot overflow
        xc = scaled - scaled.mean(dim=1, keepdim=True)  # [G, N, D] float64
        # float64 input may have a spread that float64's rounding of the mean swamps (1e-2 about 1e12):
        # a second pass, as below
        xc -= xc.mean(dim=1, keepdim=True)
        return xc.to(dtype), constant, scale  # [G, N, D] centred
    if xg.dtype != dtype:
        # float16 / bfloat16 input, centred in float32; no second pass: its own rounding is coarser than
        # float32's error in the mean. Both ways below give the same bits. On the CPU: one float32 copy,
        # centred in place (mean(dtype=float32) would convert the whole layer a second time inside the
        # mean). On a GPU the mean converts as it reads, while a float32 mean over the tokens takes a
        # temporary of over half the copy: the PCA of SDXL at 1024 x 1024 peaked at 731 MB that way, at
        # 567 MB this way (H200)
        if xg.device.type != "cpu":
            return xg - xg.mean(dim=1, keepdim=True, dtype=dtype), constant, None  # [G, N, D] promoted
        xc = xg.to(dtype)  # [G, N, D]
        xc -= xc.mean(dim=1, keepdim=True)
        return xc, constant, None
    xc = xg - xg.mean(dim=1, keepdim=True)  # [G, N, D] centred (a new tensor: the input is left as it is)
    # float32 or float64 input: the mean's rounding can be a sizeable part of a small spread about a
    # large offset (1e-5 about 1: 1 % of the scores); xc is exact here (close values subtract exactly),
    # so a second pass takes out what is left of the mean
    xc -= xc.mean(dim=1, keepdim=True)  # [G, N, D]
    return xc, constant, None


def _scores(xc: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor, constant: torch.Tensor, scale, c: int):
    """Centred xc [G, N, D] and the eigendecomposition of its covariance (ascending: evals [G, D],
    evecs [G, D, D]) -> [G, N, c] scores on the top-c components in the input's units."""
    D = xc.shape[-1]
    loadings = evecs[..., -c:].flip(-1)  # [G, D, c], columns by decreasing variance
    variances = evals[..., -c:].flip(-1)  # [G, c]

    # svd_flip (v-based): the entry of largest |loading| of each component becomes positive
    pivot = loadings.abs().argmax(dim=1, keepdim=True)  # [G, 1, c]
    signs = torch.sign(loadings.gather(1, pivot))  # [G, 1, c], +-1 (unit vectors have a non-zero entry)
    loadings = loadings * signs  # [G, D, c]

    scores = xc @ loadings  # [G, N, c]

    # Components without variance carry only rounding noise; constant heads carry nothing.
    eps = torch.finfo(xc.dtype).eps
    top = evals[..., -1:].clamp_min(0)  # [G, 1]
    no_variance = variances <= top * (D * eps)  # [G, c]
    no_variance = no_variance | constant[:, None]  # [G, c]
    scores = scores.masked_fill(no_variance[:, None, :], 0.0)  # [G, N, c]
    return scores if scale is None else (scores.double() / scale).to(xc.dtype)  # [G, N, c] in the input's units


def _pca_scores(xg: torch.Tensor, c: int, dtype: torch.dtype) -> torch.Tensor:
    """[G, N, D] -> [G, N, c] centred scores on the top-c components (signs fixed, no-variance zeroed)."""
    xc, constant, scale = _centred(xg, dtype)  # [G, N, D]
    cov = xc.transpose(1, 2) @ xc  # [G, D, D] (unnormalised covariance)
    if not bool(torch.isfinite(cov).all()):  # any NaN/inf in x reaches the covariance
        raise ValueError("x contains NaN or inf values")
    evals, evecs = torch.linalg.eigh(cov)  # ascending: [G, D], [G, D, D]
    return _scores(xc, evals, evecs, constant, scale, c)


@dataclass
class HeadFeatures:
    """Principal-component scores per head: layers[key] is [B, heads, h, w, c] float32."""

    layers: dict[LayerKey, torch.Tensor]
    image_size: tuple[int, int]
    components: int
    # Recording.source() of the recording reduced (what sampled the heads), handed on to the stack and clusters
    source: dict[str, str] | None = dataclasses.field(default=None, repr=False)

    def __repr__(self) -> str:
        # the text ComfyUI writes into the error report of a node that fails with these as input: the layers by
        # dtype and shape (their printed values took about 13 kB per layer, 208 kB for SD2.1)
        return f"HeadFeatures(layers={layers_text(self.layers)}, image_size={self.image_size!r}, components={self.components!r})"

    @property
    def batch_size(self) -> int:
        if not self.layers:
            raise ValueError("HeadFeatures: layers is empty")
        return int(next(iter(self.layers.values())).shape[0])

    @property
    def num_heads(self) -> int:
        """Total number of heads over all layers."""
        return sum(int(t.shape[1]) for t in self.layers.values())

    def to(self, device) -> HeadFeatures:
        """The same features with every layer on ``device`` (layers already there are shared)."""
        return dataclasses.replace(self, layers={key: t.to(device) for key, t in self.layers.items()})

    def checked_batch_size(self) -> int:
        """The batch size B shared by every layer, after checking that each layer is a real floating
        tensor [B, heads, h, w, c] with no empty dimension, all on one device -> ValueError naming the
        layer otherwise."""
        first = None
        for key, t in self.layers.items():
            if not isinstance(t, torch.Tensor) or t.dim() != 5 or t.numel() == 0 or t.dtype not in FEATURE_DTYPES:
                what = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(
                    f"features: layer {key!s} must be a real floating tensor (float16, bfloat16, float32 or "
                    f"float64) [B, heads, h, w, c] with no empty dimension, got {what}"
                )
            first = check_one_device(first, f"layer {key!s}", t, "features", "layer")
        batches = sorted({int(t.shape[0]) for t in self.layers.values()})
        if len(batches) > 1:
            raise ValueError(f"features: the layers must share one batch size, got {batches}")
        return self.batch_size


def recording_pca(rec: Recording, components: int = 8) -> HeadFeatures:
    """Recording of [B, heads, h, w, d] layers -> HeadFeatures of [B, heads, h, w, c] float32 layers.

    On the CPU, layers are reduced in parallel on as many worker threads as torch has intra-op
    threads, each worker on one intra-op thread (the per-head products and eigh calls are too small
    to split); on a GPU the layers of one grid together (_reduce_on_gpu).
    """
    if not isinstance(rec, Recording):
        raise TypeError(f"rec must be a Recording, got {type(rec).__name__}")
    rec.validate(check_finite=False)  # NaN / inf reach the covariance, checked per layer below
    for key, t in rec.layers.items():  # validate leaves at least one layer: a non-int is named here
        components = _check_components(components, int(t.shape[-1]), where=f" of layer {key.name}")

    out_of_range = {}  # key -> [] bool tensor, read once for all layers (one host round trip on a GPU)

    def finish(key: LayerKey, scores: torch.Tensor) -> torch.Tensor:
        """[B*heads, N, c] scores -> [B, heads, h, w, c] float32; notes whether they left float32's range."""
        B, heads, h, w, d = rec.layers[key].shape
        out = scores.reshape(B, heads, h, w, components).to(torch.float32)  # [B, heads, h, w, c]
        # a head beyond float32's range overflows, or a float64 one underflows to zeros; a float32 head near
        # float32's limit can overflow too: a score adds up to d centred values
        bad = ~torch.isfinite(out).all()  # []
        if scores.dtype == torch.float64:
            bad = bad | (scores.reshape(B * heads, -1).any(1) & ~out.reshape(B * heads, -1).any(1)).any()  # [B*heads, N*c]
        out_of_range[key] = bad
        return out

    def reduce(key: LayerKey) -> torch.Tensor:
        """Layer key [B, heads, h, w, d] -> finish's [B, heads, h, w, c] (on the CPU)."""
        t = rec.layers[key]
        B, heads, h, w, d = t.shape
        flat = t.reshape(B, heads, h * w, d)  # [B, heads, N, d]
        try:
            scores = head_pca(flat, components)  # [B, heads, N, c]
        except ValueError:
            raise NonFiniteLayerError(key) from None
        return finish(key, scores.reshape(B * heads, h * w, components))  # [B*heads, N, c]

    if not _on_cpu(rec):
        with full_float32_matmul():
            reduced = _reduce_on_gpu(rec, components, finish)
    else:
        keys = sorted(rec.layers, key=lambda key: -rec.layers[key].numel())  # largest first: balanced workers
        workers = min(torch.get_num_threads(), len(keys))
        with _one_thread():
            if workers > 1:
                with ThreadPoolExecutor(workers) as pool:
                    reduced = dict(zip(keys, pool.map(reduce, keys)))
            else:
                reduced = {key: reduce(key) for key in keys}
    keys = list(rec.layers)  # the recording's layer order: the first layer out of range is named
    for key, bad in zip(keys, torch.stack([out_of_range[key] for key in keys]).tolist()):
        if bad:
            raise ValueError(
                f"Recording: layer {key!s} has values whose principal-component scores lie beyond float32's "
                "range (features are float32): scale it into about 1e-36 .. 1e36"
            )
    layers = {key: reduced[key] for key in keys}
    return HeadFeatures(layers, tuple(rec.image_size), components, rec.source())


def recording_pca_bytes(rec: Recording, components: int, workers: int | None = None) -> int:
    """Bytes recording_pca(rec, components) allocates on the CPU, an upper estimate for heads whose values
    need no power-of-two scaling (_centred; the usual case): the HeadFeatures it returns (float32, 4 bytes
    per component, token and head), and, for each of the ``workers`` largest layers [B, heads, h, w, d]
    reduced at once (default: torch's intra-op threads, as recording_pca), per value of G = B * heads heads
    and N = h * w tokens: its centred copy (d values) and two score tensors (2 * c values) in the working
    dtype (4 bytes; 8 for float64 layers), and a bool per score. Against every tensor allocated on one
    thread (tests/support/peak_memory.py), SD2.1's layers for two 1024x1024 images: 95 MB (estimate 100 MB).
    ValueError, as recording_pca's, for components that are no int from 1 to a layer's head width (the
    estimate grows with them: a memory check would otherwise name the memory, not components)."""
    for key, t in rec.layers.items():
        components = _check_components(components, int(t.shape[-1]), where=f" of layer {key.name}")
    sizes = sorted(
        (
            (int(t.shape[0] * t.shape[1] * t.shape[2] * t.shape[3]), int(t.shape[4]), 8 if t.dtype == torch.float64 else 4)
            for t in rec.layers.values()
        ),
        reverse=True,
    )  # (G * N, d, working bytes per value), largest layer first
    workers = torch.get_num_threads() if workers is None else workers
    features = sum(4 * components * n for n, _, _ in sizes)
    working = sum(n * (w * (d + 2 * components) + components) for n, d, w in sizes[: max(1, workers)])
    return features + working


def _on_cpu(rec: Recording) -> bool:
    return all(t.device.type == "cpu" for t in rec.layers.values())


# Where the eigendecompositions of layers on a GPU run: "cpu" (the covariances travel to the CPU and
# back) or "device" (one batched call for all heads of one head size). On an H200 (torch 2.11) the
# 175 covariances of SD2.1 at 512 x 512 took 132 ms in cuSOLVER's batched eigh (float32; 121 ms
# in float64) and 35-52 ms on one CPU thread, 3.9-4.4 ms on 16 (_eigh_on_cpu); SDXL's 1100 at
# 1024 x 1024 871 ms, 332 ms and 24 ms.
_GPU_EIGH = "cpu"


class _EighPool:
    """Worker threads for _eigh_on_cpu, kept between calls (starting 16 threads costs ~1 ms); a lock
    makes each call use one pool of the size it asked for, from any number of threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pools: dict[int, ThreadPoolExecutor] = {}  # workers -> pool

    def map(self, fn, parts: list) -> list:
        with self._lock:
            pool = self._pools.get(len(parts))
            if pool is None:
                pool = self._pools[len(parts)] = ThreadPoolExecutor(len(parts), thread_name_prefix="headseg-eigh")
            futures = [pool.submit(fn, part) for part in parts]
        return [f.result() for f in futures]


_EIGH_POOL = _EighPool()


def _eigh_on_cpu(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[G, d, d] on the CPU -> eigh's (evals [G, d], evecs [G, d, d]), the batch split over as many
    worker threads as torch has intra-op threads, each on one (a batched eigh runs its matrices one
    after the other on one thread: 175 of 64 x 64 took 35-52 ms there, 3.9-4.4 ms on 16 workers)."""
    workers = min(torch.get_num_threads(), cov.shape[0])
    if workers <= 1:
        return torch.linalg.eigh(cov)
    with _one_thread():
        parts = _EIGH_POOL.map(torch.linalg.eigh, list(cov.tensor_split(workers)))  # workers x [G_w, d, d]: each on one thread
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _reduce_on_gpu(rec: Recording, components: int, finish) -> dict[LayerKey, torch.Tensor]:
    """Layers on a GPU -> {key: finish(key, scores [B*heads, N, c])}. Layers of one token grid, head
    size and dtype are reduced together as one [G, N, d] batch (a few large launches instead of
    dozens of small ones per layer; worker threads would gain nothing there, and torch's lazy
    loading of its GPU linear-algebra library fails when several threads call eigh first at once).
    The covariances of all heads of one head size are decomposed together, on the CPU by default
    (_GPU_EIGH): covariances on the device, eigenvectors on the CPU, scores on the device."""
    groups: dict[tuple, list[LayerKey]] = {}  # (N, d, dtype) -> layers
    for key, t in rec.layers.items():
        B, heads, h, w, d = t.shape
        groups.setdefault((h * w, d, t.dtype), []).append(key)

    def centred(keys):  # -> xc [G, N, d], constant, scale, heads per layer; recomputed when needed,
        # so that centred copies of one grid's layers at a time are held, not of the whole recording
        flat = [rec.layers[key].detach().flatten(0, 1).flatten(1, 2) for key in keys]  # [B*heads, N, d] each
        xg = flat[0] if len(flat) == 1 else torch.cat(flat)  # [G, N, d]
        return (*_centred(xg, _work_dtype(xg)), [f.shape[0] for f in flat])

    by_size: dict[tuple, list] = {}  # (d, work dtype) -> [(keys, heads per layer, covariance [G, d, d])]
    for keys in groups.values():
        xc, _, _, sizes = centred(keys)
        by_size.setdefault((xc.shape[-1], xc.dtype), []).append((keys, sizes, xc.transpose(1, 2) @ xc))  # [G, d, d]
    finite = [torch.isfinite(cov).flatten(1).all(1) for members in by_size.values() for _, _, cov in members]  # [G] each
    finite = torch.cat(finite).cpu()  # [all heads]: a NaN/inf in a head reaches its covariance; one round trip
    layer_sizes = [(key, n) for members in by_size.values() for keys, sizes, _ in members for key, n in zip(keys, sizes)]
    for (key, _), ok in zip(layer_sizes, finite.split([n for _, n in layer_sizes])):
        if not bool(ok.all()):
            raise NonFiniteLayerError(key)
    out = {}
    for members in by_size.values():
        cov = torch.cat([c for _, _, c in members])  # [sum G, d, d]
        if _GPU_EIGH == "cpu":
            evals, evecs = (e.to(cov.device) for e in _eigh_on_cpu(cov.cpu()))  # [sum G, d], [sum G, d, d]
        else:
            evals, evecs = torch.linalg.eigh(cov)  # [sum G, d], [sum G, d, d]
        group_sizes = [c.shape[0] for _, _, c in members]
        for (keys, sizes, _), ev, vec in zip(members, evals.split(group_sizes), evecs.split(group_sizes)):
            xc, constant, scale, _ = centred(keys)
            scores = _scores(xc, ev, vec, constant, scale, components)  # [G, N, c]
            for key, part in zip(keys, scores.split(sizes)):
                out[key] = finish(key, part)
    return out
