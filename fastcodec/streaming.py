"""Exact streaming of causal SEANet encoders/decoders and of the whole EnCodec codec, with explicit state.

    state = stream_state(m, batch_size)          # or m.stream_state(batch_size) with StreamingMixin
    y1, state = stream(m, chunk1, state)         # chunk: (B, C_in, n), any n >= 1
    y2, state = stream(m, chunk2, state)
    tail = stream_flush(m, state)                # what the offline pass produces from its end padding
    cat([y1, y2, tail], -1) == m(cat([chunk1, chunk2], -1))      (up to float32 rounding)

for every split of the input. The state carries each conv's left context (a linear buffer written in
place, like causal-conv1d's ``conv_state``), the LSTM's ``(h, c)``, each transposed conv's pending
overlap and the samples that do not fill a stride yet. It is a plain object of tensors (``StreamState``:
``copy``, ``to``, ``state_dict``/``load_state_dict``, ``select``/``cat`` of batch rows); the module keeps
no per-stream data, so one module serves any number of streams.

Exactness, step by step (a causal conv with span ``K = (k - 1) * d + 1``, stride ``s``, left pad ``P = K - s``):

- frame n reads padded samples ``[n s, n s + K)``, i.e. inputs up to ``(n + 1) s - 1``: it is emitted as
  soon as those arrived; the inputs of a partial stride wait in the buffer;
- reflect padding mirrors ``x[1..P]`` onto the left, so the first frames also wait until ``P + 1`` inputs
  arrived (replicate: 1). That start-up delay is part of the offline definition, not latency added here:
  the 24 kHz encoder emits nothing until 2240 samples (7 frames) arrived, then frames 0-6 at once, then one
  frame per 320 samples; the decoder waits for 7 latent frames. Constant padding has no such delay;
- the right padding that fills the last stride (reflect in reflect mode) exists only at the end, so the last
  frame of a stride conv comes out of ``stream_flush``; a stream shorter than the padding goes through the
  reference ``pad1d`` (with its short-input rule) at flush, on the whole buffered input;
- activations are pointwise; each is fused into the buffer write of the conv after it;
- the LSTM carries ``(h, c)``; its steps are GEMMs plus the cell's pointwise ops, whose float32 rounding
  differs from the whole-sequence ``nn.LSTM`` (oneDNN) by ~1e-7;
- a transposed conv frame adds ``kernel`` samples, ``stride`` of which are complete; the other
  ``kernel - stride`` stay pending in the state; at flush the pending overlap is dropped exactly as the
  offline causal trim drops it (``trim_right_ratio``), the rest of the trim is kept.

Not streamable (``NotStreamableError``, a ValueError naming the reason): non-causal convs (the 48 kHz
model, MusicGen's 32 kHz codec: their centred padding reads future samples), ``time_group_norm``
(normalises over the whole signal), circular padding, the codec's volume normalisation and segments.

Per-chunk work (inference only: it runs under ``torch.no_grad``): a plan is compiled once per module
(``plan_of``) into steps with precomputed constants. Float32 on the CPU with the ``cpp`` conv backend, a conv
step is one call into csrc/stream_cpu.cpp (``conv_push`` / ``convtr_push``): the chunk goes through the fused
ELU into the step's time-major buffer after the context it holds (moved to the buffer's front when the chunk
would not fit: the past is never re-padded), and the frames it completes come out of a small GEMM with the
frames as rows, vectorised along output channels, into the step's output buffer, reused chunk after chunk
(``_Slots.outs``, not part of the state). The LSTM step is the fused C++ LSTM (``fastcodec.ops.lstm``), ``h``
and ``c`` updated in place. After warm-up a chunk allocates only the tensor returned to the caller.
Otherwise (float64, CUDA, ``FASTCODEC_BACKEND=reference``, activations other than ELU, start-up and flush)
the steps run ATen: an im2col GEMM on a view of the buffer, with the chunk's few frames as rows (where
``F.conv1d`` is 10x slower and 4x less accurate on the AMD EPYC); ``conv1d_step`` / ``conv_transpose1d_step``
are that seam (``register_step_builder`` for module classes of its own; a step whose seam was replaced keeps
ATen). Weight-norm weights are folded and packed once, again only when a parameter changes (fastcodec._cache).

Cost: a 320-sample chunk of the 24 kHz model reads every float32 weight once (28.3 MiB per direction), so
B=1 streaming is bound by memory bandwidth. Measured on the shared 2-core AMD EPYC (load average ~3), 1
thread, blocks of 50 chunks: encoder 1.92 ms median per chunk (ATen steps: 4.59) against 1.00 ms to read the
weights once with ``torch.sum`` in the same run; decoder 2.10 ms (4.17) against 1.31 ms; the per-chunk
overhead of the ~20 steps (Python, calls) is 0.19 ms. A batch of streams shares the weight read. Use one
thread on a shared machine: a 2-thread OpenMP barrier waits on a descheduled thread (measured 10.9 ms median).
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import typing as tp
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import _backend, _cache, _hooks
from . import _build as _extensions
from .reference.conv import StreamableConv1d, StreamableConvTranspose1d, pad1d
from .reference.lstm import StreamableLSTM
from .reference.model import EncodecModel as _RefEncodecModel
from .reference.seanet import SEANetDecoder as _RefSEANetDecoder
from .reference.seanet import SEANetEncoder as _RefSEANetEncoder
from .reference.seanet import SEANetResnetBlock

__all__ = [
    "NotStreamableError",
    "StreamState",
    "CodecStreamState",
    "StreamPlan",
    "plan_of",
    "register_step_builder",
    "linear_step",
    "conv1d_step",
    "conv_transpose1d_step",
    "stream_state",
    "stream",
    "stream_flush",
    "encode_state",
    "stream_encode",
    "stream_encode_flush",
    "decode_state",
    "stream_decode",
    "stream_decode_flush",
    "StreamingMixin",
    "CodecStreamingMixin",
    "StreamingSEANetEncoder",
    "StreamingSEANetDecoder",
    "StreamingEncodecModel",
]


class NotStreamableError(ValueError):
    """The module cannot be streamed exactly; the message names the sub-module and the reason."""


# Reductions longer than this are split into blocks of this many terms: MKL's float32 GEMV over K = 4096
# loses 9.7e-7 relative to float64, in 1024-term blocks 3.5e-7 (the offline oneDNN conv's level, 3e-7);
# it costs 1.4x on those two layers (0.48 -> 0.69 ms out of cache) and brings the streamed encoder's error
# to <= 1.41x the offline float32 error (60 random splits) from up to 2.85x.
_K_BLOCK = 1024


def linear_step(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``a @ weight^T + bias`` with the reduction split in ``_K_BLOCK`` blocks when K > 2 * _K_BLOCK.
    a: (M, K), any strides; weight: (N, K); bias: (N,) or None -> (M, N)."""
    K = a.shape[1]
    if K <= 2 * _K_BLOCK:
        return F.linear(a, weight, bias)
    y = F.linear(a[:, :_K_BLOCK], weight[:, :_K_BLOCK], bias)
    for j in range(_K_BLOCK, K, _K_BLOCK):
        y.add_(F.linear(a[:, j:j + _K_BLOCK], weight[:, j:j + _K_BLOCK]))
    return y


# Above this many frames (a large chunk) F.conv1d is as accurate (2.7e-7 relative at 2000 frames) and
# needs no k-times larger im2col copy; below it, im2col keeps the time-major layout end to end.
_IM2COL_MAX_FRAMES = 2048


def conv1d_step(window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                dilation: int, groups: int, packed: torch.Tensor | None = None) -> torch.Tensor:
    """One streaming conv on an already padded window. window: (B, C_in, L), any strides (the state keeps
    it time-major); weight: (C_out, C_in / groups, k); packed: ``pack_conv1d(weight)`` or None
    -> (B, C_out, (L - (k - 1) * dilation - 1) // stride + 1), time-major underneath.

    With ``packed`` (groups 1) it is an im2col GEMM with the few frames as rows (``linear_step``): on the
    AMD EPYC a (2..8 frames) x 4096 x 512 conv takes 2.6 ms and loses 3.4e-6 relative through ``F.conv1d``
    (MKL's small-N GEMM), 0.27 ms and 8e-7 as frames x weight^T.
    """
    B, C, L = window.shape
    k = weight.shape[-1]
    frames = (L - (k - 1) * dilation - 1) // stride + 1
    if packed is None or groups != 1 or frames > _IM2COL_MAX_FRAMES:
        return F.conv1d(window, weight, bias, stride, 0, dilation, groups)
    sb, sc, st = window.stride()
    cols = window.as_strided((B, frames, k, C), (sb, stride * st, dilation * st, sc), window.storage_offset())
    y = linear_step(cols.reshape(B * frames, k * C), packed, bias)
    return y.view(B, frames, -1).transpose(1, 2)


