"""The state of SEANet / EnCodec streams (``fastcodec.streaming``): a plain object of tensors and counters, one
slot per step of the plan, that can be copied, moved, saved, loaded (validated first) and split or joined along
the batch."""
from __future__ import annotations

import typing as tp

import torch
import torch.nn.functional as F

from . import _cache
from .steps.base import _Slot, _Slots, _tm


def _int_fields(slot: _Slot) -> dict:
    return {k: v for k, v in vars(slot).items() if not isinstance(v, torch.Tensor)}


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


