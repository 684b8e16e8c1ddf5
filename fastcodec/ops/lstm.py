"""Fused CPU LSTM (``csrc/lstm_cpu.cpp``): SEANet's multi-layer LSTM, offline and streaming. Inference only.

``y = lstm_cpu(x, weights, num_layers, h, c)`` runs a unidirectional, time-major ``nn.LSTM`` with biases:

- ``x``: (T, B, input_size) float32 on the CPU (strides free along T and B; a copy is made otherwise);
- ``weights``: the flat list in ``nn.LSTM._flat_weights`` order, ``w_ih (4H, I), w_hh (4H, H), b_ih (4H,),
  b_hh (4H,)`` per layer;
- ``h``, ``c``: (num_layers, B, H) float32, unit stride along H (e.g. a transposed (B, num_layers, H)
  state); the initial state (zeros when None), overwritten **in place** with the final state;
- ``y``: (T, B, H), the last layer's h at every step (written into ``out`` when given).

PyTorch's cell in float32: ``gates = x W_ih^T + b_ih + h W_hh^T + b_hh`` (i, f, g, o);
``c' = sigmoid(f) c + sigmoid(i) tanh(g)``, ``h' = sigmoid(o) tanh(c')``. Each gate is summed in one fixed
order, so results are bitwise the same for any thread count, run to run, and whether a sequence goes in one
call or in pieces with the state carried over. NaN propagates as in ATen.

Weights are packed once per change: ``pack`` caches the packed form under the one cache rule of
``fastcodec._cache`` (identity, version and content fingerprint of the weights). For streaming,
``PackedLSTMWeights(lstm).get()`` reads the same cache (inside a stream, version-counted writes only: each
stream verifies the fingerprints when it starts) and ``forward_packed`` calls the extension directly (no
dispatcher, no Python checks: the C++ side still checks everything).
"""
from __future__ import annotations

import threading
import warnings
from types import ModuleType
from typing import Optional, Sequence

import torch
from torch import nn

from .. import _backend, _build, _cache
from .conv import _check_tensor, _describe

EXTENSION = "lstm_cpu"

_ext: Optional[ModuleType] = None
_packed_cache = _cache.TensorCache()
_probe_lock = threading.Lock()
_probe_result: Optional[_backend.Availability] = None
_warned = False


def extension() -> ModuleType:
    """The built ``lstm_cpu`` extension (built on first use; raises ``ExtensionBuildError``)."""
    global _ext
    if _ext is None:
        _ext = _build.load_named(EXTENSION)
    return _ext


def _check_float_cpu(name: str, t) -> None:
    _check_tensor(name, t)
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got {t.device}")