def pack_conv1d(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, k) -> (C_out, k * C_in), columns ordered (tap, channel) like the time-major im2col."""
    return weight.permute(0, 2, 1).reshape(weight.shape[0], -1).contiguous()


def conv_transpose1d_step(x: torch.Tensor, weight: torch.Tensor, stride: int, groups: int,
                          packed: torch.Tensor | None = None) -> torch.Tensor:
    """One streaming transposed conv without bias (added once the overlap is complete).
    x: (B, C_in, T), any strides; weight: (C_in, C_out / groups, k); packed: ``pack_conv_transpose1d(weight)``
    -> (B, C_out, (T - 1) * stride + k), time-major underneath.

    With ``packed`` (groups 1): one GEMM gives each frame's k output samples, overlap-added with stride.
    """
    if packed is None or groups != 1:
        return F.conv_transpose1d(x, weight, None, stride, 0, 0, groups)
    B, C, T = x.shape
    k = weight.shape[-1]
    contrib = torch.mm(x.transpose(1, 2).reshape(B * T, C), packed)  # [B * T, k * C_out]
    c_out = contrib.shape[-1] // k
    contrib = contrib.view(B, T, k, c_out)
    out = contrib.new_zeros(B, (T - 1) * stride + k, c_out)
    for j in range(0, k, stride):
        w = min(stride, k - j)
        # frame t's taps [j, j + w) land on samples t * stride + j + [0, w): disjoint for one j
        out.as_strided((B, T, w, c_out), (out.stride(0), stride * c_out, c_out, 1),
                       out.storage_offset() + j * c_out).add_(contrib[:, :, j:j + w])
    return out.transpose(1, 2)


def pack_conv_transpose1d(weight: torch.Tensor) -> torch.Tensor:
    """(C_in, C_out, k) -> (C_in, k * C_out), columns ordered (tap, channel).

    (K, N) layout: the GEMV is K = C_in by N = stride * C_in, which MKL on the AMD EPYC reads 1.7x faster
    this way than as (N, K) (512 x 4096 out of cache: 0.50 vs 0.86 ms).
    """
    return weight.permute(0, 2, 1).reshape(weight.shape[0], -1).contiguous()


_FOLDED = _cache.TensorCache()
_LSTM_T = _cache.TensorCache()


class _FoldedWeight:
    """A conv's weight, weight-norm folded (``torch._weight_norm``, bitwise the module's own ``.weight``)
    and packed once, cached under fastcodec's one cache rule (``fastcodec._cache``), with per-stream memos
    (``_cache.Memo``) in front. ``panels()`` is the packed weight in the streaming kernels' layout
    (``pack_panels``), derived from the private packed tensor."""

    __slots__ = ("params", "pack", "memo", "panel_memo", "panel_of")

    def __init__(self, conv: nn.Module, pack: tp.Callable[[torch.Tensor], torch.Tensor]):
        self.params = conv._parameters  # the dict itself: load_state_dict(assign=True) replaces its entries
        self.pack = pack
        self.memo = _cache.Memo()
        self.panel_memo = _cache.Memo()
        self.panel_of: tuple | None = None  # (packed, panels): panels of that private packed tensor

    def _sources(self) -> tuple:
        params = self.params
        v = params.get("weight_v")
        return (params["weight"],) if v is None else (v, params["weight_g"])

    def _make(self, src: tuple):
        def make():
            with torch.no_grad(), torch.inference_mode(False):
                w = src[0].detach().clone() if len(src) == 1 else torch._weight_norm(src[0], src[1], 0)
                return (w, self.pack(w))

        return make

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (weight, packed weight)."""
        src = self._sources()
        return self.memo.get(_FOLDED, src, self._make(src), (self.pack,))

    def panels(self, kernels) -> torch.Tensor:
        """The packed weight (K, N) = ``pack(w)`` as (N, K) transposed, in ``kernels.pack_panels``' layout."""
        src = self._sources()
        hit = self.panel_memo.hit(src)
        if hit is not None:
            return hit
        packed = self.get()[1]
        memo = self.panel_of
        if memo is None or memo[0] is not packed:  # packed is private and rebuilt on any change
            p = packed.t() if self.pack is pack_conv1d else packed
            memo = self.panel_of = (packed, kernels.pack_panels(p, _panel_width(p.shape[1])))
        return self.panel_memo.store(src, memo[1])


