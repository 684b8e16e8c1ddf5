"""SEANet's LSTM as ops: ``fastcodec::lstm`` (offline, with its backward), ``fastcodec::lstm_step`` (a stream's
chunk) and the fused CPU kernel behind both (``csrc/lstm_cpu.cpp``, inference only).

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

from types import ModuleType
from typing import Optional, Sequence

import torch
from torch import nn

from .. import _backend, _build, _cache
from ..precision import round_bf16
from .conv import _check_tensor, _describe

EXTENSION = "lstm_cpu"

_ext: Optional[ModuleType] = None
_packed_cache = _cache.TensorCache()


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


def unsupported_reason(lstm: nn.LSTM) -> Optional[str]:
    """Why fastcodec's LSTM paths cannot run ``lstm`` (None when they can): SEANet's is unidirectional,
    time-major, with biases and no projection."""
    if lstm.bidirectional or lstm.batch_first or lstm.proj_size or not lstm.bias:
        return "only the unidirectional, time-major nn.LSTM with biases and no projection (SEANet's) is supported"
    return None


_transposed_cache = _cache.TensorCache()


class PackedLSTMWeights:
    """An ``nn.LSTM``'s weight handle for the steps that run it: ``get()`` the packed weights of the C++ kernel
    (``pack``'s cache), ``transposed()`` the (W_ih^T, W_hh^T, b_ih + b_hh) per layer of the ATen step, both
    read through the module's current parameters (replaced Parameter objects are seen), under the one cache
    rule, with per-stream memos in front."""

    def __init__(self, lstm: nn.LSTM):
        reason = unsupported_reason(lstm)
        if reason is not None:
            raise ValueError(reason)
        self.params = lstm._parameters
        self.names = list(lstm._flat_weights_names)
        self.num_layers = lstm.num_layers
        self.hidden_size = lstm.hidden_size
        self.memo = _cache.Memo()
        self.memo_t = _cache.Memo()
        self.bf16 = False  # precision="bf16": the weight matrices rounded to bf16 (biases stay float32)

    def set_bf16(self, on: bool) -> None:
        if bool(on) != self.bf16:
            self.bf16 = bool(on)
            self.memo, self.memo_t = _cache.Memo(), _cache.Memo()

    def flat(self) -> list[torch.Tensor]:
        """The current parameters in ``nn.LSTM._flat_weights`` order."""
        return [self.params[n] for n in self.names]

    def get(self) -> list[torch.Tensor]:
        ts = tuple(self.params[n] for n in self.names)
        bf16 = self.bf16

        def make():
            check_weights(ts, self.num_layers)
            with torch.inference_mode(False), torch.no_grad():
                return extension().pack(_operands([t.detach() for t in ts], bf16), self.num_layers)

        return self.memo.get(_packed_cache, ts, make, ("lstm", self.num_layers, bf16))

    def transposed(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per layer (W_ih^T, W_hh^T, b_ih + b_hh), contiguous: MKL reads a 1 x 512 x 2048 GEMV 1.8x faster in
        this (K, 4H) layout than as (4H, K)."""
        ts = self.flat()
        bf16 = self.bf16
        return self.memo_t.get(_transposed_cache, ts, lambda: _transpose(_operands(ts, bf16)), (bf16,))


def _operands(ts, bf16: bool) -> list:
    """The flat weights as they multiply: with ``bf16``, W_ih and W_hh rounded to bf16 (biases are added)."""
    if not bf16:
        return list(ts)
    return [round_bf16(t) if i % 4 < 2 else t for i, t in enumerate(ts)]


def _transpose(ts):
    with torch.no_grad(), torch.inference_mode(False):
        return [(w_ih.t().contiguous(), w_hh.t().contiguous(), b_ih + b_hh)
                for w_ih, w_hh, b_ih, b_hh in zip(*[iter(ts)] * 4)]


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


_backend.register_probe("lstm", "cpp", _backend.probe_by_loading(extension))


def use_cpp(x: torch.Tensor) -> bool:
    """Whether the LSTM runs this kernel for ``x``: float32 CPU tensors where the lstm family's backend
    (``fastcodec._backend.choose``: it raises when a forced one cannot run, warns once when auto falls back)
    is ``cpp``."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and _backend.choose("lstm", x.device) == "cpp"


# ---------------------------------------------------------------------------------------------
# fastcodec::lstm: the multi-layer LSTM as an opaque op (dynamo cannot trace nn.LSTM)
# ---------------------------------------------------------------------------------------------


def _lstm_impl(x: torch.Tensor, weights: list[torch.Tensor], num_layers: int) -> torch.Tensor:
    # x: (T, B, C) time-major; weights: [w_ih, w_hh, b_ih, b_hh] per layer
    h0 = x.new_zeros(num_layers, x.shape[1], weights[1].shape[1])
    out = torch._VF.lstm(x, (h0, h0), weights, True, num_layers, 0.0, False, False, False)
    return out[0]


@torch.library.custom_op("fastcodec::lstm", mutates_args=())
def lstm_op(x: torch.Tensor, weights: list[torch.Tensor], num_layers: int) -> torch.Tensor:
    """Multi-layer unidirectional LSTM from zero state. x: (T, B, C) -> (T, B, hidden)."""
    check_lstm_args(x, weights, num_layers)
    if use_cpp(x):  # the fused C++ LSTM (forward only; the backward recomputes with ATen)
        return lstm_cpu(x, weights, num_layers)
    return _lstm_impl(x, weights, num_layers).clone()


@lstm_op.register_fake
def _(x, weights, num_layers):
    check_lstm_args(x, weights, num_layers)
    return x.new_empty((x.shape[0], x.shape[1], weights[1].shape[1]))


def _lstm_setup(ctx, inputs, output):
    x, weights, num_layers = inputs
    ctx.save_for_backward(x, *weights)
    ctx.num_layers = num_layers


@torch.library.custom_op("fastcodec::lstm_backward", mutates_args=())
def lstm_backward_op(grad: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor],
                     num_layers: int) -> list[torch.Tensor]:
    """Gradients [dx, *dweights] of ``lstm_op`` by recomputing ATen's LSTM (an opaque op, so that
    AOTAutograd traces the backward graph instead of an autograd.grad call inside it)."""
    # recompute (the forward kept no graph); torch.func.vjp, since an op body runs below autograd.
    # oneDNN's LSTM (ATen's CPU default) returns a workspace that vjp cannot carry: the native kernel here
    # (torch.backends.mkldnn.flags would also warn about TF32 on every call)
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        _, vjp = torch.func.vjp(lambda xs, ws: _lstm_impl(xs, ws, num_layers), x, list(weights))
        gx, gws = vjp(grad)
    finally:
        torch._C._set_mkldnn_enabled(enabled)
    return [gx, *gws]


@lstm_backward_op.register_fake
def _(grad, x, weights, num_layers):
    return [torch.empty_like(x)] + [torch.empty_like(w) for w in weights]


def _lstm_backward(ctx, grad):
    x, *weights = ctx.saved_tensors
    gx, *gws = lstm_backward_op(grad.contiguous(), x, weights, ctx.num_layers)
    return (gx if x.requires_grad else None), [g if w.requires_grad else None for g, w in zip(gws, weights)], None


lstm_op.register_autograd(_lstm_backward, setup_context=_lstm_setup)


# ---------------------------------------------------------------------------------------------
# fastcodec::lstm_step: a chunk of a stream, (h, c) carried in place
# ---------------------------------------------------------------------------------------------


def _cell(gates: torch.Tensor, c: torch.Tensor, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's LSTM cell after the GEMMs; gates (B, 4H) in order i, f, g, o -> (h, c) (B, H)."""
    s = torch.sigmoid(gates)
    c = torch.addcmul(s[:, hidden:2 * hidden] * c, s[:, :hidden], torch.tanh(gates[:, 2 * hidden:3 * hidden]))
    return s[:, 3 * hidden:] * torch.tanh(c), c


