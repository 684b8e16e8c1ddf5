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

Per-chunk work (inference only: it runs under ``torch.no_grad``): the stream walks the module's compiled plan
(``fastcodec.steps``: the same typed steps as the offline forward of a fast SEANet; ``plan_of`` compiles one for
any other module of the reference structure), each step's ``push`` / ``flush`` on its slot of the state. Float32
on the CPU where ``fastcodec._backend`` picks ``cpp`` for the ``streaming`` family, a conv step is one
``fastcodec::conv1d_update`` / ``conv_transpose1d_update`` (``fastcodec.ops.stream``): the chunk goes through the
fused ELU into the step's time-major buffer after the context it holds (moved to the buffer's front when the
chunk would not fit: the past is never re-padded), and the frames it completes come out of a small GEMM into the
step's output buffer, reused chunk after chunk (``_Slots.outs``, not part of the state); the LSTM step is
``fastcodec::lstm_step`` (the ``lstm`` family), ``h`` and ``c`` updated in place. After warm-up a chunk allocates
only the tensor returned to the caller. Otherwise (float64, CUDA, the reference backend, activations other than
ELU, start-up and flush) the steps run ATen: an im2col GEMM on a view of the buffer, with the chunk's few frames
as rows; ``conv1d_step`` / ``conv_transpose1d_step`` are that seam (``register_step_builder`` for module classes
of its own; a step whose seam was replaced keeps ATen). Weights are folded and packed once per parameter change
(``fastcodec._cache``).

A 320-sample chunk of the 24 kHz model reads every float32 weight once (28.3 MiB per direction), so B=1
streaming is bound by memory bandwidth; a batch of streams shares the weight read. Use one thread on a shared
machine: a 2-thread OpenMP barrier waits on a descheduled thread. Measured latencies: ``bench/results``
(``python -m fastcodec.bench.streaming_latency``).
"""
from __future__ import annotations

import contextlib
import os
import threading
import typing as tp
import weakref

import torch
from torch import nn

from . import _backend, _cache, _hooks, steps
from ._stream_state import CodecStreamState, StreamState
from .ops import stream as stream_ops
from .reference.model import EncodecModel as _RefEncodecModel
from .reference.seanet import SEANetDecoder as _RefSEANetDecoder
from .reference.seanet import SEANetEncoder as _RefSEANetEncoder
from .steps import (NotStreamableError, conv1d_step, conv_transpose1d_step, linear_step,  # noqa: F401
                    register_step_builder)
from .steps.base import flush_chain, push_chain

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


# the streaming kernels' weight layouts (fastcodec.ops.stream), under their historical names
pack_conv1d = stream_ops.pack_conv1d_weight
pack_conv_transpose1d = stream_ops.pack_conv_transpose1d_weight


class StreamPlan:
    """A module compiled for streaming: its steps (constants precomputed, no module introspection per chunk)
    and a signature that ties states to it. ``in_channels``/``out_channels`` are the stream's; ``hop`` =
    input samples per output frame (encoder), ``upsample`` = output samples per input frame (decoder)."""

    def __init__(self, module: nn.Module):
        plan = getattr(module, "_fast_plan", None)  # a fast SEANet's own plan: compiled once, walked both ways
        self.steps = plan() if plan is not None else steps.build(module, "", None, 0)
        steps.stream_check(self.steps)
        self.in_channels = next((s.in_channels for s in self.steps if s.in_channels), 0)
        if not self.in_channels:
            raise NotStreamableError(f"{type(module).__name__} has no conv or LSTM to stream")
        self.out_channels = self.steps[-1].out_channels or self.in_channels
        self._signature = f"{type(module).__name__}:" + ";".join(s.describe() for s in self.steps)
        self.hop, self.upsample = _rates(self.steps)

    @property
    def signature(self) -> str:
        """Ties a state to this plan at its current precision (a bf16 state is refused by a float32 module)."""
        return self._signature + (";bf16" if self.steps[0].bf16 else "")

    def new_state(self, batch_size: int, like: torch.Tensor, chunk_size: int) -> StreamState:
        slots: list = []
        hint = chunk_size
        for s in self.steps:
            hint = s.new_slots(slots, batch_size, hint, like)
        return StreamState(self.signature, batch_size, slots, like.dtype, like.device)

    def push(self, x: torch.Tensor, state: StreamState) -> torch.Tensor | None:
        return push_chain(self.steps, x, state.slots)

    def flush(self, state: StreamState) -> torch.Tensor | None:
        return flush_chain(self.steps, state.slots)


def _rates(plan: list[steps.Step]) -> tuple[int, int]:
    down = up = 1
    for s in plan:
        if isinstance(s, steps.ConvStep):
            down *= s.stride
        elif isinstance(s, steps.ConvTrStep):
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
        mine, theirs = plan.signature.endswith(";bf16"), state.signature.endswith(";bf16")
        if mine != theirs and state.signature.removesuffix(";bf16") == plan.signature.removesuffix(";bf16"):
            raise ValueError(f"{what}: this state was made at precision {'bf16' if theirs else 'float32'!r}, and the "
                             f"module now computes at {'bf16' if mine else 'float32'!r}: start a new stream")
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


_CHOICE: dict[tp.Any, tuple] = {}


def _use_kernels(state: StreamState) -> None:
    """Set ``state.slots.kernels`` / ``fused_lstm``: whether this state's chunks run the streaming kernels and the
    C++ LSTM step (float32 on the CPU where ``fastcodec._backend.choose`` picks ``cpp`` for the streaming / lstm
    family; it raises when a forced backend cannot run and warns once when auto falls back to ATen)."""
    slots = state.slots
    if state.dtype != torch.float32 or state.device.type != "cpu":
        slots.kernels, slots.fused_lstm = None, False
        return
    # per setting of the variables the choice reads: _backend.choose costs 7 us, a chunk ~1 ms
    env = tuple(os.environ.get(v) for v in ("FASTCODEC_STREAMING_BACKEND", "FASTCODEC_LSTM_BACKEND",
                                            "FASTCODEC_CONV_BACKEND", "FASTCODEC_BACKEND"))
    choice = _CHOICE.get(env)
    if choice is None:
        choice = _CHOICE[env] = (_backend.choose("streaming", "cpu") == "cpp",
                                 _backend.choose("lstm", "cpu") == "cpp")
    slots.kernels = True if choice[0] else None
    slots.fused_lstm = choice[0] and choice[1]


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
    _use_kernels(state)
    kernels = state.slots.kernels
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
    _use_kernels(state)
    kernels = state.slots.kernels
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