def _panel_width(n: int) -> int:
    """Output columns per weight panel of the streaming kernels: up to 64 (4 AVX-512 vectors, 24 accumulators
    at 6 frames), fewer for narrow layers so no lane computes padding only."""
    return 16 * min(4, -(-n // 16))


class _Slot:
    """One step's state: tensors (batch first) and int counters, as attributes."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def copy(self, fn=lambda t: t.clone()) -> "_Slot":
        return _Slot(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()})


def _tm(t: torch.Tensor) -> torch.Tensor:
    """Swap the last two axes of a 3-d state tensor (its own inverse): batch-axis ops on ``_tm(t)`` keep a
    time-major buffer time-major."""
    return t.transpose(1, 2) if t.dim() == 3 else t


def _int_fields(slot: _Slot) -> dict:
    return {k: v for k, v in vars(slot).items() if not isinstance(v, torch.Tensor)}


class _Slots(list):
    """``StreamState.slots``: the steps' ``_Slot`` list, plus what is not state: ``kernels`` (the streaming
    C++ kernels when this chunk may use them, else None; set per call) and ``outs`` (per step: its reusable
    output buffer). Copies of a state start with fresh ones."""

    def __init__(self, slots=()):
        super().__init__(slots)
        self.kernels = None
        self.outs: dict[int, tuple] = {}


def _out_view(slots: _Slots, idx: int, like: torch.Tensor, channels: int, frames: int) -> torch.Tensor:
    """Step ``idx``'s output (batch, channels, frames), time-major in a buffer reused across chunks (grown when a
    chunk needs more frames; the same view while the frame count repeats)."""
    entry = slots.outs.get(idx)
    if entry is not None and entry[0] == frames:
        return entry[1]
    if entry is None or entry[2].shape[1] < frames:
        store = torch.empty(like.shape[0], frames, channels, dtype=like.dtype, device=like.device)
    else:
        store = entry[2]
    view = store[:, :frames].transpose(1, 2)
    slots.outs[idx] = (frames, view, store)
    return view


# Largest counter a loaded stream state may hold (int64 arithmetic on positions must not overflow).
_MAX_COUNTER = 2**62
# Buffers whose time axis varies with the stream (a conv's input window, a residual block's unmatched frames);
# every other state tensor has a fixed shape set by the module.
_GROWING = ("buf", "pend_a", "pend_b")


def _saved_counter(state_dict, name: str, low: int, high: int = _MAX_COUNTER) -> int:
    v = state_dict[name]
    if not isinstance(v, torch.Tensor) or v.numel() != 1 or v.dtype.is_floating_point or v.dtype.is_complex:
        raise ValueError(f"stream state_dict: {name} must be an integer scalar tensor, got "
                         f"{type(v).__name__ if not isinstance(v, torch.Tensor) else f'{tuple(v.shape)} {v.dtype}'}")
    n = int(v)
    if not low <= n <= high:
        raise ValueError(f"stream state_dict: {name} must be in [{low}, {high}], got {n}")
    return n


def _check_saved_slot(state_dict, i: int, slot: "_Slot", batch: int) -> None:
    """Validate step i's saved fields against the live slot before anything is copied: shapes, dtypes, finite
    values, counters in range, and the invariants the steps rely on (a window inside its buffer, the residual
    bookkeeping). A state that passes cannot make a step index out of bounds; a consistent but fabricated one
    gives a wrong stream, not a crash."""
    vals = {}
    for k, v in vars(slot).items():
        name = f"slots.{i}.{k}"
        saved = state_dict[name]
        if isinstance(v, torch.Tensor):
            if not isinstance(saved, torch.Tensor) or saved.is_floating_point() != v.is_floating_point():
                raise ValueError(f"stream state_dict: {name} must be a {v.dtype} tensor, got "
                                 f"{saved.dtype if isinstance(saved, torch.Tensor) else type(saved).__name__}")
            if saved.dim() >= 1 and saved.shape[0] != batch:
                raise ValueError(f"stream state_dict: batch_size is {batch} but {name} holds {saved.shape[0]} "
                                 "stream(s)")
            fixed = k not in _GROWING
            if (saved.dim() != v.dim() or saved.shape[0] != batch or saved.shape[1:-1] != v.shape[1:-1]
                    or (fixed and saved.shape[-1] != v.shape[-1])):
                tail = str(v.shape[-1]) if fixed else "..."
                raise ValueError(f"stream state_dict: {name} has shape {tuple(saved.shape)}, "
                                 f"expected ({', '.join(map(str, (batch,) + tuple(v.shape[1:-1])))}, {tail})")
            if saved.is_floating_point() and not bool(torch.isfinite(saved).all()):
                raise ValueError(f"stream state_dict: {name} holds NaN/Inf (a corrupt state)")
            vals[k] = saved
        else:
            vals[k] = _saved_counter(state_dict, name, 0, 1 if isinstance(v, bool) else _MAX_COUNTER)
    if "buf" in vals and vals["start"] + vals["n"] > vals["buf"].shape[-1]:
        raise ValueError(f"stream state_dict: slots.{i}: window start {vals['start']} + n {vals['n']} exceeds the "
                         f"buffer's {vals['buf'].shape[-1]} samples")
    if "buf" in vals and vals["emitted"] > vals["total"]:
        raise ValueError(f"stream state_dict: slots.{i}: emitted {vals['emitted']} frames from {vals['total']} samples")
    if "pending" in vals and vals["skip"] > vals["pending"].shape[-1]:
        raise ValueError(f"stream state_dict: slots.{i}.skip {vals['skip']} exceeds the overlap "
                         f"{vals['pending'].shape[-1]}")
    if "unmatched" in vals:
        a, b = vals["pend_a"].shape[-1], vals["pend_b"].shape[-1]
        if min(a, b) != 0 or vals["unmatched"] != a + b:
            raise ValueError(f"stream state_dict: slots.{i}: unmatched {vals['unmatched']} does not fit the pending "
                             f"frames ({a}, {b})")


class StreamState:
    """The state of a batch of streams through one module (see the module docstring).

    ``slots[i]`` holds step i's buffers (tensors of shape (batch, ...)) and counters. ``stream`` updates the
    state in place and returns it; ``copy()`` first to branch a stream. After ``stream_flush`` the state is
    finished: start a new one for a new stream.
    """

    def __init__(self, signature: str, batch_size: int, slots: list[_Slot], dtype: torch.dtype,
                 device: torch.device, finished: bool = False):
        self.signature = signature
        self.batch_size = batch_size
        self.slots = _Slots(slots)
        self.dtype = dtype
        self.device = device
        self.finished = finished
        # cached weights are fingerprinted once per stream, at its first chunk (fastcodec._cache.trusting)
        self.trust_epoch = _cache.new_epoch()

    def _derive(self, fn) -> "StreamState":
        slots = [s.copy(fn) for s in self.slots]
        ref = next((v for s in slots for v in vars(s).values() if isinstance(v, torch.Tensor)), None)
        dtype, device = (self.dtype, self.device) if ref is None else (ref.dtype, ref.device)
        return StreamState(self.signature, self.batch_size, slots, dtype, device, self.finished)

    def copy(self) -> "StreamState":
        """An independent deep copy."""
        return self._derive(lambda t: t.clone())

    def to(self, device=None, dtype: torch.dtype | None = None) -> "StreamState":
        """A copy on ``device`` (and floating tensors cast to ``dtype``); ``self`` is left as it is."""
        return self._derive(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None,
                                          copy=True))

    def select(self, index) -> "StreamState":
        """The streams at ``index`` (an int, slice, list or 1-d index tensor of batch rows) as a new state."""
        if isinstance(index, int):
            index = [index]
        rows = torch.arange(self.batch_size)[index]
        if rows.numel() == 0:
            raise ValueError(f"select: {index!r} picks no stream out of {self.batch_size}")
        state = self._derive(lambda t: _tm(_tm(t).index_select(0, rows.to(t.device))))
        state.batch_size = rows.numel()
        return state

    @staticmethod
    def cat(states: tp.Sequence["StreamState"]) -> "StreamState":
        """Independent streams at the same position (same chunk lengths so far) batched into one state."""
        if not states:
            raise ValueError("StreamState.cat needs at least one state")
        first = states[0]
        for s in states[1:]:
            if s.signature != first.signature:
                raise ValueError("StreamState.cat: the states belong to different modules")
            if s.finished != first.finished or any(_int_fields(a) != _int_fields(b)
                                                    for a, b in zip(s.slots, first.slots)):
                raise ValueError("StreamState.cat: the streams are at different positions (their chunk lengths "
                                 "differ); only streams that advanced in lockstep can share a batch")
        slots = []
        for i, slot in enumerate(first.slots):
            fields = {}
            for k, v in vars(slot).items():
                if isinstance(v, torch.Tensor):
                    parts = [vars(s.slots[i])[k] for s in states]
                    width = max(p.shape[-1] for p in parts)  # buffers may have grown differently
                    parts = [F.pad(p, (0, width - p.shape[-1])) if p.shape[-1] != width else p for p in parts]
                    fields[k] = _tm(torch.cat([_tm(p) for p in parts], 0))
                else:
                    fields[k] = v
            slots.append(_Slot(**fields))
        return StreamState(first.signature, sum(s.batch_size for s in states), slots, first.dtype, first.device,
                           first.finished)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat ``{name: tensor}``; counters become int64 scalars. Load with ``load_state_dict``."""
        out = {"batch_size": torch.tensor(self.batch_size), "finished": torch.tensor(int(self.finished))}
        for i, slot in enumerate(self.slots):
            for k, v in vars(slot).items():
                out[f"slots.{i}.{k}"] = v.clone() if isinstance(v, torch.Tensor) else torch.tensor(int(v))
        return out

    def load_state_dict(self, state_dict: tp.Mapping[str, torch.Tensor]) -> "StreamState":
        """Load what ``state_dict`` saved, into a state made by the same module (any batch size)."""
        expected = {"batch_size", "finished"} | {f"slots.{i}.{k}" for i, s in enumerate(self.slots) for k in vars(s)}
        missing, unexpected = expected - set(state_dict), set(state_dict) - expected
        if missing or unexpected:
            raise ValueError(f"stream state_dict does not match this module's plan: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        batch = _saved_counter(state_dict, "batch_size", 1)
        finished = _saved_counter(state_dict, "finished", 0, 1)
        for i, slot in enumerate(self.slots):  # validate everything first: a bad file leaves the state as it was
            _check_saved_slot(state_dict, i, slot, batch)
        for i, slot in enumerate(self.slots):
            for k, v in list(vars(slot).items()):
                saved = state_dict[f"slots.{i}.{k}"]
                if isinstance(v, torch.Tensor):
                    setattr(slot, k, saved.to(device=v.device, dtype=v.dtype, copy=True))
                else:
                    setattr(slot, k, type(v)(int(saved)))
        self.batch_size = batch
        self.finished = bool(finished)
        self.trust_epoch = _cache.new_epoch()
        return self

    def nbytes(self) -> int:
        """Bytes held by the state's tensors (flat in the stream's length)."""
        return sum(v.numel() * v.element_size() for s in self.slots for v in vars(s).values()
                   if isinstance(v, torch.Tensor))


class CodecStreamState:
    """State of audio -> codes -> audio streams: the encoder's and the decoder's ``StreamState`` and the
    sample counts that trim the decoded tail to the input length (as ``EncodecModel.forward`` does)."""

    def __init__(self, encoder: StreamState, decoder: StreamState, samples_in: int = 0, samples_out: int = 0):
        self.encoder = encoder
        self.decoder = decoder
        self.samples_in = samples_in
        self.samples_out = samples_out

    @property
    def batch_size(self) -> int:
        return self.encoder.batch_size

    @property
    def finished(self) -> bool:
        return self.encoder.finished

    def copy(self) -> "CodecStreamState":
        return CodecStreamState(self.encoder.copy(), self.decoder.copy(), self.samples_in, self.samples_out)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "CodecStreamState":
        return CodecStreamState(self.encoder.to(device, dtype), self.decoder.to(device, dtype),
                                self.samples_in, self.samples_out)

    def select(self, index) -> "CodecStreamState":
        return CodecStreamState(self.encoder.select(index), self.decoder.select(index),
                                self.samples_in, self.samples_out)

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"samples_in": torch.tensor(self.samples_in), "samples_out": torch.tensor(self.samples_out)}
        out.update({f"encoder.{k}": v for k, v in self.encoder.state_dict().items()})
        out.update({f"decoder.{k}": v for k, v in self.decoder.state_dict().items()})
        return out

    def load_state_dict(self, state_dict: tp.Mapping[str, torch.Tensor]) -> "CodecStreamState":
        if "samples_in" not in state_dict or "samples_out" not in state_dict:
            raise ValueError("codec stream state_dict lacks samples_in/samples_out")
        samples_in = _saved_counter(state_dict, "samples_in", 0)
        samples_out = _saved_counter(state_dict, "samples_out", 0, samples_in)
        subs = {part: {k[len(part) + 1:]: v for k, v in state_dict.items() if k.startswith(part + ".")}
                for part in ("encoder", "decoder")}
        self.decoder.copy().load_state_dict(subs["decoder"])  # validate both halves before changing either
        for part, sub in subs.items():
            getattr(self, part).load_state_dict(sub)
        self.samples_in = samples_in
        self.samples_out = samples_out
        return self

    def nbytes(self) -> int:
        return self.encoder.nbytes() + self.decoder.nbytes()


