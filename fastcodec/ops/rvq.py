"""RVQ ops: ``fastcodec::rvq_encode``, ``rvq_quantize``, ``rvq_decode``, ``ema_update``, ``kmeans``.

Layouts follow audiocraft (``x``: ``(batch, dim, time)``; codes ``(batch, n_q, time)``), so the
module never transposes. Codebooks of all layers are stacked: ``codebooks: (n_q, bins, dim)``,
``code_norms: (n_q, bins)`` (``|e|^2``, computed once per codebook change by the caller).

Each op is an opaque ``torch.library.custom_op`` with a fake kernel. The body asks
``fastcodec._backend.choose("rvq", device)`` which implementation runs and calls it from
``IMPLS[(op, backend)]``; backends register themselves there (``rvq_cpp.py``, ``rvq_triton.py``).
The ``reference`` implementations below are plain PyTorch, follow audiocraft's arithmetic, and are
what the other backends are tested against.
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import _backend
from ..reference import functional as Fq
from ._checks import check_codebooks, check_codes, check_same_device, check_x

IMPLS: dict[tuple[str, str], Callable] = {}


def register_impl(op: str, backend: str):
    def deco(fn):
        IMPLS[(op, backend)] = fn
        return fn

    return deco


def _impl(op: str, device: torch.device) -> Callable:
    b = _backend.choose("rvq", device)
    fn = IMPLS.get((op, b))
    if fn is None:
        # a backend that passed its probe must implement every op: never fall back silently
        raise _backend.BackendUnavailableError(f"backend {b!r} does not implement fastcodec::{op}")
    return fn


# ---------------------------------------------------------------------------------------------
# reference implementations (the oracle for every other backend)
# ---------------------------------------------------------------------------------------------


@register_impl("rvq_quantize", "reference")
def _quantize_ref(x, codebooks, code_norms, need_residuals: bool):
    # the functional reference, layer by layer (bit-identical to audiocraft); code_norms are not needed
    B, D, T = x.shape
    residual, q_out, codes, res = x, None, [], []
    for embed in codebooks:
        if need_residuals:
            res.append(residual)
        idx, q = Fq._quantize_layer(residual, embed)
        residual = residual - q
        q_out = q if q_out is None else q_out + q
        codes.append(idx)
    residuals = torch.stack(res).contiguous() if need_residuals else x.new_empty(0)
    return torch.stack(codes, dim=1), q_out.contiguous(), residuals


@register_impl("rvq_quantize_train", "reference")
def _quantize_train_ref(x, codebooks, code_norms):
    # audiocraft's training arithmetic: layer k's value is r + (e - r), which the next residual subtracts
    residual, q_out, codes, res = x, None, [], []
    for embed in codebooks:
        res.append(residual)
        idx, q = Fq._quantize_layer(residual, embed)
        q = residual + (q - residual)
        residual = residual - q
        q_out = q if q_out is None else q_out + q
        codes.append(idx)
    return torch.stack(codes, dim=1), q_out.contiguous(), torch.stack(res).contiguous()


# the C++ training step runs layer by layer (fastcodec/quantization.py); this op is the GPU step's
IMPLS[("rvq_quantize_train", "cpp")] = _quantize_train_ref


@register_impl("rvq_encode", "reference")
def _encode_ref(x, codebooks, code_norms):
    return _quantize_ref(x, codebooks, code_norms, False)[0]


@register_impl("rvq_decode", "reference")
def _decode_ref(codes, codebooks):
    return Fq.rvq_dequantize(codes, codebooks).contiguous()


@register_impl("ema_update", "reference")
def _ema_ref(residuals, codes, cluster_size, embed_avg, embed, decay: float, epsilon: float):
    K, B, D, T = residuals.shape
    for k in range(K):
        x = residuals[k].transpose(1, 2).reshape(B * T, D)
        Fq.ema_update_(x, codes[:, k].reshape(-1), cluster_size[k], embed_avg[k], embed[k], decay, epsilon)


@register_impl("kmeans", "reference")
def _kmeans_ref(samples, means, num_iters: int):
    means, counts = Fq.lloyd(samples, means, num_iters)
    return means.clone(), counts  # custom ops may not return their input (num_iters == 0)


# ---------------------------------------------------------------------------------------------
# custom ops
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fastcodec::rvq_encode", mutates_args=())
def rvq_encode(x: torch.Tensor, codebooks: torch.Tensor, code_norms: torch.Tensor) -> torch.Tensor:
    """Nearest-codeword search through all layers. x: (B, D, T) -> codes (B, K, T) int64."""
    check_x(x, codebooks)
    check_codebooks(codebooks, code_norms)
    return _impl("rvq_encode", x.device)(x, codebooks, code_norms)


@rvq_encode.register_fake
def _(x, codebooks, code_norms):
    check_same_device("rvq_encode", x=x, codebooks=codebooks, code_norms=code_norms)
    return x.new_empty((x.shape[0], codebooks.shape[0], x.shape[2]), dtype=torch.long)


@torch.library.custom_op("fastcodec::rvq_quantize", mutates_args=())
def rvq_quantize(
    x: torch.Tensor, codebooks: torch.Tensor, code_norms: torch.Tensor, need_residuals: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode and sum the chosen codewords.

    Returns codes (B, K, T) int64, quantized (B, D, T) = sum over layers of the chosen codewords
    (accumulated in layer order, as audiocraft does) and, if ``need_residuals``, the input of every
    layer (K, B, D, T) (else an empty tensor).
    """
    check_x(x, codebooks)
    check_codebooks(codebooks, code_norms)
    return _impl("rvq_quantize", x.device)(x, codebooks, code_norms, need_residuals)


