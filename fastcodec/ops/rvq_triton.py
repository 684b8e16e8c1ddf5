"""The ``triton`` backend of the RVQ ops: host launchers (grid, block sizes, checks) for
``fastcodec.kernels.rvq`` / ``fastcodec.kernels.ema``.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how the CPU tests exercise
the kernels). The kernel modules are imported on first launch, so importing this module costs no
Triton import and ``TRITON_INTERPRET`` can still be set until then.

Block sizes are fixed by shape (no autotuning: every run of a shape uses the same config, so the
reductions sum in the same order and the EMA buffers are bitwise reproducible).
"""
from __future__ import annotations

import torch

from .. import _backend, _devcheck
from .rvq import register_impl

MAX_DIM = 512
_MIN_DOT = 16  # tl.dot needs every dimension >= 16

# Encode tiles by padded dim: (BLOCK_T rows, BLOCK_N codewords, num_warps). fp32 "ieee" tl.dot runs on
# FMA units and keeps a thread's whole operand rows (all BLOCK_D) in registers, next to the residual
# and the quantized sum; these are the largest tiles that ptxas (sm_90, triton 3.9) fits in 255
# registers without spilling: 138 (D<=32), 248 (64), 234 (128), 220 (256) registers a thread.
# D=512 spills 208 bytes a thread even at 16 warps; no GPU dim of EnCodec is that wide.
_ENCODE_TILES = {16: (64, 32, 8), 32: (64, 32, 8), 64: (64, 32, 8), 128: (32, 16, 8), 256: (16, 16, 8),
                 512: (16, 16, 16)}
# The gather kernels (decode, segmented sums) hold 64-bit addresses, masks and sums per element: at
# 16 elements a thread ptxas needs 128-204 registers and does not spill; at 32 it spills.
_GATHER_PER_THREAD = 16

_kernels = None


def _load_kernels():
    global _kernels
    if _kernels is None:
        from ..kernels import ema, rvq

        _kernels = (rvq, ema)
    return _kernels


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _check_device(*tensors: torch.Tensor) -> torch.device:
    dev = tensors[0].device
    for t in tensors[1:]:
        if t.device != dev:
            raise ValueError(f"tensors are on different devices: {t.device} and {dev}")
    if dev.type == "cuda":
        return dev
    if dev.type == "cpu":
        rvq, _ = _load_kernels()
        if type(rvq._rvq_encode_kernel).__name__ != "InterpretedFunction":
            raise ValueError(
                "the triton RVQ kernels got CPU tensors but were not built for the interpreter: set "
                "TRITON_INTERPRET=1 before fastcodec.kernels is first imported, or use CUDA tensors"
            )
        return dev
    raise ValueError(f"the triton RVQ backend runs on CUDA (or CPU under TRITON_INTERPRET=1), got {dev}")


def _check_dim(D: int) -> None:
    if D > MAX_DIM:
        raise ValueError(f"the triton RVQ kernels support dim <= {MAX_DIM}, got {D}")


def _check_float32(name: str, t: torch.Tensor) -> None:
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")


def _sm_count(dev: torch.device) -> int:
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).multi_processor_count
    return 1


def _encode_config(N: int, D: int, sm_count: int) -> dict:
    BLOCK_D = max(_MIN_DOT, _next_pow2(D))
    BLOCK_T, BLOCK_N, num_warps = _ENCODE_TILES[BLOCK_D]
    # small batches: halve the row block (down to 16) until there are >= 2 programs per SM
    while BLOCK_T > _MIN_DOT and _cdiv(N, BLOCK_T) < 2 * sm_count:
        BLOCK_T //= 2
    # num_stages=2 double-buffers the codebook tile in shared memory (8-16 KiB a stage)
    return dict(BLOCK_T=BLOCK_T, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=num_warps, num_stages=2)