def _time_major(like: torch.Tensor, batch: int, channels: int, length: int) -> torch.Tensor:
    """Zeros (batch, channels, length) stored time-major: a window of frames is one contiguous run for batch 1."""
    return like.new_zeros(batch, length, channels).transpose(1, 2)


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return torch.cat([a, b], dim=-1)


def _pointwise_into(module: nn.Module) -> tp.Callable[[torch.Tensor, torch.Tensor], None]:
    """``fn(x, out)`` writing ``module(x)`` into ``out`` (an ELU or LeakyReLU writes there directly)."""
    if type(module) is nn.ELU:
        alpha = float(module.alpha)
        return lambda x, out: torch._C._nn.elu(x, alpha, 1.0, 1.0, out=out)
    if type(module) is nn.LeakyReLU:
        slope = float(module.negative_slope)
        return lambda x, out: torch._C._nn.leaky_relu(x, slope, out=out)
    return lambda x, out: out.copy_(module(x))


def _pointwise(module: nn.Module) -> tp.Callable[[torch.Tensor], torch.Tensor]:
    if type(module) is nn.ELU:
        alpha = float(module.alpha)
        return lambda x: F.elu(x, alpha)
    return module


# Modules that act on each sample alone (the activations SEANet builds from its `activation` name).
POINTWISE = (nn.ELU, nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.Mish,
             nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.CELU, nn.SELU,
             nn.Tanhshrink, nn.Identity)


class _Step:
    """One streaming stage: ``push(x, slots)`` -> y or None (no output yet), ``flush(slots)`` -> tail or None.
    x, y: (B, C, T). A step returns a tensor it owns (never a view of the state or of its input), so the
    caller may write into it."""

    idx = -1
    in_channels = 0
    out_channels = 0

    def new_slots(self, slots: list, batch: int, hint: int, like: torch.Tensor) -> int:
        """Append this step's slot(s); return the output length hint for an input chunk of ``hint``."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class _Pointwise(_Step):
    def __init__(self, module: nn.Module, channels: int):
        self.fn = _pointwise(module)
        self.name = type(module).__name__
        self.in_channels = self.out_channels = channels

    def new_slots(self, slots, batch, hint, like):
        return hint

    def push(self, x, slots):
        return self.fn(x)

    def flush(self, slots):
        return None

    def describe(self):
        return self.name


class _Conv(_Step):
    """Causal ``StreamableConv1d`` (optionally fused with the activation before it).

    Slot: ``buf`` (B, C_in, cap) with the valid samples at ``[start, start + n)``; before ``warm`` they are raw
    inputs from index 0, after it padded samples from ``emitted * stride`` on. ``total`` inputs seen.
    """

    def __init__(self, module: nn.Module, path: str, act: nn.Module | None = None):
        conv = module.conv.conv
        if not module.causal:
            span = (conv.kernel_size[0] - 1) * conv.dilation[0] + 1
            right = (span - conv.stride[0]) // 2
            raise NotStreamableError(
                f"{path}: non-causal StreamableConv1d (causal=False) centres its padding, so each output reads "
                f"{right} future sample(s) plus the end of the signal; streaming needs a causal model such as "
                f"encodec_model_24khz (the 48 kHz EnCodec and MusicGen's 32 kHz codec are non-causal)")
        if not isinstance(module.conv.norm, nn.Identity):
            raise NotStreamableError(f"{path}: norm {type(module.conv.norm).__name__} (time_group_norm) "
                                     f"normalises over the whole time axis: not streamable")
        if module.pad_mode not in ("constant", "reflect", "replicate"):
            raise NotStreamableError(f"{path}: pad_mode {module.pad_mode!r} needs the end of the signal for its "
                                     f"left padding: not streamable")
        self.kernel_size = conv.kernel_size[0]
        self.stride = conv.stride[0]
        self.dilation = conv.dilation[0]
        self.groups = conv.groups
        self.span = (self.kernel_size - 1) * self.dilation + 1
        self.pad = self.span - self.stride
        if self.pad < 0:
            raise NotStreamableError(f"{path}: kernel span {self.span} < stride {self.stride}: audiocraft's "
                                     f"padding would be negative")
        self.pad_mode = module.pad_mode
        if self.pad_mode == "reflect" and self.stride > 1 and self.pad < self.stride - 1:
            # the last frame's right reflection reads s - r + 1 samples that the state no longer holds
            raise NotStreamableError(f"{path}: reflect padding with kernel span {self.span} < 2 * stride - 1 "
                                     f"(stride {self.stride}) is not supported for streaming")
        # inputs needed before the left padding is known
        self.warm_at = {"constant": 0, "replicate": 1, "reflect": self.pad + 1}[self.pad_mode] if self.pad else 0
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.weight = _FoldedWeight(conv, pack_conv1d)
        self.conv_params = conv._parameters
        self.act_into = None if act is None else _pointwise_into(act)
        self.act_name = None if act is None else type(act).__name__
        self.conv = conv1d_step
        # the streaming kernels fuse no activation but the ELU, and have no groups
        self.fast = self.groups == 1 and (act is None or type(act) is nn.ELU)
        self.alpha = float(act.alpha) if type(act) is nn.ELU else None

    def describe(self):
        a = f"{self.act_name}+" if self.act_name else ""
        return (f"{a}Conv({self.in_channels}->{self.out_channels},k{self.kernel_size},s{self.stride},"
                f"d{self.dilation},g{self.groups},{self.pad_mode})")

    def new_slots(self, slots, batch, hint, like):
        self.idx = len(slots)
        cap = 2 * self.span + hint
        buf = _time_major(like, batch, self.in_channels, cap)
        warm = self.warm_at == 0
        # constant padding: the P zeros are known from the start (the buffer is zeros)
        n = self.pad if self.pad_mode == "constant" else 0
        slots.append(_Slot(buf=buf, start=0, n=n, total=0, emitted=0, warm=warm))
        return hint // self.stride + 1

    def _reserve(self, st: _Slot, free: int) -> None:
        """Make ``free`` samples of room after the valid ones: compact in place, or grow."""
        buf, start, n = st.buf, st.start, st.n
        cap = buf.shape[-1]
        if n + free <= cap and start >= n:  # source and destination of the compaction do not overlap
            if n:
                buf[:, :, :n].copy_(buf[:, :, start:start + n])
            st.start = 0
            return
        # the compaction of any later chunk of up to ``free`` samples will not overlap (n < span then)
        new = _time_major(buf, buf.shape[0], buf.shape[1], max(2 * self.span + free, n + free + self.span))
        new[:, :, :n].copy_(buf[:, :, start:start + n])
        st.buf, st.start = new, 0

    def _warm_up(self, st: _Slot) -> None:
        raw = st.buf[:, :, st.start:st.start + st.n].clone()
        padded = pad1d(raw, (self.pad, 0), self.pad_mode)
        st.n = 0
        st.start = 0
        self._reserve(st, padded.shape[-1])
        st.buf[:, :, :padded.shape[-1]].copy_(padded)
        st.n = padded.shape[-1]
        st.warm = True

    def _push_fast(self, kernels, x, slots, st):
        """One ``conv_push``: the chunk through the ELU into the buffer, the frames it completes into the step's
        reused output buffer."""
        T = x.shape[-1]
        n = st.n
        if n + T > st.buf.shape[-1]:
            self._reserve(st, T)
        if st.buf.stride(2) != self.in_channels:  # a state loaded or built elsewhere: back to time-major
            st.buf = _tm(_tm(st.buf).contiguous())
        total = n + T
        frames = (total - self.span) // self.stride + 1 if total >= self.span else 0
        out = _out_view(slots, self.idx, x, self.out_channels, frames) if frames else None
        start = kernels.conv_push(st.buf, x, st.start, n, self.alpha, frames, self.kernel_size, self.stride,
                                  self.dilation, self.weight.panels(kernels), self.conv_params["bias"], out)
        consumed = frames * self.stride
        st.start = start + consumed
        st.n = total - consumed
        st.total += T
        st.emitted += frames
        return out

    def push(self, x, slots):
        st = slots[self.idx]
        kernels = slots.kernels
        if kernels is not None and st.warm and self.fast and self.conv is conv1d_step:
            return self._push_fast(kernels, x, slots, st)
        T = x.shape[-1]
        end = st.start + st.n
        if end + T > st.buf.shape[-1]:
            self._reserve(st, T)
            end = st.start + st.n
        dst = st.buf[:, :, end:end + T]
        if self.act_into is None:
            dst.copy_(x)
        else:
            self.act_into(x, dst)
        st.n += T
        st.total += T
        if not st.warm:
            if st.total < self.warm_at:
                return None
            self._warm_up(st)
        n = st.n
        if n < self.span:
            return None
        s = self.stride
        frames = (n - self.span) // s + 1
        start = st.start
        w, packed = self.weight.get()
        y = self.conv(st.buf[:, :, start:start + (frames - 1) * s + self.span], w, self.conv_params["bias"], s,
                      self.dilation, self.groups, packed)
        st.start = start + frames * s
        st.n = n - frames * s
        st.emitted += frames
        return y

    def flush(self, slots):
        st = slots[self.idx]
        T, s = st.total, self.stride
        if T == 0 or -(-T // s) <= st.emitted:
            return None
        extra = -(-T // s) * s - T  # audiocraft's get_extra_padding_for_conv1d
        window = st.buf[:, :, st.start:st.start + st.n]
        if st.warm:
            window = F.pad(window, (0, extra), self.pad_mode) if extra else window
        else:
            # never started: the whole input is here; the reference pad1d applies its short-input rule
            window = pad1d(window, (self.pad, extra), self.pad_mode)
        w, packed = self.weight.get()
        y = self.conv(window, w, self.conv_params["bias"], s, self.dilation, self.groups, packed)
        st.emitted += y.shape[-1]
        st.n = 0
        return y


class _ConvTranspose(_Step):
    """Causal ``StreamableConvTranspose1d`` (optionally fused with the activation before it).

    Slot: ``pending`` (B, C_out, kernel - stride) the overlap of the frames seen so far (no bias);
    ``skip`` output samples still to drop for the left trim; ``total`` input frames seen.
    """

    def __init__(self, module: nn.Module, path: str, act: nn.Module | None = None):
        convtr = module.convtr.convtr
        if not module.causal:
            raise NotStreamableError(
                f"{path}: non-causal StreamableConvTranspose1d (causal=False) trims its output symmetrically, "
                f"so it needs the end of the signal: streaming needs a causal model such as encodec_model_24khz")
        if not isinstance(module.convtr.norm, nn.Identity):
            raise NotStreamableError(f"{path}: norm {type(module.convtr.norm).__name__} (time_group_norm) "
                                     f"normalises over the whole time axis: not streamable")
        if convtr.padding[0] or convtr.output_padding[0] or convtr.dilation[0] != 1:
            raise NotStreamableError(f"{path}: ConvTranspose1d with padding/output_padding/dilation is not "
                                     f"SEANet's and is not supported for streaming")
        self.kernel_size = convtr.kernel_size[0]
        self.stride = convtr.stride[0]
        self.groups = convtr.groups
        self.overlap = self.kernel_size - self.stride
        if self.overlap < 0:
            raise NotStreamableError(f"{path}: kernel {self.kernel_size} < stride {self.stride}")
        right = math.ceil(self.overlap * module.trim_right_ratio)
        self.trim_left = self.overlap - right
        self.in_channels, self.out_channels = convtr.in_channels, convtr.out_channels
        self.weight = _FoldedWeight(convtr, pack_conv_transpose1d)
        self.conv_params = convtr._parameters
        self.act = None if act is None else _pointwise(act)
        self.act_name = None if act is None else type(act).__name__
        self.conv = conv_transpose1d_step
        self.fast = self.groups == 1 and (act is None or type(act) is nn.ELU)
        self.alpha = float(act.alpha) if type(act) is nn.ELU else None

    def describe(self):
        a = f"{self.act_name}+" if self.act_name else ""
        return (f"{a}ConvTr({self.in_channels}->{self.out_channels},k{self.kernel_size},s{self.stride},"
                f"g{self.groups},trim{self.trim_left})")

    def new_slots(self, slots, batch, hint, like):
        self.idx = len(slots)
        slots.append(_Slot(pending=_time_major(like, batch, self.out_channels, self.overlap), skip=self.trim_left,
                           total=0))
        return hint * self.stride

    def push(self, x, slots):
        st = slots[self.idx]
        T = x.shape[-1]
        kernels = slots.kernels
        # past the left trim (none in the 24 kHz model) every input frame completes `stride` outputs
        if kernels is not None and not st.skip and self.fast and self.conv is conv_transpose1d_step:
            if self.overlap > 1 and st.pending.stride(2) != self.out_channels:
                st.pending = _tm(_tm(st.pending).contiguous())
            out = _out_view(slots, self.idx, x, self.out_channels, T * self.stride)
            kernels.convtr_push(x, self.alpha, self.kernel_size, self.stride, self.weight.panels(kernels),
                                self.conv_params["bias"], st.pending, 0, out)
            st.total += T
            return out
        if self.act is not None:
            x = self.act(x)
        w, packed = self.weight.get()
        y = self.conv(x, w, self.stride, self.groups, packed)
        ov, done = self.overlap, T * self.stride
        if ov:
            y[:, :, :ov].add_(st.pending)
            st.pending.copy_(y[:, :, done:])
        out = y[:, :, :done]
        bias = self.conv_params["bias"]
        if bias is not None:
            out.add_(bias.unsqueeze(-1))
        st.total += T
        if st.skip:
            drop = min(st.skip, done)
            st.skip -= drop
            if drop == done:
                return None
            out = out[:, :, drop:]
        return out

    def flush(self, slots):
        st = slots[self.idx]
        if st.total == 0 or self.trim_left == 0:
            return None
        # the offline output ends trim_left samples into the overlap (the rest is the causal right trim);
        # skip > 0 when the whole stream is shorter than the left trim
        tail = st.pending[:, :, st.skip:self.trim_left].clone()
        bias = self.conv_params["bias"]
        if bias is not None:
            tail.add_(bias.unsqueeze(-1))
        st.skip = 0
        return tail


class _LSTMWeights:
    """Per layer (W_ih^T, W_hh^T, b_ih + b_hh), transposed and contiguous, cached under the one cache rule.
    The (K, 4H) layout: MKL reads a 1 x 512 x 2048 GEMV 1.8x faster this way than as (4H, K)."""

    def __init__(self, lstm: nn.LSTM):
        self.params = lstm._parameters
        self.names = [(f"weight_ih_l{i}", f"weight_hh_l{i}", f"bias_ih_l{i}", f"bias_hh_l{i}")
                      for i in range(lstm.num_layers)]
        self.memo = _cache.Memo()

    def get(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        ts = [self.params[n] for names in self.names for n in names]

        def make():
            with torch.no_grad(), torch.inference_mode(False):
                return [(w_ih.t().contiguous(), w_hh.t().contiguous(), b_ih + b_hh)
                        for w_ih, w_hh, b_ih, b_hh in zip(*[iter(ts)] * 4)]

        return self.memo.get(_LSTM_T, ts, make)


def _lstm_pointwise(gates: torch.Tensor, c: torch.Tensor, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's LSTM cell after the GEMMs; gates (B, 4H) in order i, f, g, o -> (h, c) (B, H)."""
    s = torch.sigmoid(gates)
    c = torch.addcmul(s[:, hidden:2 * hidden] * c, s[:, :hidden], torch.tanh(gates[:, 2 * hidden:3 * hidden]))
    return s[:, 3 * hidden:] * torch.tanh(c), c