def check_lstm_args(x, weights, num_layers) -> None:
    """``fastcodec::lstm``'s checks for any backend: x a non-empty (T, B, I) float tensor; weights a
    ``_flat_weights`` list of x's dtype and device fitting x (TypeError/ValueError naming the argument)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 3 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty (time, batch, input_size), got {_describe(x)}")
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"weights must be a list of tensors, got {type(weights).__name__}")
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"weights[{i}] must be a torch.Tensor, got {type(w).__name__}")
        if w.dtype != x.dtype or w.device != x.device:
            raise TypeError(f"weights[{i}] is {w.dtype} on {w.device} but x is {x.dtype} on {x.device}")
    I, _ = check_weights(weights, num_layers, any_float=True)
    if x.shape[2] != I:
        raise ValueError(f"x has input_size {x.shape[2]} but weights[0] (w_ih_l0) expects {I}")


def check_weights(weights: Sequence[torch.Tensor], num_layers: int, any_float: bool = False) -> tuple[int, int]:
    """Check an ``nn.LSTM._flat_weights``-ordered list; returns (input_size, hidden_size)."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int):
        raise TypeError(f"num_layers must be an int, got {type(num_layers).__name__}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if not isinstance(weights, (list, tuple)) or len(weights) != 4 * num_layers:
        got = len(weights) if isinstance(weights, (list, tuple)) else type(weights).__name__
        raise ValueError(f"weights must be a list of 4 * num_layers = {4 * num_layers} tensors "
                         f"(w_ih, w_hh, b_ih, b_hh per layer), got {got}")
    if not any_float:
        for i, w in enumerate(weights):
            _check_float_cpu(f"weights[{i}]", w)
    w_hh = weights[1]
    if w_hh.dim() != 2 or w_hh.shape[1] < 1 or w_hh.shape[0] != 4 * w_hh.shape[1]:
        raise ValueError(f"w_hh_l0 must be (4 * hidden, hidden), got {_describe(w_hh)}")
    H = w_hh.shape[1]
    I = weights[0].shape[1] if weights[0].dim() == 2 else -1
    for l in range(num_layers):
        w_ih, w_hh, b_ih, b_hh = weights[4 * l: 4 * l + 4]
        want_in = I if l == 0 else H
        if w_ih.dim() != 2 or w_ih.shape[0] != 4 * H or w_ih.shape[1] < 1 or w_ih.shape[1] != want_in:
            raise ValueError(f"w_ih_l{l} must be ({4 * H}, {'input_size' if l == 0 else H}), got {_describe(w_ih)}")
        if tuple(w_hh.shape) != (4 * H, H):
            raise ValueError(f"w_hh_l{l} must be ({4 * H}, {H}), got {_describe(w_hh)}")
        for name, b in ((f"b_ih_l{l}", b_ih), (f"b_hh_l{l}", b_hh)):
            if tuple(b.shape) != (4 * H,):
                raise ValueError(f"{name} must be ({4 * H},), got {_describe(b)}")
    return I, H


def pack(weights: Sequence[torch.Tensor], num_layers: int) -> list[torch.Tensor]:
    """The packed weights ``forward_packed`` takes (3 tensors per layer), cached per weight change."""
    check_weights(weights, num_layers)
    ws = tuple(weights)

    def make():
        with torch.inference_mode(False), torch.no_grad():
            return extension().pack([w.detach() for w in ws], num_layers)

    return _packed_cache.get(ws, make, ("lstm", num_layers))


class PackedLSTMWeights:
    """An ``nn.LSTM``'s packed weights for the streaming step (``pack``'s cache, read through the module's
    current parameters, so replaced Parameter objects are seen)."""

    def __init__(self, lstm: nn.LSTM):
        if lstm.bidirectional or lstm.batch_first or lstm.proj_size or not lstm.bias:
            raise ValueError("only a unidirectional, time-major nn.LSTM with biases and no projection is supported")
        self.params = lstm._parameters
        self.names = list(lstm._flat_weights_names)
        self.num_layers = lstm.num_layers
        self.memo = _cache.Memo()

    def get(self) -> list[torch.Tensor]:
        ts = tuple(self.params[n] for n in self.names)

        def make():
            check_weights(ts, self.num_layers)
            with torch.inference_mode(False), torch.no_grad():
                return extension().pack([t.detach() for t in ts], self.num_layers)

        return self.memo.get(_packed_cache, ts, make, ("lstm", self.num_layers))


def forward_packed(x: torch.Tensor, packed: list[torch.Tensor], h: torch.Tensor, c: torch.Tensor,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The extension call itself: ``y (T, B, H)``; ``h``, ``c`` (L, B, H) updated in place. Checked in C++
    only (ValueError/TypeError on bad input); ``x`` needs unit stride along its last dim."""
    return (_ext or extension()).forward(x, packed, h, c, out)


def _check_state(name: str, s, num_layers: int, batch: int, hidden: int) -> None:
    _check_float_cpu(name, s)
    if tuple(s.shape) != (num_layers, batch, hidden):
        raise ValueError(f"{name} must be (num_layers, batch, hidden) = {(num_layers, batch, hidden)}, got {_describe(s)}")
    if s.stride(2) != 1 and hidden != 1:
        raise ValueError(f"{name} is updated in place and needs unit stride along hidden, got strides {s.stride()}")


def lstm_cpu(x: torch.Tensor, weights: Sequence[torch.Tensor], num_layers: int, h: Optional[torch.Tensor] = None,
             c: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``y (T, B, H)`` for ``x (T, B, I)`` from the state ``h``, ``c`` (L, B, H) (zeros when None), which
    is overwritten with the final state. See the module docstring. No autograd."""
    _check_float_cpu("x", x)
    I, H = check_weights(weights, num_layers)
    if x.dim() != 3:
        raise ValueError(f"x must be (time, batch, input_size), got {_describe(x)}")
    if x.numel() == 0:
        raise ValueError(f"x is empty: {_describe(x)} (time, batch and input_size must be >= 1)")
    if x.shape[2] != I:
        raise ValueError(f"x has input_size {x.shape[2]} but w_ih_l0 expects {I}")
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        raise ValueError("lstm_cpu has no autograd; call it under torch.no_grad() or use fastcodec::lstm / nn.LSTM")
    T, B = x.shape[0], x.shape[1]
    if h is None:
        h = x.new_zeros(num_layers, B, H)
    if c is None:
        c = x.new_zeros(num_layers, B, H)
    _check_state("h", h, num_layers, B, H)
    _check_state("c", c, num_layers, B, H)
    if out is not None:
        _check_float_cpu("out", out)
        if tuple(out.shape) != (T, B, H) or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous ({T}, {B}, {H}) tensor, got {_describe(out)}")
    if x.stride(2) != 1:
        x = x.contiguous()
    return extension().forward(x.detach(), pack(weights, num_layers), h.detach(), c.detach(), out)


def _probe() -> _backend.Availability:
    global _probe_result
    with _probe_lock:
        if _probe_result is None:
            _probe_result = _backend.probe_by_loading(extension)()
        return _probe_result


def use_cpp(x: torch.Tensor) -> bool:
    """Whether ``fastcodec::lstm`` runs this kernel for ``x``: float32 CPU tensors when the conv family's
    backend is ``cpp``. A forced ``cpp`` backend whose extension cannot build raises; ``auto`` warns once and
    falls back to ATen's LSTM."""
    global _warned
    if x.device.type != "cpu" or x.dtype != torch.float32 or _backend.choose("conv", x.device) != "cpp":
        return False
    a = _probe()
    if a.ok:
        return True
    if _backend.requested("conv") == "cpp":
        raise _backend.BackendUnavailableError(
            f"FASTCODEC_BACKEND=cpp was forced, but the C++ LSTM cannot run: {a.reason}")
    if not _warned:
        _warned = True
        warnings.warn(f"fastcodec: the C++ LSTM is unavailable, using ATen's: {a.reason}", RuntimeWarning, stacklevel=3)
    return False
