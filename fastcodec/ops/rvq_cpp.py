"""The ``cpp`` backend of the RVQ ops: the fused CPU kernels in ``csrc/rvq_cpu.cpp``.

The extension is built lazily (ninja, on the first call or probe, never at import) by
``fastcodec._build.load_extension``. The op bodies in ``ops/rvq.py`` have already checked their
arguments; the C++ checks them again so that a direct call can never read or write out of bounds.
"""
from __future__ import annotations

from types import ModuleType

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .. import _backend
from .._build import load_named
from .rvq import register_impl

EXTENSION = "rvq_cpu"


def extension() -> ModuleType:
    """The built ``rvq_cpu`` extension (builds it on first use; raises ``ExtensionBuildError``)."""
    return load_named(EXTENSION)


_backend.register_probe("rvq", "cpp", _backend.probe_by_loading(extension))


# Codebook tensors that their owner never writes (the quantizer's stacked copy, rebuilt when an embed changes),
# each with its few-rows layout once a call of <= few_rows() rows needed it (``None`` until then). A tensor not
# listed here (any other caller's) is read in place: a cached layout could go stale under an in-place write.
_FEW = WeakIdKeyDictionary()  # by identity: a tensor key must not be compared with ==


def register_immutable_codebooks(codebooks: torch.Tensor) -> None:
    """Let few-row encodes of ``codebooks`` (K, bins, D) reuse a packed copy (4 bytes per weight, built on first
    use): a streamed frame's search then reads contiguous 16-code panels, 4 in flight (several times faster than
    transposing the codes in place; measured: bench/results/design-measurements.md)."""
    _FEW[codebooks] = None


def _few(x: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor | None:
    if x.shape[0] * x.shape[2] > extension().few_rows() or codebooks not in _FEW:
        return None
    packed = _FEW[codebooks]
    if packed is None:
        packed = _FEW[codebooks] = extension().pack_few(codebooks)
    return packed


@register_impl("rvq_quantize", "cpp")
def _quantize_cpp(x: torch.Tensor, codebooks: torch.Tensor, code_norms: torch.Tensor, need_residuals: bool):
    codes, quantized, residuals = extension().encode(x, codebooks, code_norms, True, need_residuals,
                                                     _few(x, codebooks))
    return codes, quantized, residuals


@register_impl("rvq_encode", "cpp")
def _encode_cpp(x: torch.Tensor, codebooks: torch.Tensor, code_norms: torch.Tensor) -> torch.Tensor:
    return extension().encode(x, codebooks, code_norms, False, False, _few(x, codebooks))[0]


@register_impl("rvq_decode", "cpp")
def _decode_cpp(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    return extension().decode(codes, codebooks)


@register_impl("ema_update", "cpp")
def _ema_cpp(residuals, codes, cluster_size, embed_avg, embed, decay: float, epsilon: float) -> None:
    extension().ema_update(residuals, codes, cluster_size, embed_avg, embed, float(decay), float(epsilon))


@register_impl("kmeans", "cpp")
def _kmeans_cpp(samples: torch.Tensor, means: torch.Tensor, num_iters: int):
    # the op allows strided inputs (check_kmeans does not demand contiguity); the kernel reads dense rows
    new_means, counts, _ = extension().kmeans(samples.contiguous(), means.contiguous(), int(num_iters))
    return new_means, counts