def lstm_step_reference(x: torch.Tensor, layers: list, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """ATen, any dtype and device: x (T, B, I); ``layers``: ``PackedLSTMWeights.transposed()``; h, c (L, B, H)
    updated in place -> y (T, B, H), fresh. One GEMM for the chunk's input projection, then per step
    ``gates += h W_hh^T`` and the cell (``torch.lstm_cell`` reads its (4H, K) weights at half that rate)."""
    T, B = x.shape[0], x.shape[1]
    seq = x.transpose(0, 1)  # [B, T, C]
    for i, (w_ih_t, w_hh_t, bias) in enumerate(layers):
        H = w_hh_t.shape[0]
        gates = torch.addmm(bias, seq.reshape(B * T, seq.shape[-1]), w_ih_t).view(B, T, 4 * H)
        hi, ci = h[i], c[i]
        outs = []
        for t in range(T):
            hi, ci = _cell(gates[:, t].addmm_(hi, w_hh_t), ci, H)
            outs.append(hi)
        h[i].copy_(hi)
        c[i].copy_(ci)
        seq = outs[0].unsqueeze(1) if T == 1 else torch.stack(outs, 1)
    return seq.transpose(0, 1)


@torch.library.custom_op("fastcodec::lstm_step", mutates_args=("h", "c", "out"))
def lstm_step_op(x: torch.Tensor, weights: list[torch.Tensor], num_layers: int, h: torch.Tensor, c: torch.Tensor,
                 out: torch.Tensor) -> None:
    """x (T, B, I) from the state h, c (L, B, H), both updated in place to the final state; out (T, B, H) <- the
    last layer's h at every step."""
    check_lstm_args(x, weights, num_layers)
    if use_cpp(x):
        forward_packed(x.contiguous() if x.stride(2) != 1 else x, pack(weights, num_layers), h, c, out)
    else:
        out.copy_(lstm_step_reference(x, _transpose(list(weights)), h, c))


@lstm_step_op.register_fake
def _(x, weights, num_layers, h, c, out):
    check_lstm_args(x, weights, num_layers)
    return None


def lstm_step(x: torch.Tensor, weights: PackedLSTMWeights, h: torch.Tensor, c: torch.Tensor,
              out: Optional[torch.Tensor], fused: bool) -> torch.Tensor:
    """``fastcodec::lstm_step`` for a stream: x (T, B, I) (unit stride along I for the kernel), h, c (L, B, H) in
    place. ``fused`` (``use_cpp``): the C++ kernel writes ``out`` (T, B, H) and returns it; else the ATen step
    returns a fresh y. Eager calls skip the dispatcher (see fastcodec.ops.stream)."""
    if torch.compiler.is_compiling():
        if out is None:
            out = x.new_empty(x.shape[0], x.shape[1], weights.hidden_size)
        lstm_step_op(x, weights.flat(), weights.num_layers, h, c, out)
        return out
    if fused:
        return forward_packed(x, weights.get(), h, c, out)
    return lstm_step_reference(x, weights.transposed(), h, c)