def _launch_encode(x: torch.Tensor, codebooks: torch.Tensor, code_norms: torch.Tensor,
                   need_quantized: bool, need_residuals: bool, straight_through: bool = False):
    """x: (B, D, T) -> codes (B, K, T) int64, quantized (B, D, T) or None, residuals (K, B, D, T) or None.

    No finiteness check here (the op does it): NaN rows get in-range codes, never a wild index.
    """
    for name, t in (("x", x), ("codebooks", codebooks), ("code_norms", code_norms)):
        _check_float32(name, t)
    if x.dim() != 3 or codebooks.dim() != 3 or x.shape[1] != codebooks.shape[2]:
        raise ValueError(f"x (B, D, T) and codebooks (K, bins, D) do not match: "
                         f"{tuple(x.shape)}, {tuple(codebooks.shape)}")
    B, D, T = x.shape
    K, bins, _ = codebooks.shape
    if tuple(code_norms.shape) != (K, bins):
        raise ValueError(f"code_norms must be ({K}, {bins}), got {tuple(code_norms.shape)}")
    if not (x.is_contiguous() and codebooks.is_contiguous() and code_norms.is_contiguous()):
        raise ValueError("x, codebooks and code_norms must be contiguous")
    _check_dim(D)
    dev = _check_device(x, codebooks, code_norms)
    codes = torch.empty((B, K, T), dtype=torch.long, device=dev)
    q = torch.empty((B, D, T), dtype=x.dtype, device=dev) if need_quantized else None
    res = torch.empty((K, B, D, T), dtype=x.dtype, device=dev) if need_residuals else None
    if B * T == 0:
        return codes, (q.zero_() if q is not None else None), res
    _encode_rows(x, B, T, D, x.stride(0), x.stride(2), x.stride(1), codebooks, code_norms,
                 codes, codes.stride(0), codes.stride(1), codes.stride(2), q, res, dev, straight_through)
    return codes, q, res


def _encode_rows(x, B, T, D, sxb, sxt, sxd, codebooks, code_norms, codes, scb, sck, sct, q, res, dev,
                 straight_through=False):
    rvq, _ = _load_kernels()
    K, bins, _ = codebooks.shape
    N = B * T
    cfg = _encode_config(N, D, _sm_count(dev))
    grid = (_cdiv(N, cfg["BLOCK_T"]),)
    rvq._rvq_encode_kernel[grid](
        x, codebooks, code_norms, codes,
        q if q is not None else x, res if res is not None else x,
        N, T, D, bins, K,
        sxb, sxt, sxd,
        scb, sck, sct,
        B * D * T,
        WRITE_Q=q is not None, WRITE_RES=res is not None, STRAIGHT_THROUGH=straight_through,
        enable_fp_fusion=False,  # keep audiocraft's separately rounded (|r|^2 - 2 r.e) + |e|^2
        **cfg,
    )


