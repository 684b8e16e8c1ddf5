"""Argument checks shared by every backend: bad input raises a clear ValueError/TypeError here,
before any kernel can read or write out of bounds."""
from __future__ import annotations

import torch

from .. import _devcheck
from ..reference import functional as Fq

# Largest stride, dilation, padding, trim or kernel span the ops accept: far beyond any codec layer (SEANet
# strides <= 8, spans < 100), and small enough that the work buffers these integers size (the conv's packed rows
# hold c_in x (tile + span / stride) floats, the polyphase weight c_out x stride x c_in x ceil(K / stride)) stay
# bounded whatever a caller passes: 65536 x 512 channels x 4 bytes = 128 MiB at most per thread.
MAX_GEOMETRY = 2**16
# Most Lloyd iterations kmeans runs (audiocraft and encodec use 50): a hostile count must not hang.
MAX_KMEANS_ITERS = 10_000


def _name(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


def check_same_device(op: str, **tensors) -> None:
    """All tensors on one device; the message names each argument and its device."""
    devs = {t.device for t in tensors.values() if isinstance(t, torch.Tensor)}
    if len(devs) > 1:
        named = ", ".join(f"{k} on {t.device}" for k, t in tensors.items() if isinstance(t, torch.Tensor))
        raise ValueError(f"{op}: tensors are on several devices ({named})")


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.device.type != "meta" and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def check_float32(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")


def check_codebooks(codebooks: torch.Tensor, code_norms: torch.Tensor | None = None, name: str = "codebooks") -> None:
    check_float32(name, codebooks)
    if codebooks.dim() != 3:
        raise ValueError(f"{name} must be (n_q, bins, dim), got {_name(codebooks)}")
    K, bins, D = codebooks.shape
    if K == 0 or bins == 0 or D == 0:
        raise ValueError(f"{name} must be non-empty (n_q, bins, dim), got {_name(codebooks)}")
    if not codebooks.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if code_norms is not None:
        check_float32("code_norms", code_norms)
        if tuple(code_norms.shape) != (K, bins) or not code_norms.is_contiguous():
            raise ValueError(f"code_norms must be contiguous ({K}, {bins}), got {_name(code_norms)}")
        if code_norms.device != codebooks.device:
            raise ValueError(f"code_norms is on {code_norms.device} but codebooks on {codebooks.device}")


def check_x(x: torch.Tensor, codebooks: torch.Tensor) -> None:
    """The reference's latent check (shape, emptiness, device, NaN/Inf) for float32, and contiguity."""
    check_codebooks(codebooks)  # first: the latent check reads codebooks.shape[2]
    check_float32("x", x)
    word = _devcheck.active(x.device)  # deferred (GPU training step): NaN/Inf is flagged on the device
    Fq.check_latent(x, codebooks.shape[2], torch.float32, codebooks.device, finite=word is None)
    if word is not None:
        _devcheck.flag(word, ~torch.isfinite(x).all(), _devcheck.X_NONFINITE)
    if not x.is_contiguous():
        raise ValueError("x must be contiguous (call .contiguous())")


def check_codes(codes: torch.Tensor, codebooks: torch.Tensor) -> None:
    """The reference's codes check (shape, emptiness, device, range) for int64 codes of exactly every
    codebook, and contiguity."""
    check_codebooks(codebooks)
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype != torch.long:
        raise TypeError(f"codes must be int64, got {codes.dtype}")
    Fq.check_codes(codes, codebooks.shape[0], codebooks.shape[1], codebooks.device)
    if codes.shape[1] != codebooks.shape[0]:
        raise ValueError(f"codes have {codes.shape[1]} codebooks but {codebooks.shape[0]} were given")
    if not codes.is_contiguous():
        raise ValueError("codes must be contiguous (call .contiguous())")


def check_ema(residuals, codes, cluster_size, embed_avg, embed, decay, epsilon) -> None:
    check_float32("residuals", residuals)
    check_codebooks(embed_avg, name="embed_avg")
    K, bins, D = embed_avg.shape
    if residuals.dim() != 4 or residuals.shape[0] != K or residuals.shape[2] != D:
        raise ValueError(f"residuals must be ({K}, batch, {D}, time), got {_name(residuals)}")
    B, T = residuals.shape[1], residuals.shape[3]
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype != torch.long or tuple(codes.shape) != (B, K, T):
        raise ValueError(f"codes must be int64 ({B}, {K}, {T}), got {_name(codes)}")
    for n, t, shape in (("cluster_size", cluster_size, (K, bins)), ("embed", embed, (K, bins, D))):
        check_float32(n, t)
        if tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"{n} must be contiguous {shape}, got {_name(t)}")
    for n, t in (("residuals", residuals), ("codes", codes)):
        if not t.is_contiguous():
            raise ValueError(f"{n} must be contiguous")
    check_same_device("ema_update", residuals=residuals, codes=codes, cluster_size=cluster_size,
                      embed_avg=embed_avg, embed=embed)
    if not (0.0 <= decay <= 1.0):
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    # NaN/Inf would spread differently through the fused sums than through audiocraft's one-hot matmul
    # (embed is only written: embed_avg / smoothed cluster_size)
    named = (("residuals", residuals), ("cluster_size", cluster_size), ("embed_avg", embed_avg))
    word = _devcheck.active(codes.device)
    if word is not None:  # deferred (GPU training step): flagged on the device, the EMA kernels then write nothing
        bad = torch.stack([~torch.isfinite(t).all() for _, t in named]).any()
        _devcheck.flag(word, bad, _devcheck.EMA_NONFINITE)
    else:
        for n, t in named:
            check_finite(n, t)
    if word is not None and codes.numel():  # deferred; out-of-range rows fall outside every segment anyway
        _devcheck.flag(word, (codes.amin() < 0) | (codes.amax() >= bins), _devcheck.CODES_RANGE)
    elif codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= bins):
        raise ValueError(f"codes out of range [0, {bins})")


def check_kmeans(samples, means, num_iters) -> None:
    check_float32("samples", samples)
    check_float32("means", means)
    if samples.dim() != 2 or means.dim() != 2 or samples.shape[1] != means.shape[1]:
        raise ValueError(f"kmeans wants samples (N, D) and means (bins, D), got {_name(samples)}, {_name(means)}")
    if samples.shape[0] == 0:
        raise ValueError("kmeans got no samples")
    if means.shape[0] == 0 or means.shape[1] == 0:
        raise ValueError(f"means must be a non-empty (bins, D), got {_name(means)}")
    if isinstance(num_iters, bool) or not isinstance(num_iters, int):
        raise TypeError(f"num_iters must be an int, got {type(num_iters).__name__}")
    if not 0 <= num_iters <= MAX_KMEANS_ITERS:
        raise ValueError(f"num_iters must be in [0, {MAX_KMEANS_ITERS}], got {num_iters}")
    if samples.device != means.device:
        raise ValueError("samples and means are on different devices")
    for n, t in (("samples", samples), ("means", means)):
        if t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{n} contains NaN or Inf: the nearest mean is undefined")
