"""Functional building blocks of the residual vector quantizer (plain PyTorch, the oracle's arithmetic).

Layouts follow audiocraft: latents ``z: (batch, dim, time)``, codes ``(batch, n_q, time)`` int64,
stacked codebooks ``(n_q, bins, dim)``. Every function reproduces audiocraft 1.3.0's operations in the
same order and memory layout, so results are bit-identical to it on the same machine; the modules in
``fastcodec.reference.quantization`` are built from these functions.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

__all__ = [
    "rvq_quantize",
    "rvq_dequantize",
    "init_codebooks",
    "commitment_loss",
    "nearest_codes",
    "kmeans",
    "lloyd",
    "sample_vectors",
    "laplace_smoothing",
    "ema_update_",
    "orthogonal_loss",
]


def _desc(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


def check_latent(x, dim: int, dtype: torch.dtype, device: torch.device, name: str = "x", finite: bool = True) -> None:
    """Raise TypeError/ValueError unless ``x`` is a finite (batch >= 1, dim, time >= 1) float tensor
    with the codebooks' dtype and device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dtype != dtype:
        raise TypeError(f"{name} is {x.dtype} but the codebooks are {dtype}: convert one of them")
    if x.dim() != 3:
        raise ValueError(f"{name} must be (batch, dim={dim}, time), got {_desc(x)}")
    if x.shape[1] != dim:
        raise ValueError(f"{name} has {x.shape[1]} channels but the codebooks have dim {dim}: {_desc(x)}")
    if x.shape[0] == 0 or x.shape[2] == 0:
        raise ValueError(f"{name} is empty: {_desc(x)} (batch and time must be >= 1)")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the codebooks are on {device}")
    if finite and not bool(torch.isfinite(x).all()):  # finite=False: the caller checks it asynchronously
        raise ValueError(f"{name} contains NaN or Inf: the nearest codeword is undefined")


def check_codes(codes, max_codebooks: int, bins: int, device: torch.device) -> torch.Tensor:
    """Validate codes (batch >= 1, 1 <= n_q <= max_codebooks, time >= 1) with values in [0, bins);
    return them as int64 (other integer dtypes are converted)."""
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor (int64 preferred), got {codes.dtype}")
    if codes.dim() != 3:
        raise ValueError(f"codes must be (batch, n_q, time), got {_desc(codes)}")
    if not 1 <= codes.shape[1] <= max_codebooks:
        raise ValueError(f"codes have {codes.shape[1]} codebooks; expected 1 to {max_codebooks}: {_desc(codes)}")
    if codes.shape[0] == 0 or codes.shape[2] == 0:
        raise ValueError(f"codes are empty: {_desc(codes)} (batch and time must be >= 1)")
    if codes.device != device:
        raise ValueError(f"codes are on {codes.device} but the codebooks are on {device}")
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= bins:
        raise ValueError(f"codes out of range: found values in [{lo}, {hi}], allowed [0, {bins})")
    return codes.long()


def check_codebooks(codebooks) -> None:
    """Raise unless ``codebooks`` is a non-empty floating-point (n_q, bins, dim) tensor."""
    if not isinstance(codebooks, torch.Tensor):
        raise TypeError(f"codebooks must be a torch.Tensor, got {type(codebooks).__name__}")
    if not codebooks.is_floating_point():
        raise TypeError(f"codebooks must be a floating-point tensor, got {codebooks.dtype}")
    if codebooks.dim() != 3 or 0 in codebooks.shape:
        raise ValueError(f"codebooks must be a non-empty (n_q, bins, dim) tensor, got {_desc(codebooks)}")


def check_frame_rate(frame_rate) -> None:
    if isinstance(frame_rate, bool) or not isinstance(frame_rate, numbers.Real):
        raise TypeError(f"frame_rate must be a number (frames per second), got {type(frame_rate).__name__}")
    if not (math.isfinite(frame_rate) and frame_rate > 0):
        raise ValueError(f"frame_rate must be a finite number > 0, got {frame_rate}")


def sample_vectors(samples: torch.Tensor, num: int) -> torch.Tensor:
    """``num`` rows of ``samples: (N, D)`` drawn with torch's RNG -> (num, D).

    Without replacement (``randperm``) when N >= num, else with replacement (``randint``): the draw
    consumes the generator exactly as audiocraft does.
    """
    n = samples.shape[0]
    if n >= num:
        idx = torch.randperm(n, device=samples.device)[:num]
    else:
        idx = torch.randint(0, n, (num,), device=samples.device)
    return samples[idx]