def _decode_config(D: int) -> dict:
    BLOCK_T, BLOCK_D = 32, min(128, _next_pow2(D))
    return dict(BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, num_warps=max(1, BLOCK_T * BLOCK_D // (32 * _GATHER_PER_THREAD)))


def _launch_decode(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """codes: (B, K, T) int64, codebooks: (K, bins, D) -> (B, D, T). Ranges are the op's check."""
    _check_float32("codebooks", codebooks)
    if codes.dtype != torch.long:
        raise TypeError(f"codes must be int64, got {codes.dtype}")
    if codes.dim() != 3 or codebooks.dim() != 3 or codes.shape[1] != codebooks.shape[0]:
        raise ValueError(f"codes (B, K, T) and codebooks (K, bins, D) do not match: "
                         f"{tuple(codes.shape)}, {tuple(codebooks.shape)}")
    if not (codes.is_contiguous() and codebooks.is_contiguous()):
        raise ValueError("codes and codebooks must be contiguous")
    dev = _check_device(codes, codebooks)
    rvq, _ = _load_kernels()
    B, K, T = codes.shape
    _, bins, D = codebooks.shape
    out = torch.empty((B, D, T), dtype=codebooks.dtype, device=dev)
    N = B * T
    if N == 0:
        return out
    cfg = _decode_config(D)
    grid = (_cdiv(N, cfg["BLOCK_T"]), _cdiv(D, cfg["BLOCK_D"]))
    rvq._rvq_decode_kernel[grid](
        codes, codebooks, out, N, T, D, bins, K,
        codes.stride(0), codes.stride(1), codes.stride(2),
        out.stride(0), out.stride(2), out.stride(1),
        enable_fp_fusion=False, **cfg,
    )
    return out


def _segments(codes_kn: torch.Tensor, bins: int):
    """codes_kn: (S, N) int64 -> perm (S, N) rows sorted by code (stable), starts (S, bins + 1)."""
    sorted_codes, perm = torch.sort(codes_kn, dim=1, stable=True)
    bounds = torch.arange(bins + 1, device=codes_kn.device).expand(codes_kn.shape[0], -1).contiguous()
    starts = torch.searchsorted(sorted_codes, bounds)
    return perm.contiguous(), starts.contiguous()


# rows a code's owner adds per step: lane j adds rows j, j+16, ... of the code. Part of the summation
# order, so it is fixed on every device (changing it changes the EMA bits).
_SEG_ROWS = 16


def _segment_config(device_type: str, BLOCK_D: int) -> tuple[int, int]:
    """(codes per program, num_warps) of the segmented sums; the results do not depend on either."""
    if device_type != "cuda":
        return 64, 4  # the interpreter pays ~0.7 ms per program, so few programs
    # the [codes, 16 rows, BLOCK_D] gather tile: 2048 elements (more warps once one code is wider)
    block_c = max(1, 2048 // (_SEG_ROWS * BLOCK_D))
    return block_c, max(4, block_c * _SEG_ROWS * BLOCK_D // (32 * _GATHER_PER_THREAD))


def _normalize_config(device_type: str, bins: int, BLOCK_D: int) -> dict:
    # an elementwise pass after a sum of the layer's cluster sizes in chunks of up to 1024
    block_c = 16 if device_type == "cuda" else 64
    return dict(BLOCK_C=block_c, BLOCK_B=min(1024, _next_pow2(bins)), BLOCK_D=BLOCK_D, num_warps=4)


def _launch_ema(residuals, codes, cluster_size, embed_avg, embed, decay: float, epsilon: float) -> None:
    """In-place EMA of every layer. residuals: (K, B, D, T); codes: (B, K, T);
    cluster_size: (K, bins); embed_avg, embed: (K, bins, D)."""
    for name, t in (("residuals", residuals), ("cluster_size", cluster_size),
                    ("embed_avg", embed_avg), ("embed", embed)):
        _check_float32(name, t)
    K, B, D, T = residuals.shape
    bins = cluster_size.shape[1]
    if (tuple(codes.shape) != (B, K, T) or tuple(cluster_size.shape) != (K, bins)
            or tuple(embed_avg.shape) != (K, bins, D) or tuple(embed.shape) != (K, bins, D)):
        raise ValueError("ema_update shapes do not match: residuals (K, B, D, T), codes (B, K, T), "
                         "cluster_size (K, bins), embed_avg/embed (K, bins, D)")
    if not all(t.is_contiguous() for t in (residuals, codes, cluster_size, embed_avg, embed)):
        raise ValueError("ema_update tensors must be contiguous")
    _check_dim(D)
    dev = _check_device(residuals, codes, cluster_size, embed_avg, embed)
    _, ema = _load_kernels()
    N = B * T
    # one launch sequence for all K layers, no host sync: stable sort and searchsorted on the device, then
    # the segmented-sum update and the normalisation (each gated by a deferred check's error word, if any)
    perm, starts = _segments(codes.transpose(0, 1).reshape(K, N), bins)
    err = _devcheck.active(dev)
    BLOCK_D = _next_pow2(D)
    block_c, num_warps = _segment_config(dev.type, BLOCK_D)
    ema._ema_update_kernel[(_cdiv(bins, block_c), K)](
        residuals, perm, starts, cluster_size, embed_avg,
        N, T, D, bins,
        residuals.stride(0), residuals.stride(1), residuals.stride(3), residuals.stride(2),
        float(decay), float(1.0 - decay), err if err is not None else perm,
        BLOCK_C=block_c, BLOCK_R=_SEG_ROWS, BLOCK_D=BLOCK_D, HAS_ERR=err is not None, num_warps=num_warps,
        enable_fp_fusion=False,  # the kernel places its one fma itself, where torch has it
    )
    cfg = _normalize_config(dev.type, bins, BLOCK_D)
    ema._ema_normalize_kernel[(_cdiv(bins, cfg["BLOCK_C"]), K)](
        cluster_size, embed_avg, embed, bins, D,
        float(epsilon), float(bins * epsilon), err if err is not None else cluster_size,
        HAS_ERR=err is not None, enable_fp_fusion=False, **cfg,
    )


def _launch_kmeans(samples: torch.Tensor, means: torch.Tensor, num_iters: int):
    """Lloyd iterations. samples: (N, D) (any strides), means: (bins, D) -> (means (bins, D), counts (bins,))."""
    _check_float32("samples", samples)
    _check_float32("means", means)
    if samples.dim() != 2 or means.dim() != 2 or samples.shape[1] != means.shape[1]:
        raise ValueError(f"kmeans wants samples (N, D) and means (bins, D), got "
                         f"{tuple(samples.shape)}, {tuple(means.shape)}")
    N, D = samples.shape
    bins = means.shape[0]
    _check_dim(D)
    dev = _check_device(samples, means)
    means = means.clone(memory_format=torch.contiguous_format)
    counts = torch.zeros(bins, dtype=torch.long, device=dev)
    if num_iters == 0 or N == 0:
        return means, counts
    _, ema = _load_kernels()
    codes = torch.empty(N, dtype=torch.long, device=dev)
    BLOCK_D = _next_pow2(D)
    block_c, num_warps = _segment_config(dev.type, BLOCK_D)
    for _ in range(num_iters):
        norms = (means * means).sum(1, keepdim=True).t().contiguous()  # (1, bins)
        # samples as one batch of N rows: row n at n * stride(0), element d at d * stride(1)
        _encode_rows(samples, 1, N, D, 0, samples.stride(0), samples.stride(1), means.view(1, bins, D),
                     norms, codes, 0, 0, 1, None, None, dev)
        perm, starts = _segments(codes.view(1, N), bins)
        ema._kmeans_update_kernel[(_cdiv(bins, block_c),)](
            samples, perm, starts, means, N, D, bins,
            0, samples.stride(0), samples.stride(1),
            BLOCK_C=block_c, BLOCK_R=_SEG_ROWS, BLOCK_D=BLOCK_D, num_warps=num_warps,
            enable_fp_fusion=False,
        )
        counts = starts[0, 1:] - starts[0, :-1]
    return means, counts


@register_impl("rvq_encode", "triton")
def _encode_triton(x, codebooks, code_norms):
    return _launch_encode(x, codebooks, code_norms, False, False)[0]


@register_impl("rvq_quantize", "triton")
def _quantize_triton(x, codebooks, code_norms, need_residuals: bool):
    codes, q, res = _launch_encode(x, codebooks, code_norms, True, need_residuals)
    return codes, q, res if res is not None else x.new_empty(0)


@register_impl("rvq_quantize_train", "triton")
def _quantize_train_triton(x, codebooks, code_norms):
    codes, q, res = _launch_encode(x, codebooks, code_norms, True, True, straight_through=True)
    return codes, q, res


@register_impl("rvq_decode", "triton")
def _decode_triton(codes, codebooks):
    return _launch_decode(codes, codebooks)


@register_impl("ema_update", "triton")
def _ema_triton(residuals, codes, cluster_size, embed_avg, embed, decay: float, epsilon: float):
    _launch_ema(residuals, codes, cluster_size, embed_avg, embed, decay, epsilon)


@register_impl("kmeans", "triton")
def _kmeans_triton(samples, means, num_iters: int):
    return _launch_kmeans(samples, means, num_iters)


_backend.register_probe("rvq", "triton", lambda: _backend.Availability(True))