class _LSTM(_Step):
    """``StreamableLSTM``. With the streaming kernels: the fused C++ LSTM (``fastcodec.ops.lstm``), ``h``/``c``
    updated in place, output into the step's reused buffer. Otherwise layer by layer: one GEMM for the chunk's
    input projection, then per step ``gates += h W_hh^T`` and the cell's pointwise ops (``torch.lstm_cell``
    reads its (4H, K) weights at half that rate: 1.36 vs 0.66 ms per layer and step, out of cache).
    Slot: ``h``, ``c`` (B, layers, H)."""

    def __init__(self, module: nn.Module, path: str):
        lstm = module.lstm
        if lstm.bidirectional or lstm.batch_first or lstm.proj_size or not lstm.bias:
            raise NotStreamableError(f"{path}: only the unidirectional LSTM with biases that SEANet builds "
                                     f"is supported for streaming")
        self.layers = lstm.num_layers
        self.skip = module.skip
        self.in_channels = lstm.input_size
        self.out_channels = lstm.hidden_size
        self.weights = _LSTMWeights(lstm)
        self.lstm = lstm
        self.packed = None  # fastcodec.ops.lstm.PackedLSTMWeights, made on first use

    def describe(self):
        return f"LSTM({self.in_channels},{self.layers}{',skip' if self.skip else ''})"

    def new_slots(self, slots, batch, hint, like):
        self.idx = len(slots)
        slots.append(_Slot(h=like.new_zeros(batch, self.layers, self.out_channels),
                           c=like.new_zeros(batch, self.layers, self.out_channels)))
        return hint

    def _push_fused(self, fused, x, slots, st):
        T = x.shape[-1]
        xt = x.permute(2, 0, 1)  # (T, B, C): unit stride along C from a time-major step output
        if xt.stride(2) != 1:
            xt = xt.contiguous()
        entry = slots.outs.get(self.idx)
        if entry is None or entry[0] != T:
            store = entry[2] if entry is not None and entry[2].shape[0] >= T else \
                torch.empty(T, x.shape[0], self.out_channels, dtype=x.dtype, device=x.device)
            entry = slots.outs[self.idx] = (T, (store[:T], store[:T].permute(1, 2, 0)), store)
        out, y = entry[1]
        if self.packed is None:
            self.packed = fused.PackedLSTMWeights(self.lstm)
        if st.h.stride(2) != 1 or st.c.stride(2) != 1:  # StreamState.cat/select keep the other layout
            st.h, st.c = st.h.contiguous(), st.c.contiguous()
        fused.forward_packed(xt, self.packed.get(), st.h.transpose(0, 1), st.c.transpose(0, 1), out)
        if self.skip:
            y.add_(x)
        return y

    def push(self, x, slots):
        st = slots[self.idx]
        if slots.kernels is not None:
            fused = _fused_lstm()
            if fused is not None:
                return self._push_fused(fused, x, slots, st)
        B, C, T = x.shape
        H = self.out_channels
        seq = x.transpose(1, 2)  # [B, T, C]
        for i, (w_ih_t, w_hh_t, bias) in enumerate(self.weights.get()):
            gates = torch.addmm(bias, seq.reshape(B * T, seq.shape[-1]), w_ih_t).view(B, T, 4 * H)
            h, c = st.h[:, i], st.c[:, i]
            outs = []
            for t in range(T):
                h, c = _lstm_pointwise(gates[:, t].addmm_(h, w_hh_t), c, H)
                outs.append(h)
            st.h[:, i].copy_(h)
            st.c[:, i].copy_(c)
            seq = outs[0].unsqueeze(1) if T == 1 else torch.stack(outs, 1)
        y = seq.transpose(1, 2)  # fresh: the last layer's h (also copied into the state)
        if self.skip:
            y.add_(x)
        return y

    def flush(self, slots):
        return None


