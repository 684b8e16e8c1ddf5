"""Single-step updates of streamed SEANet layers (csrc/stream_cpu.cpp), in the spirit of causal-conv1d's
``update(x, conv_state)``: ``fastcodec::conv1d_update`` and ``fastcodec::conv_transpose1d_update``.

- ``conv1d_update(x, conv_state, weight, bias, start, n, frames, kernel_size, stride, dilation, elu_alpha, out)``:
  ``conv_state`` (B, C_in, cap), time-major (``stride(2) == C_in``), holds ``n`` valid samples from ``start``.
  ``act(x)`` (x: (B, C_in, T), any strides) is appended after them (the ``n`` samples are first moved to the
  front when the ``T`` new ones would not fit), then, when ``frames > 0``, ``out`` (B, C_out, frames), channel
  stride 1, receives the first ``frames`` outputs of the conv over the valid samples
  (frame f reads samples ``[f * stride, f * stride + (kernel_size - 1) * dilation + 1)``) plus ``bias``.
  The Python entry returns the index of the first valid sample (0 after a move, ``update_start``).
- ``conv_transpose1d_update(x, weight, bias, pending, drop, kernel_size, stride, elu_alpha, out)``: with ``y`` the
  overlap-add of ``act(x)``'s frames plus ``pending`` (B, C_out, kernel_size - stride; no bias), writes ``out``
  (B, C_out, T * stride - drop) = ``y[drop : T * stride] + bias`` and ``pending = y[T * stride :]``.

``weight`` is the panel layout the kernels read (``pack_conv1d_weight`` / ``pack_conv_transpose1d_weight``,
cached by the caller's weight handle). ``act`` is ``ELU(elu_alpha)`` or none. float32 CPU tensors only: the
streaming steps run these where ``fastcodec._backend.choose("streaming", "cpu")`` is ``cpp`` and ATen GEMMs
(``fastcodec.streaming``'s conv seam) elsewhere.

Eager callers (the streaming steps, ~25 calls per 320-sample chunk of the 24 kHz model) run the kernel directly:
the dispatcher's cost per call of a mutating custom op is larger than a step's work
(measured: bench/results/design-measurements.md).
``torch.compile`` and ``torch.library.opcheck`` see the registered ops, whose fake kernels give the same shapes.
"""
from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch

from .. import _backend, _build

EXTENSION = "stream_cpu"
_ext: Optional[ModuleType] = None


def extension() -> ModuleType:
    """The built ``stream_cpu`` extension (built on first use; raises ``ExtensionBuildError``)."""
    global _ext
    if _ext is None:
        _ext = _build.load_named(EXTENSION)
    return _ext


_backend.register_probe("streaming", "cpp", _backend.probe_by_loading(extension))


def panel_width(n: int) -> int:
    """Output columns per weight panel: up to 64 (4 AVX-512 vectors, 24 accumulators at 6 frames), fewer for
    narrow layers so no lane computes padding only."""
    return 16 * min(4, -(-n // 16))


def pack_panels(w2d: torch.Tensor) -> torch.Tensor:
    """A (K, N) weight (rows: reduction, columns: outputs) in the kernels' panels (ceil(N / nw), K, nw)."""
    return extension().pack_panels(w2d, panel_width(w2d.shape[1]))


def pack_conv1d_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, k) -> (C_out, k * C_in), columns ordered (tap, channel) like the time-major im2col."""
    return weight.permute(0, 2, 1).reshape(weight.shape[0], -1).contiguous()


def pack_conv_transpose1d_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C_in, C_out, k) -> (C_in, k * C_out), columns ordered (tap, channel).

    (K, N) layout: MKL reads the K = C_in by N = stride * C_in GEMV 1.7x faster this way than as (N, K)."""
    return weight.permute(0, 2, 1).reshape(weight.shape[0], -1).contiguous()


def update_start(cap: int, start: int, n: int, t: int) -> int:
    """Where the valid samples of a conv state begin after ``conv1d_update`` appended ``t`` samples."""
    return 0 if start + n + t > cap else start


@torch.library.custom_op("fastcodec::conv1d_update", mutates_args=("conv_state", "out"))
def conv1d_update_op(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     start: int, n: int, frames: int, kernel_size: int, stride: int, dilation: int,
                     elu_alpha: Optional[float], out: torch.Tensor) -> None:
    """See the module docstring (``out`` may be (B, C_out, 0) when ``frames`` is 0). The new start is
    ``update_start(cap, start, n, T)`` (an op that mutates cannot also return it under functionalization)."""
    _backend.choose("streaming", x.device)  # raises with the reason where the kernels cannot run
    extension().conv_push(conv_state, x, start, n, elu_alpha, frames, kernel_size, stride, dilation, weight, bias, out)


@conv1d_update_op.register_fake
def _(x, conv_state, weight, bias, start, n, frames, kernel_size, stride, dilation, elu_alpha, out):
    return None


@torch.library.custom_op("fastcodec::conv_transpose1d_update", mutates_args=("pending", "out"))
def conv_transpose1d_update_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                               pending: torch.Tensor, drop: int, kernel_size: int, stride: int,
                               elu_alpha: Optional[float], out: torch.Tensor) -> None:
    """See the module docstring."""
    _backend.choose("streaming", x.device)
    extension().convtr_push(x, elu_alpha, kernel_size, stride, weight, bias, pending, drop, out)


@conv_transpose1d_update_op.register_fake
def _(x, weight, bias, pending, drop, kernel_size, stride, elu_alpha, out):
    return None


def conv1d_update(x, conv_state, weight, bias, start, n, frames, kernel_size, stride, dilation, elu_alpha, out):
    """``fastcodec::conv1d_update`` (see the module docstring); eager calls skip the dispatcher."""
    if torch.compiler.is_compiling():
        if out is None:
            out = x.new_empty((x.shape[0], bias.shape[0] if bias is not None else 0, 0))
        conv1d_update_op(x, conv_state, weight, bias, start, n, frames, kernel_size, stride, dilation, elu_alpha, out)
        return update_start(conv_state.shape[2], start, n, x.shape[2])
    return (_ext or extension()).conv_push(conv_state, x, start, n, elu_alpha, frames, kernel_size, stride, dilation,
                                           weight, bias, out)


def conv_transpose1d_update(x, weight, bias, pending, drop, kernel_size, stride, elu_alpha, out) -> None:
    """``fastcodec::conv_transpose1d_update`` (see the module docstring); eager calls skip the dispatcher."""
    if torch.compiler.is_compiling():
        return conv_transpose1d_update_op(x, weight, bias, pending, drop, kernel_size, stride, elu_alpha, out)
    (_ext or extension()).convtr_push(x, elu_alpha, kernel_size, stride, weight, bias, pending, drop, out)