def kmeans(samples: torch.Tensor, num_clusters: int, num_iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """audiocraft's k-means: means sampled from ``samples: (N, D)``, then ``num_iters`` Lloyd steps.

    Returns means (num_clusters, D) and the bucket counts of the last step (num_clusters,) int64
    (all zeros when ``num_iters == 0``). An empty cluster keeps its previous mean.
    """
    return lloyd(samples, sample_vectors(samples, num_clusters), num_iters)


def lloyd(samples: torch.Tensor, means: torch.Tensor, num_iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_iters`` of audiocraft's Lloyd steps from ``means: (C, D)`` over ``samples: (N, D)``.

    Returns the means (C, D) and the bucket counts of the last step (C,) int64 (zeros if no step).
    """
    num_clusters, dim = means.shape
    counts = torch.zeros(num_clusters, dtype=torch.long, device=samples.device)
    for _ in range(num_iters):
        # [N, C, D] differences: exact squared distances, as audiocraft (no expanded formula here)
        dists = -((samples.unsqueeze(1) - means.unsqueeze(0)) ** 2).sum(dim=-1)
        buckets = dists.max(dim=-1).indices
        counts = torch.bincount(buckets, minlength=num_clusters)
        empty = counts == 0
        sums = buckets.new_zeros(num_clusters, dim, dtype=samples.dtype)
        sums.scatter_add_(0, buckets.unsqueeze(1).expand(-1, dim), samples)
        new_means = sums / counts.masked_fill(empty, 1)[..., None]
        means = torch.where(empty[..., None], means, new_means)
    return means, counts


def nearest_codes(x: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codeword for each row. x: (N, D), embed: (bins, D) -> (N,) int64.

    argmax of ``-(|x|^2 - 2 x.e + |e|^2)`` computed as audiocraft does (same ops, same layouts, so
    bit-identical); torch.max returns the first maximum, so ties go to the lowest index.
    """
    embed_t = embed.t()
    dist = -(x.pow(2).sum(1, keepdim=True) - 2 * x @ embed_t + embed_t.pow(2).sum(0, keepdim=True))
    return dist.max(dim=-1).indices


def laplace_smoothing(x: torch.Tensor, n_categories: int, epsilon: float) -> torch.Tensor:
    """``(x + eps) / (sum(x) + n * eps)``: cluster frequencies with no zero entry. x: (bins,)."""
    return (x + epsilon) / (x.sum() + n_categories * epsilon)


@torch.no_grad()
def ema_update_(
    x: torch.Tensor,
    codes: torch.Tensor,
    cluster_size: torch.Tensor,
    embed_avg: torch.Tensor,
    embed: torch.Tensor,
    decay: float,
    epsilon: float,
) -> None:
    """One EMA codebook step, in place. x: (N, D) the layer input; codes: (N,) int64;
    cluster_size: (bins,); embed_avg, embed: (bins, D).

    ``cluster_size <- decay * cluster_size + (1 - decay) * counts``, the same for ``embed_avg`` with
    ``embed_sum = x^T onehot`` (a GEMM with the one-hot, as audiocraft: its summation order is part of
    the result's bits), then ``embed = embed_avg / (laplace(cluster_size) * sum(cluster_size))``.
    """
    bins = cluster_size.shape[0]
    onehot = F.one_hot(codes, bins).type(x.dtype)
    cluster_size.data.mul_(decay).add_(onehot.sum(0), alpha=1 - decay)
    embed_sum = x.t() @ onehot
    embed_avg.data.mul_(decay).add_(embed_sum.t(), alpha=1 - decay)
    smoothed = laplace_smoothing(cluster_size, bins, epsilon) * cluster_size.sum()
    embed.data.copy_(embed_avg / smoothed.unsqueeze(1))


def orthogonal_loss(codes: torch.Tensor) -> torch.Tensor:
    """Orthogonal regularisation (eq. 2 of arXiv:2112.00384) of codewords (n, D) -> scalar:
    mean over n x n of (cosine similarity - identity)^2."""
    n = codes.shape[0]
    normed = F.normalize(codes, p=2, dim=-1)
    identity = torch.eye(n, device=codes.device)
    cosine = torch.einsum("id,jd->ij", normed, normed)
    return ((cosine - identity) ** 2).sum() / (n**2)


def commitment_loss(z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """MSE between ``z`` and its quantization, gradient to ``z`` only -> scalar.

    z, z_q: the same shape (a layer's input and its quantized value). The quantizer's penalty is the
    mean of this over the layers, each taken on that layer's residual input.
    """
    if not isinstance(z, torch.Tensor) or not isinstance(z_q, torch.Tensor):
        raise TypeError("commitment_loss takes two tensors")
    if z.shape != z_q.shape:
        raise ValueError(f"commitment_loss: z {_desc(z)} and z_q {_desc(z_q)} must have the same shape")
    if not (z.is_floating_point() and z_q.is_floating_point()):
        raise TypeError(f"commitment_loss wants floating-point tensors, got {z.dtype} and {z_q.dtype}")
    return F.mse_loss(z_q.detach(), z)


def _quantize_layer(residual: torch.Tensor, embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # residual: (B, D, T), embed: (bins, D) -> codes (B, T), codewords (B, D, T)
    B, D, T = residual.shape
    codes = nearest_codes(residual.transpose(1, 2).reshape(-1, D), embed).view(B, T)
    return codes, F.embedding(codes, embed).transpose(1, 2)


def rvq_quantize(z: torch.Tensor, codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual quantization (inference: no straight-through, no codebook update).

    z: (B, D, T), codebooks: (K, bins, D) -> z_q (B, D, T) the sum of the chosen codewords,
    accumulated in layer order, and codes (B, K, T) int64. Layer k quantizes ``z - sum_{j<k} q_j``.
    """
    check_codebooks(codebooks)
    check_latent(z, codebooks.shape[2], codebooks.dtype, codebooks.device, "z")
    residual = z
    z_q = 0.0
    codes = []
    for embed in codebooks:
        idx, q = _quantize_layer(residual, embed)
        residual = residual - q
        z_q = z_q + q
        codes.append(idx)
    return z_q, torch.stack(codes, dim=1)


def rvq_dequantize(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Sum of the codewords named by ``codes: (B, K, T)``, K <= n_q, values in [0, bins) -> (B, D, T).

    codebooks: (n_q, bins, D); layer k's codes index ``codebooks[k]``. Integer dtypes other than int64
    are accepted and converted.
    """
    check_codebooks(codebooks)
    codes = check_codes(codes, codebooks.shape[0], codebooks.shape[1], codebooks.device)
    z_q = torch.tensor(0.0, device=codebooks.device)
    for k in range(codes.shape[1]):
        z_q = z_q + F.embedding(codes[:, k], codebooks[k]).transpose(1, 2)
    return z_q


def init_codebooks(
    samples: torch.Tensor, num_codebooks: int, bins: int, iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means initialisation of residual codebooks, layer by layer (audiocraft's algorithm).

    samples: (N, D) vectors or (B, D, T) latents (read as B*T vectors of dimension D).
    Layer k runs ``kmeans`` (``iters`` Lloyd steps, torch's RNG for the initial means) on the residual
    left by layers < k, then subtracts its nearest codewords. Returns codebooks (num_codebooks, bins, D)
    and cluster sizes (num_codebooks, bins) (float, the last k-means step's counts). This is what a fresh
    ``ResidualVectorQuantizer(kmeans_init=True)`` holds after its first forward in eval mode, with the
    same seed (in training mode the residuals pass through the straight-through sum, and EMA follows).
    """
    if not isinstance(samples, torch.Tensor):
        raise TypeError(f"samples must be a torch.Tensor, got {type(samples).__name__}")
    if not samples.is_floating_point():
        raise TypeError(f"samples must be a floating-point tensor, got {samples.dtype}")
    if samples.dim() == 3:
        samples = samples.transpose(1, 2).reshape(-1, samples.shape[1])
    elif samples.dim() == 2:
        samples = samples.contiguous()
    else:
        raise ValueError(f"samples must be (N, D) or (B, D, T), got {_desc(samples)}")
    if 0 in samples.shape:
        raise ValueError(f"samples are empty: {_desc(samples)}")
    if not bool(torch.isfinite(samples).all()):
        raise ValueError("samples contain NaN or Inf")
    for name, v, least in (("num_codebooks", num_codebooks, 1), ("bins", bins, 1), ("iters", iters, 0)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < least:
            raise ValueError(f"{name} must be >= {least}, got {v}")
    residual = samples
    codebooks, sizes = [], []
    for _ in range(num_codebooks):
        means, counts = kmeans(residual, bins, iters)
        residual = residual - F.embedding(nearest_codes(residual, means), means)
        codebooks.append(means)
        sizes.append(counts.to(samples.dtype))
    return torch.stack(codebooks), torch.stack(sizes)