def _push_chain(steps, x, slots):
    for step in steps:
        x = step.push(x, slots)
        if x is None:
            return None
    return x


def _flush_chain(steps, slots):
    carry = None
    for step in steps:
        y = None if carry is None else step.push(carry, slots)
        carry = _cat(y, step.flush(slots))
    return carry


class _Residual(_Step):
    """``SEANetResnetBlock``: ``shortcut(x) + block(x)``. The block's reflect-padded conv starts later than
    the shortcut; the join slot keeps each branch's outputs not yet matched (``pend_a``, ``pend_b``, only
    during start-up: afterwards both branches emit one output per input)."""

    def __init__(self, block: list[_Step], shortcut: list[_Step], channels: int):
        self.block = block
        self.shortcut = shortcut
        self.in_channels = self.out_channels = channels

    def describe(self):
        sc = ",".join(s.describe() for s in self.shortcut) or "Identity"
        return f"Residual([{','.join(s.describe() for s in self.block)}]+[{sc}])"

    def new_slots(self, slots, batch, hint, like):
        out = hint
        for s in self.block:
            out = s.new_slots(slots, batch, out, like)
        for s in self.shortcut:
            s.new_slots(slots, batch, hint, like)
        self.idx = len(slots)
        empty = like.new_zeros(batch, self.out_channels, 0)
        slots.append(_Slot(pend_a=empty, pend_b=empty.clone(), unmatched=0))
        return out

    def _join(self, a, b, slots):
        st = slots[self.idx]
        if not st.unmatched:
            if a is not None and b is not None and a.shape[-1] == b.shape[-1]:
                return b.add_(a)
            if a is None and b is None:
                return None
        A = torch.cat([st.pend_a] + ([] if a is None else [a]), -1)
        B = torch.cat([st.pend_b] + ([] if b is None else [b]), -1)
        m = min(A.shape[-1], B.shape[-1])
        st.pend_a, st.pend_b = A[:, :, m:].clone(), B[:, :, m:].clone()
        st.unmatched = st.pend_a.shape[-1] + st.pend_b.shape[-1]
        return A[:, :, :m] + B[:, :, :m] if m else None

    def push(self, x, slots):
        a = _push_chain(self.shortcut, x, slots) if self.shortcut else x
        b = _push_chain(self.block, x, slots)
        return self._join(a, b, slots)

    def flush(self, slots):
        a = _flush_chain(self.shortcut, slots) if self.shortcut else None
        b = _flush_chain(self.block, slots)
        out = self._join(a, b, slots)
        if slots[self.idx].unmatched:
            raise RuntimeError("streaming residual block: branch lengths differ at flush (internal error)")
        return out


_STEP_BUILDERS: dict[type, tp.Callable] = {}


def register_step_builder(cls: type, builder: tp.Callable) -> None:
    """Teach the planner a module class: ``builder(module, path, act) -> list of steps`` (``act`` is the
    pointwise module right before it in a Sequential, or None). Looked up along the class's MRO, before the
    reference classes, so fast modules can bring their own steps."""
    _STEP_BUILDERS[cls] = builder


def _channels_of(steps: list[_Step], default: int) -> int:
    return steps[-1].out_channels if steps else default


def _build(module: nn.Module, path: str, act: nn.Module | None, channels: int) -> list[_Step]:
    for cls in type(module).__mro__:
        if cls in _STEP_BUILDERS:
            return list(_STEP_BUILDERS[cls](module, path, act))
    pre = [] if act is None else [_Pointwise(act, channels)]
    if isinstance(module, StreamableConv1d):
        return [_Conv(module, path, act)]
    if isinstance(module, StreamableConvTranspose1d):
        return [_ConvTranspose(module, path, act)]
    if isinstance(module, StreamableLSTM):
        return pre + [_LSTM(module, path)]
    if isinstance(module, SEANetResnetBlock):
        block = _build_sequence(module.block, f"{path}.block", channels)
        shortcut = [] if isinstance(module.shortcut, nn.Identity) else \
            _build(module.shortcut, f"{path}.shortcut", None, channels)
        return pre + [_Residual(block, shortcut, _channels_of(block, channels))]
    if isinstance(module, nn.Sequential):
        return pre + _build_sequence(module, path, channels)
    if isinstance(getattr(module, "model", None), nn.Sequential):  # SEANetEncoder / SEANetDecoder
        return pre + _build_sequence(module.model, f"{path}.model" if path else "model", channels)
    if isinstance(module, POINTWISE):
        return pre + ([] if isinstance(module, nn.Identity) else [_Pointwise(module, channels)])
    raise NotStreamableError(f"{path or 'module'}: {type(module).__name__} is not a module the streaming planner "
                             f"knows (register_step_builder teaches it)")


def _build_sequence(seq: nn.Sequential, path: str, channels: int) -> list[_Step]:
    steps: list[_Step] = []
    act = None
    for name, child in seq.named_children():
        if isinstance(child, POINTWISE) and not isinstance(child, nn.Identity) and not any(
                cls in _STEP_BUILDERS for cls in type(child).__mro__):
            if act is not None:
                steps.append(_Pointwise(act, channels))
            act = child
            continue
        new = _build(child, f"{path}.{name}", act, channels)
        act = None
        channels = _channels_of(new, channels)
        steps += new
    if act is not None:
        steps.append(_Pointwise(act, channels))
    return steps


class StreamPlan:
    """A module compiled for streaming: its steps (constants precomputed, no module introspection per chunk)
    and a signature that ties states to it. ``in_channels``/``out_channels`` are the stream's; ``hop`` =
    input samples per output frame (encoder), ``upsample`` = output samples per input frame (decoder)."""

    def __init__(self, module: nn.Module):
        self.steps = _build(module, "", None, 0)
        self.in_channels = next((s.in_channels for s in self.steps if s.in_channels), 0)
        if not self.in_channels:
            raise NotStreamableError(f"{type(module).__name__} has no conv or LSTM to stream")
        self.out_channels = self.steps[-1].out_channels or self.in_channels
        self.signature = f"{type(module).__name__}:" + ";".join(s.describe() for s in self.steps)
        self.hop, self.upsample = _rates(self.steps)

    def new_state(self, batch_size: int, like: torch.Tensor, chunk_size: int) -> StreamState:
        slots: list[_Slot] = []
        hint = chunk_size
        for s in self.steps:
            hint = s.new_slots(slots, batch_size, hint, like)
        return StreamState(self.signature, batch_size, slots, like.dtype, like.device)

    def push(self, x: torch.Tensor, state: StreamState) -> torch.Tensor | None:
        return _push_chain(self.steps, x, state.slots)

    def flush(self, state: StreamState) -> torch.Tensor | None:
        return _flush_chain(self.steps, state.slots)


def _rates(steps: list[_Step]) -> tuple[int, int]:
    down = up = 1
    for s in steps:
        if isinstance(s, _Conv):
            down *= s.stride
        elif isinstance(s, _ConvTranspose):
            up *= s.stride
    return down, up


_PLANS: "weakref.WeakKeyDictionary[nn.Module, StreamPlan]" = weakref.WeakKeyDictionary()


def plan_of(module: nn.Module) -> StreamPlan:
    """The module's streaming plan, compiled on first use and cached beside the module (so it is neither in
    the module's state_dict nor pickled or deep-copied with it)."""
    plan = _PLANS.get(module)
    if plan is None:
        plan = _PLANS[module] = StreamPlan(module)
    return plan