@rvq_quantize.register_fake
def _(x, codebooks, code_norms, need_residuals):
    check_same_device("rvq_quantize", x=x, codebooks=codebooks, code_norms=code_norms)
    B, D, T = x.shape
    K = codebooks.shape[0]
    res = x.new_empty((K, B, D, T)) if need_residuals else x.new_empty(0)
    return x.new_empty((B, K, T), dtype=torch.long), x.new_empty((B, D, T)), res


@torch.library.custom_op("fastcodec::rvq_quantize_train", mutates_args=())
def rvq_quantize_train(
    x: torch.Tensor, codebooks: torch.Tensor, code_norms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rvq_quantize`` with audiocraft's training arithmetic (every layer's value is the straight-through
    ``r + (e - r)``, which the next residual subtracts): codes (B, K, T), the sum of those values (B, D, T),
    and every layer's input (K, B, D, T), for the fused training step."""
    check_x(x, codebooks)
    check_codebooks(codebooks, code_norms)
    return _impl("rvq_quantize_train", x.device)(x, codebooks, code_norms)


@rvq_quantize_train.register_fake
def _(x, codebooks, code_norms):
    B, D, T = x.shape
    K = codebooks.shape[0]
    return x.new_empty((B, K, T), dtype=torch.long), x.new_empty((B, D, T)), x.new_empty((K, B, D, T))


@torch.library.custom_op("fastcodec::rvq_decode", mutates_args=())
def rvq_decode(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Sum of codewords. codes: (B, K, T) int64 in [0, bins) -> (B, D, T)."""
    check_codes(codes, codebooks)
    return _impl("rvq_decode", codes.device)(codes, codebooks)


@rvq_decode.register_fake
def _(codes, codebooks):
    check_same_device("rvq_decode", codes=codes, codebooks=codebooks)
    return codebooks.new_empty((codes.shape[0], codebooks.shape[2], codes.shape[2]))


@torch.library.custom_op(
    "fastcodec::ema_update", mutates_args=("cluster_size", "embed_avg", "embed")
)
def ema_update(
    residuals: torch.Tensor,
    codes: torch.Tensor,
    cluster_size: torch.Tensor,
    embed_avg: torch.Tensor,
    embed: torch.Tensor,
    decay: float,
    epsilon: float,
) -> None:
    """EMA codebook update of every layer, in place and deterministic.

    residuals: (K, B, D, T) the input of each layer; codes: (B, K, T); cluster_size: (K, bins);
    embed_avg, embed: (K, bins, D). Per layer k: counts and ``embed_sum = x^T onehot`` (without a
    one-hot), ``cluster_size = decay*cluster_size + (1-decay)*counts``, the same for embed_avg,
    Laplace smoothing, ``embed = embed_avg / smoothed``.
    """
    from ._checks import check_ema

    check_ema(residuals, codes, cluster_size, embed_avg, embed, decay, epsilon)
    _impl("ema_update", residuals.device)(residuals, codes, cluster_size, embed_avg, embed, decay, epsilon)


@ema_update.register_fake
def _(residuals, codes, cluster_size, embed_avg, embed, decay, epsilon):
    check_same_device("ema_update", residuals=residuals, codes=codes, cluster_size=cluster_size,
                      embed_avg=embed_avg, embed=embed)
    return None


@torch.library.custom_op("fastcodec::kmeans", mutates_args=())
def kmeans(samples: torch.Tensor, means: torch.Tensor, num_iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations (audiocraft's) from initial ``means`` (bins, D) over ``samples`` (N, D).

    Returns the final means (bins, D) and the bucket counts of the last iteration (bins,) int64.
    """
    from ._checks import check_kmeans

    check_kmeans(samples, means, num_iters)
    return _impl("kmeans", samples.device)(samples, means, num_iters)


@kmeans.register_fake
def _(samples, means, num_iters):
    check_same_device("kmeans", samples=samples, means=means)
    return means.new_empty(means.shape), means.new_empty((means.shape[0],), dtype=torch.long)