def _like(module: nn.Module) -> torch.Tensor:
    p = next(module.parameters(), None)
    if p is None:
        raise NotStreamableError(f"{type(module).__name__} has no parameters to stream with")
    return p.detach()


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def stream_state(module: nn.Module, batch_size: int, chunk_size: int | None = None):
    """A fresh state for ``batch_size`` independent streams through ``module``.

    SEANet encoder/decoder (or any module of the reference structure): a ``StreamState``; an EnCodec model:
    a ``CodecStreamState`` (audio -> codes -> audio). ``chunk_size`` (input samples, or latent frames for a
    decoder) sizes the buffers so that chunks up to that length never reallocate; larger ones grow them once.
    """
    if _is_codec(module):
        return _codec_state(module, batch_size, chunk_size)
    _check_batch_size(batch_size)
    plan = plan_of(module)
    if chunk_size is None:
        chunk_size = plan.hop
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    return plan.new_state(batch_size, _like(module), chunk_size)


def _check_hooks(module: nn.Module, what: str) -> None:
    if _hooks.has_inner_hooks(module):
        raise RuntimeError(f"{what}: {type(module).__name__} has hooks on inner modules (or global module hooks); "
                           "streaming runs fused steps that would never call them. Remove the hooks, or run "
                           "the module offline, where they fire as in audiocraft")


def _check_state(plan: StreamPlan, state, what: str) -> None:
    if not isinstance(state, StreamState):
        raise TypeError(f"{what}: state must be a StreamState (from stream_state), got {type(state).__name__}")
    if state.signature != plan.signature:
        raise ValueError(f"{what}: this state was made for another module (its plan differs)")
    if state.finished:
        raise ValueError(f"{what}: this stream was flushed; start a new one with stream_state")


def _check_chunk(plan: StreamPlan, chunk, state: StreamState, what: str) -> None:
    if not isinstance(chunk, torch.Tensor):
        raise TypeError(f"{what} expects a torch.Tensor chunk, got {type(chunk).__name__}")
    if chunk.dim() != 3:
        raise ValueError(f"{what} expects a chunk of shape (batch, {plan.in_channels}, time), got shape "
                         f"{tuple(chunk.shape)}")
    if chunk.shape[1] != plan.in_channels:
        raise ValueError(f"{what} expects {plan.in_channels} channels, got {chunk.shape[1]} "
                         f"(chunk of shape {tuple(chunk.shape)})")
    if chunk.shape[2] == 0:
        raise ValueError(f"{what} got an empty chunk (shape {tuple(chunk.shape)}); chunks need >= 1 sample")
    if chunk.shape[0] != state.batch_size:
        raise ValueError(f"{what}: chunk has batch {chunk.shape[0]} but the state holds {state.batch_size} "
                         f"stream(s)")
    if chunk.dtype != state.dtype:
        raise TypeError(f"{what}: chunk dtype {chunk.dtype} does not match the state's {state.dtype} "
                        f"(the module's weights)")
    if chunk.device != state.device:
        raise ValueError(f"{what}: chunk is on {chunk.device} but the state is on {state.device}")


_KERNELS: dict[tp.Any, tp.Any] = {}


def _stream_kernels(state: StreamState):
    """csrc/stream_cpu.cpp when this state's chunks may use it (float32 on CPU, conv backend ``cpp``), else None.
    A failed build warns once and streams through ATen, or raises when ``cpp`` was forced."""
    if state.dtype != torch.float32 or state.device.type != "cpu":
        return None
    # the backend choice per setting of the variables it reads: _backend.choose costs 7 us, a chunk ~1 ms
    env = (os.environ.get("FASTCODEC_CONV_BACKEND"), os.environ.get("FASTCODEC_BACKEND"))
    backend = _KERNELS.get(env)
    if backend is None:
        backend = _KERNELS[env] = _backend.choose("conv", "cpu")
    if backend != "cpp":
        return None
    kernels = _KERNELS.get("ext")
    if kernels is None:
        try:
            kernels = _KERNELS["ext"] = _extensions.load_named("stream_cpu")
        except _extensions.ExtensionBuildError as e:
            if _backend.requested("conv") == "cpp":
                raise _backend.BackendUnavailableError(f"FASTCODEC_BACKEND=cpp was forced but the streaming "
                                                       f"kernels cannot be built: {e}") from e
            kernels = _KERNELS["ext"] = False
            warnings.warn(f"fastcodec: streaming runs on ATen ops (slower): {e}", RuntimeWarning, stacklevel=3)
    return kernels or None


def _fused_lstm():
    """``fastcodec.ops.lstm`` when its extension builds, else None: the ATen LSTM step, after one warning (or
    BackendUnavailableError when the ``cpp`` backend was forced)."""
    fused = _KERNELS.get("lstm")
    if fused is None:
        try:
            from .ops import lstm as fused

            fused.extension()
        except _extensions.ExtensionBuildError as e:
            if _backend.requested("conv") == "cpp":
                raise _backend.BackendUnavailableError(f"FASTCODEC_BACKEND=cpp was forced but the fused LSTM "
                                                       f"cannot be built: {e}") from e
            warnings.warn(f"fastcodec: the streaming LSTM step runs on ATen ops (slower): {e}", RuntimeWarning,
                          stacklevel=3)
            fused = False
        _KERNELS["lstm"] = fused
    return fused or None


def stream(module: nn.Module, chunk: torch.Tensor, state):
    """Push ``chunk`` (B, C_in, n), n >= 1, through ``module``; returns ``(out, state)``.

    ``out`` (B, C_out, m) holds every output that the input so far determines (m may be 0). An EnCodec model
    streams audio -> audio (see ``stream_encode``/``stream_decode`` for the codes).
    """
    if _is_codec(module):
        return _codec_stream(module, chunk, state)
    plan = plan_of(module)
    _check_state(plan, state, "stream")
    _check_chunk(plan, chunk, state, "stream")
    _check_hooks(module, "stream")
    kernels = state.slots.kernels = _stream_kernels(state)
    with torch.no_grad(), _cache.trusting(state.trust_epoch):
        y = plan.push(chunk, state)
    if y is None:
        return chunk.new_zeros(chunk.shape[0], plan.out_channels, 0), state
    # with the kernels, y may be a step's reused output buffer: the caller gets its own copy
    return (y.clone(memory_format=torch.contiguous_format) if kernels is not None else y.contiguous()), state


def stream_flush(module: nn.Module, state) -> torch.Tensor:
    """End the stream: the outputs that the offline pass computes from its end padding, (B, C_out, m)."""
    if _is_codec(module):
        return _codec_flush(module, state)
    plan = plan_of(module)
    _check_state(plan, state, "stream_flush")
    _check_hooks(module, "stream_flush")
    kernels = state.slots.kernels = _stream_kernels(state)
    with torch.no_grad(), _cache.trusting(state.trust_epoch):
        y = plan.flush(state)
    state.finished = True
    if y is None:
        return _like(module).new_zeros(state.batch_size, plan.out_channels, 0)
    return y.clone(memory_format=torch.contiguous_format) if kernels is not None else y.contiguous()


def _is_codec(module) -> bool:
    return all(hasattr(module, a) for a in ("encoder", "decoder", "quantizer"))


def _check_codec(model: nn.Module) -> None:
    plan_of(model.encoder)  # non-causal convs are the first reason to refuse (48 kHz, MusicGen 32 kHz)
    plan_of(model.decoder)
    if getattr(model, "normalize", False):
        raise NotStreamableError("this EnCodec model normalises each segment by its RMS volume over the whole "
                                 "segment (normalize=True): not streamable")
    if getattr(model, "segment", None) is not None:
        raise NotStreamableError(f"this EnCodec model encodes {model.segment} s segments with overlap-add "
                                 f"(segment={model.segment}): not streamable")


def encode_state(model: nn.Module, batch_size: int, chunk_size: int | None = None) -> StreamState:
    """State of audio -> codes streams (the encoder's ``StreamState``)."""
    _check_codec(model)
    return stream_state(model.encoder, batch_size, chunk_size)


def stream_encode(model: nn.Module, chunk: torch.Tensor, state: StreamState):
    """Audio chunk (B, channels, n) -> ``(codes (B, K, frames), state)`` at the model's current bandwidth
    (K = ``quantizer.num_codebooks``); frames may be 0."""
    if hasattr(model, "_check_wav"):
        model._check_wav(chunk)
    emb, state = stream(model.encoder, chunk, state)
    return _quantize(model, emb, state), state


def stream_encode_flush(model: nn.Module, state: StreamState) -> torch.Tensor:
    """The codes (B, K, frames) that the offline pass has and the chunks did not emit yet: those of the end
    padding. ``cat(chunk codes + [flush], -1) == model.encode(whole)[0][0]``; frames is 0 when the chunks
    already emitted them all (a causal model whose input length is a multiple of the hop needs no end
    padding), and ``stream_decode`` accepts those empty codes."""
    return _quantize(model, stream_flush(model.encoder, state), state)


def _quantize(model: nn.Module, emb: torch.Tensor, state: StreamState) -> torch.Tensor:
    if emb.shape[-1] == 0:
        return torch.zeros(emb.shape[0], model.quantizer.num_codebooks, 0, dtype=torch.long, device=emb.device)
    with torch.no_grad(), _cache.trusting(state.trust_epoch):
        return model.quantizer.encode(emb)


def decode_state(model: nn.Module, batch_size: int, chunk_size: int | None = None) -> StreamState:
    """State of codes -> audio streams (the decoder's ``StreamState``); ``chunk_size`` in frames."""
    _check_codec(model)
    return stream_state(model.decoder, batch_size, 1 if chunk_size is None else chunk_size)


def stream_decode(model: nn.Module, codes: torch.Tensor, state: StreamState):
    """Codes (B, K, frames >= 0) -> ``(audio (B, channels, n), state)``; zero frames give empty audio."""
    if isinstance(codes, torch.Tensor) and codes.dim() == 3 and codes.shape[-1] == 0:
        return _empty_decode(model, codes, state), state
    with torch.no_grad(), _cache.trusting(state.trust_epoch):
        emb = model.quantizer.decode(codes)
    return stream(model.decoder, emb, state)


def _empty_decode(model: nn.Module, codes: torch.Tensor, state: StreamState) -> torch.Tensor:
    """The checks of a decode step on zero frames (what stream_encode returns before its first frame)."""
    plan = plan_of(model.decoder)
    _check_state(plan, state, "stream_decode")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"stream_decode: codes must be an integer tensor (int64 preferred), got {codes.dtype}")
    max_n_q = getattr(model.quantizer, "max_n_q", None) or model.quantizer.total_codebooks
    if not 1 <= codes.shape[1] <= max_n_q:
        raise ValueError(f"stream_decode: codes have {codes.shape[1]} codebooks; expected 1 to {max_n_q} "
                         f"(shape {tuple(codes.shape)})")
    if codes.shape[0] != state.batch_size:
        raise ValueError(f"stream_decode: codes have batch {codes.shape[0]} but the state holds "
                         f"{state.batch_size} stream(s)")
    if codes.device != state.device:
        raise ValueError(f"stream_decode: codes are on {codes.device} but the state is on {state.device}")
    return _like(model.decoder).new_zeros(codes.shape[0], plan.out_channels, 0)


def stream_decode_flush(model: nn.Module, state: StreamState) -> torch.Tensor:
    """The last audio samples (B, channels, n) of the decoded stream."""
    return stream_flush(model.decoder, state)


def _codec_state(model, batch_size, chunk_size) -> CodecStreamState:
    enc = encode_state(model, batch_size, chunk_size)
    frames = None if chunk_size is None else max(1, chunk_size // plan_of(model.encoder).hop)
    return CodecStreamState(enc, decode_state(model, batch_size, frames))


def _check_codec_state(state, what: str) -> None:
    if not isinstance(state, CodecStreamState):
        raise TypeError(f"{what}: state must be a CodecStreamState (from the model's stream_state), "
                        f"got {type(state).__name__}")


def _codec_stream(model, chunk, state):
    _check_codec_state(state, "stream")
    codes, _ = stream_encode(model, chunk, state.encoder)
    state.samples_in += chunk.shape[-1]
    if codes.shape[-1] == 0:
        return chunk.new_zeros(chunk.shape[0], model.channels, 0), state
    audio, _ = stream_decode(model, codes, state.decoder)
    if state.samples_out + audio.shape[-1] > state.samples_in:
        raise RuntimeError("streaming codec emitted audio past its input (internal error)")
    state.samples_out += audio.shape[-1]
    return audio, state


def _codec_flush(model, state) -> torch.Tensor:
    _check_codec_state(state, "stream_flush")
    codes = stream_encode_flush(model, state.encoder)
    parts = []
    if codes.shape[-1]:
        parts.append(stream_decode(model, codes, state.decoder)[0])
    parts.append(stream_decode_flush(model, state.decoder))
    audio = torch.cat(parts, -1)[:, :, :max(0, state.samples_in - state.samples_out)]  # forward's trim
    state.samples_out += audio.shape[-1]
    return audio


class StreamingMixin:
    """``stream_state`` / ``stream`` / ``stream_flush`` methods for a SEANet encoder or decoder (or any module
    of the reference structure); put it before the module class in the bases.

    Also audiocraft's convention for one stream at a time: ``with m.streaming(): y = m(chunk)`` (the state
    lives on the module inside the block; ``m.flush()`` ends it and returns the tail).
    """

    def stream_state(self, batch_size: int, chunk_size: int | None = None) -> StreamState:
        return stream_state(self, batch_size, chunk_size)

    def stream(self, chunk: torch.Tensor, state: StreamState):
        return stream(self, chunk, state)

    def stream_flush(self, state: StreamState) -> torch.Tensor:
        return stream_flush(self, state)

    @contextlib.contextmanager
    def streaming(self):
        """Inside the block, calls of this module **from this thread** are chunks of one stream (other threads'
        calls stay offline); ``flush()`` ends the stream and returns its tail."""
        boxes = self.__dict__.setdefault("_fastcodec_streaming", {})
        tid = threading.get_ident()
        if tid in boxes:
            raise RuntimeError("streaming() is already active in this thread for this module")
        boxes[tid] = [None]
        try:
            yield self
        finally:
            boxes.pop(tid, None)

    def _stream_box(self):
        boxes = self.__dict__.get("_fastcodec_streaming")
        return boxes.get(threading.get_ident()) if boxes else None

    def flush(self) -> torch.Tensor:
        box = self._stream_box()
        if box is None or box[0] is None:
            raise RuntimeError("flush() needs an active streaming() block (in this thread) with at least one chunk")
        tail = stream_flush(self, box[0])
        box[0] = None
        return tail

    def __call__(self, x, *args, **kwargs):
        box = self._stream_box()
        if box is None:
            return super().__call__(x, *args, **kwargs)
        if box[0] is None:
            if not isinstance(x, torch.Tensor) or x.dim() != 3:
                raise ValueError("streaming(): chunks must be (batch, channels, time) tensors")
            box[0] = stream_state(self, x.shape[0], x.shape[-1])
        y, box[0] = stream(self, x, box[0])
        return y


class CodecStreamingMixin:
    """Streaming methods for an EnCodec model: ``encode_state``/``stream_encode``/``stream_encode_flush``
    (audio -> codes), ``decode_state``/``stream_decode``/``stream_decode_flush`` (codes -> audio) and
    ``stream_state``/``stream``/``stream_flush`` (audio -> audio, tail trimmed to the input length)."""

    def encode_state(self, batch_size: int, chunk_size: int | None = None) -> StreamState:
        return encode_state(self, batch_size, chunk_size)

    def stream_encode(self, chunk: torch.Tensor, state: StreamState):
        return stream_encode(self, chunk, state)

    def stream_encode_flush(self, state: StreamState) -> torch.Tensor:
        return stream_encode_flush(self, state)

    def decode_state(self, batch_size: int, chunk_size: int | None = None) -> StreamState:
        return decode_state(self, batch_size, chunk_size)

    def stream_decode(self, codes: torch.Tensor, state: StreamState):
        return stream_decode(self, codes, state)

    def stream_decode_flush(self, state: StreamState) -> torch.Tensor:
        return stream_decode_flush(self, state)

    def stream_state(self, batch_size: int, chunk_size: int | None = None) -> CodecStreamState:
        return stream_state(self, batch_size, chunk_size)

    def stream(self, chunk: torch.Tensor, state: CodecStreamState):
        return stream(self, chunk, state)

    def stream_flush(self, state: CodecStreamState) -> torch.Tensor:
        return stream_flush(self, state)


class StreamingSEANetEncoder(StreamingMixin, _RefSEANetEncoder):
    """The reference ``SEANetEncoder`` with the streaming methods (same arguments and state_dict)."""


class StreamingSEANetDecoder(StreamingMixin, _RefSEANetDecoder):
    """The reference ``SEANetDecoder`` with the streaming methods (same arguments and state_dict)."""


class StreamingEncodecModel(CodecStreamingMixin, _RefEncodecModel):
    """The reference ``EncodecModel`` with the streaming methods; presets build streaming SEANet modules."""

    @classmethod
    def encodec_model_24khz(cls, **module_classes) -> "StreamingEncodecModel":
        return super().encodec_model_24khz(**{**_STREAMING_SEANET, **module_classes})

    @classmethod
    def encodec_model_48khz(cls, **module_classes) -> "StreamingEncodecModel":
        return super().encodec_model_48khz(**{**_STREAMING_SEANET, **module_classes})


_STREAMING_SEANET = dict(encoder_cls=StreamingSEANetEncoder, decoder_cls=StreamingSEANetDecoder)
