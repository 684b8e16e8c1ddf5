"""Ragged batches: encode clips of different lengths together, each exactly as if it were encoded alone.

``encode_batch(model, wavs)`` takes clips ``(C, T_i)`` of any lengths and returns, for clip ``i``, exactly
``model.encode(wavs[i][None])``: the same list of frames ``(codes (1, K, F), scale (1, 1) or None)``, codes
equal bit for bit, scales equal bit for bit. ``encode_padded(model, x, padding_mask)`` is the same for a
right-padded batch ``(B, C, T)`` with a padding mask (``True`` on real samples, as Hugging Face's
``padding_mask``) or the lengths. "Alone" is encodec's own call on one clip, whatever the model type:

- unsegmented models (24 kHz causal, MusicGen's 32 kHz non-causal): one frame per clip, with
  ``ceil(T_i / hop)`` code frames; the convolutions pad the clip at its own two ends in every layer.
- segmented models (48 kHz: 1 s segments every 0.99 s, each normalised by its own RMS ``scale``): one frame
  per segment of the clip, cut from the clip's own start; the last one is shorter.

How (``strategy(model, wav)`` says which applies):

- ``"padded"`` (unsegmented models whose encoder plan is plain convs + fused ELU, residual blocks and the
  unidirectional LSTM, e.g. every encodec/MusicGen preset without time_group_norm): right-padded batches.
  Before each convolution, the samples just past each clip's valid length are overwritten with the padding
  that clip would get alone (its own reflection, or zeros), so each valid output is computed from the same
  numbers; the LSTM is unidirectional, so the junk past a clip's end never reaches its valid frames. The
  kernels compute each output sample with the same arithmetic whatever the batch size, length and thread
  count (the C++ conv, resblock, LSTM and RVQ kernels are lane-wise; ``tests/test_ragged.py`` checks it), so
  the codes are bitwise those of the clip alone. A clip so short that audiocraft's short-input reflect rule
  applies in some layer (under about 7 frames, ~0.1 s at 24 kHz) is encoded alone.
- ``"segments"`` (segmented models): all segments of all clips, batched by equal length (the full ones
  together, each clip's last one with the others of its length), each normalised on its own first.
- ``"equal-length"`` (unsegmented models whose layers see the whole signal, e.g. time_group_norm): clips of
  equal length batched together.
- ``"one-at-a-time"``: when the encoder or quantizer runs PyTorch's reference code (``FASTCODEC_BACKEND=
  reference``, inner hooks, float64 input, a reference model), whose GEMMs and convolutions may round
  differently at another batch size: each clip through ``model.encode``.

Batches hold at most ``MAX_BATCH_SAMPLES[device]`` samples (batch x channels x time) per encoder call: on the
CPU 10 s of 24 kHz audio, so long clips run alone (a big batch is slower per second of audio there) and short
ones are grouped; clips are sorted by length first, so little padding is computed. How a batch is composed
never changes a result.
"""
from __future__ import annotations

import contextlib
import typing as tp

import torch
from torch import nn

from . import _hooks, _pool
from .reference.model import EncodedFrame, normalize_volume
from .steps import ConvStep as _ConvStep
from .steps import LSTMStep as _LSTMStep
from .steps import ResStep as _ResStep

__all__ = ["encode_batch", "encode_padded", "strategy", "MAX_BATCH_SAMPLES"]

# samples (batch x channels x time) per encoder call, by device type. CPU: 10 s at 24 kHz, about what the
# SEANet's activation pool (128 MiB) holds; a padded B=8 batch of 1-10 s clips measured 0.65x the speed of
# encoding them one at a time (layer outputs leave the cache and the pool). Other devices: 8 clips of 10 s.
MAX_BATCH_SAMPLES = {"cpu": 240_000, "other": 8 * 240_000}


def encode_batch(model: nn.Module, wavs: tp.Sequence[torch.Tensor],
                 bandwidth: float | None = None) -> list[list[EncodedFrame]]:
    """Encode clips of different lengths; result ``i`` equals ``model.encode(wavs[i][None])`` exactly.

    model: a ``fastcodec.EncodecModel`` (any model with encodec 0.1.1's ``encode``; see the module doc for
    which ones are batched). wavs: a sequence of ``(C, T_i)`` float tensors on one device, ``T_i >= 1``.
    bandwidth: kbps, as ``model.set_target_bandwidth`` (the model's own setting is restored afterwards);
    None keeps the model's. Returns per clip the list of frames ``(codes (1, K, F) int64, scale (1, 1) or
    None)``, one per segment (one frame for unsegmented models).
    """
    return _encode(model, _check_clips(model, wavs), bandwidth)


def encode_padded(model: nn.Module, x: torch.Tensor, padding_mask: torch.Tensor | tp.Sequence[int],
                  bandwidth: float | None = None) -> list[list[EncodedFrame]]:
    """``encode_batch`` of a right-padded batch: x ``(B, C, T)``; padding_mask ``(B, T)`` bool, ``True`` on
    each clip's samples (a prefix of each row, as Hugging Face's ``padding_mask``), or the lengths ``(B,)``
    (ints in ``[1, T]``). Result ``i`` equals ``model.encode(x[i:i+1, :, :length_i])``; what the padded
    positions hold is never read."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a (batch, channels, samples) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    lengths = _lengths(padding_mask, x.shape[0], x.shape[2])
    return _encode(model, _check_clips(model, [x[i, :, :n] for i, n in enumerate(lengths)], "x"), bandwidth)


def strategy(model: nn.Module, wav: torch.Tensor) -> str:
    """How ``encode_batch`` batches clips like ``wav`` ``(C, T)`` through ``model``: ``"padded"``,
    ``"segments"``, ``"equal-length"`` or ``"one-at-a-time"`` (see the module doc)."""
    enc, quant = model.encoder, model.quantizer
    probe = wav[None]
    if not hasattr(enc, "_fast_plan") or enc._use_reference(probe) or _has_own_hooks(enc):
        return "one-at-a-time"
    if not hasattr(quant, "_use_reference") or quant._use_reference() or _has_own_hooks(quant):
        return "one-at-a-time"
    if model.segment_length is not None:
        return "segments"
    return "padded" if _supports_padding(enc._fast_plan()) else "equal-length"


# ---------------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------------


def _check_clips(model: nn.Module, wavs, name: str = "wavs") -> list[torch.Tensor]:
    if isinstance(wavs, torch.Tensor) or not isinstance(wavs, tp.Sequence):
        raise TypeError(f"{name} must be a sequence of (channels, samples) tensors, got {type(wavs).__name__}")
    if len(wavs) == 0:
        raise ValueError(f"{name} is empty: nothing to encode")
    first = wavs[0]
    for i, w in enumerate(wavs):
        what = f"{name}[{i}]"
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(w).__name__}")
        if not w.is_floating_point():
            raise TypeError(f"{what} must be a floating point tensor, got {w.dtype}")
        if w.dim() != 2:
            raise ValueError(f"{what} must be (channels, samples), got shape {tuple(w.shape)}")
        if w.shape[0] != model.channels:
            raise ValueError(f"{what} has {w.shape[0]} channel(s); this model takes {model.channels}")
        if w.shape[1] == 0:
            raise ValueError(f"{what} is empty: shape {tuple(w.shape)}")
        if w.dtype != first.dtype or w.device != first.device:
            raise ValueError(f"{what} is {w.dtype} on {w.device}, {name}[0] is {first.dtype} on {first.device}: "
                             "all clips must share dtype and device")
        if not bool(torch.isfinite(w).all()):
            raise ValueError(f"{what} contains NaN or Inf")
    return list(wavs)


def _lengths(padding_mask, batch: int, total: int) -> list[int]:
    if isinstance(padding_mask, torch.Tensor) and padding_mask.dtype == torch.bool:
        if padding_mask.shape != (batch, total):
            raise ValueError(f"padding_mask must be (batch, samples) = {(batch, total)}, "
                             f"got {tuple(padding_mask.shape)}")
        lengths = padding_mask.sum(dim=1)
        prefix = torch.arange(total, device=padding_mask.device)[None, :] < lengths[:, None]
        if not torch.equal(prefix, padding_mask):
            raise ValueError("padding_mask must be True on a prefix of each row (right padding only)")
        lengths = lengths.tolist()
    else:
        if isinstance(padding_mask, torch.Tensor):
            if padding_mask.is_floating_point() or padding_mask.is_complex() or padding_mask.dim() != 1:
                raise TypeError("padding_mask must be a (batch, samples) bool mask or (batch,) integer lengths, "
                                f"got {padding_mask.dtype} of shape {tuple(padding_mask.shape)}")
            lengths = padding_mask.tolist()
        elif isinstance(padding_mask, tp.Sequence) and all(isinstance(n, int) for n in padding_mask):
            lengths = list(padding_mask)
        else:
            raise TypeError("padding_mask must be a (batch, samples) bool mask or (batch,) integer lengths, "
                            f"got {type(padding_mask).__name__}")
        if len(lengths) != batch:
            raise ValueError(f"got {len(lengths)} lengths for a batch of {batch}")
    for i, n in enumerate(lengths):
        if not 1 <= n <= total:
            raise ValueError(f"length of clip {i} is {n}: must be in [1, {total}] (a clip needs a sample)")
    return lengths


@contextlib.contextmanager
def _bandwidth(model: nn.Module, bandwidth: float | None):
    if bandwidth is None:
        yield
        return
    before, n_q = model.bandwidth, model.quantizer.n_q
    model.set_target_bandwidth(bandwidth)
    try:
        yield
    finally:
        model.bandwidth = before
        model.quantizer.set_num_codebooks(n_q)


def _has_own_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or _hooks.has_inner_hooks(module))


# ---------------------------------------------------------------------------------------------
# the strategies
# ---------------------------------------------------------------------------------------------


def _encode(model: nn.Module, clips: list[torch.Tensor], bandwidth: float | None) -> list[list[EncodedFrame]]:
    how = strategy(model, clips[0])
    with _bandwidth(model, bandwidth), torch.no_grad():
        if how == "one-at-a-time":
            return [model.encode(w[None]) for w in clips]
        if how == "segments":
            n, stride = model.segment_length, model.segment_stride
            pieces = [[_normalized(model, w[None, :, off:off + n]) for off in range(0, w.shape[-1], stride)]
                      for w in clips]
        else:
            pieces = [[_normalized(model, w[None])] for w in clips]
        if how == "padded":
            return _encode_padded_pieces(model, pieces)
        return _encode_grouped(model, pieces)


def _normalized(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (1, C, n) -> (the encoder input, scale (1, 1) or None): encodec's ``_encode_frame`` on one piece,
    computed on that piece alone (a batched RMS could sum in another order)."""
    if not model.normalize:
        return x, None
    return normalize_volume(x)


def _batches(items: list[tuple[int, int, int]], channels: int,
             device: torch.device) -> tp.Iterator[list[tuple[int, int, int]]]:
    """items (length, clip, piece) sorted by decreasing length -> runs of at most MAX_BATCH_SAMPLES."""
    budget = MAX_BATCH_SAMPLES["cpu" if device.type == "cpu" else "other"]
    batch: list = []
    for item in items:
        if batch and (len(batch) + 1) * batch[0][0] * channels > budget:
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def _encode_grouped(model, pieces) -> list[list[EncodedFrame]]:
    out: list[list] = [[None] * len(p) for p in pieces]
    items = sorted(((x.shape[-1], i, j) for i, p in enumerate(pieces) for j, (x, _) in enumerate(p)), reverse=True)
    groups: dict[int, list] = {}
    for item in items:
        groups.setdefault(item[0], []).append(item)
    for group in groups.values():
        for batch in _batches(group, model.channels, pieces[0][0][0].device):
            x = torch.cat([pieces[i][j][0] for _, i, j in batch])
            codes = model.quantizer.encode(model.encoder(x))
            for b, (_, i, j) in enumerate(batch):
                out[i][j] = (codes[b:b + 1].clone(), pieces[i][j][1])
    return out


def _encode_padded_pieces(model, pieces) -> list[list[EncodedFrame]]:
    """Unsegmented clips (one piece each) through right-padded batches (see the module doc)."""
    plan = model.encoder._fast_plan()
    out: list = [None] * len(pieces)
    items = []
    for i, [(x, scale)] in enumerate(pieces):
        if _needs_own_call(plan, x.shape[-1]):
            out[i] = [(model.quantizer.encode(model.encoder(x)), scale)]
        else:
            items.append((x.shape[-1], i, 0))
    items.sort(reverse=True)
    for batch in _batches(items, model.channels, pieces[0][0][0].device):
        lengths = [n for n, _, _ in batch]
        total = _padded_length(plan, lengths, model.encoder.hop_length)
        x = pieces[batch[0][1]][0][0].new_zeros(len(batch), model.channels, total)
        for b, (n, i, _) in enumerate(batch):
            x[b, :, :n] = pieces[i][0][0][0]
        z, frames = _run_padded(model.encoder, x, lengths)
        codes = model.quantizer.encode(z)
        for b, (_, i, _) in enumerate(batch):
            out[i] = [(codes[b:b + 1, :, :frames[b]].contiguous(), pieces[i][0][1])]
    return out


# ---------------------------------------------------------------------------------------------
# per-clip padding through the fast SEANet plan
# ---------------------------------------------------------------------------------------------


def _conv_ok(step: _ConvStep) -> bool:
    return step.act is None and isinstance(step.norm, nn.Identity) and step.module.pad_mode in ("constant", "reflect")


def _supports_padding(plan: list) -> bool:
    """Whether every step reads only its own clip's past and present samples plus each conv's padding."""
    for step in plan:
        if isinstance(step, _ConvStep):
            ok = _conv_ok(step)
        elif isinstance(step, _ResStep):
            convs = step.steps + ([step.shortcut] if step.shortcut else [])
            # only the first conv pads: the others are pointwise in time
            ok = all(_conv_ok(s) for s in convs) and all(s.span == 1 and s.stride == 1 for s in convs[1:])
        else:
            ok = isinstance(step, _LSTMStep)
        if not ok:
            return False
    return True


def _padding_conv(step) -> _ConvStep | None:
    if isinstance(step, _ConvStep):
        return step
    return step.steps[0] if isinstance(step, _ResStep) else None


def _conv_padding(conv: _ConvStep, length: int) -> tuple[int, int]:
    return conv.padding(length)


def _walk(plan: list, length: int) -> tp.Iterator[tuple[_ConvStep, int]]:
    """(conv, its input length) for each padding conv of ``plan`` run on ``length`` samples."""
    for step in plan:
        conv = _padding_conv(step)
        if conv is not None:
            yield conv, length
        if isinstance(step, _ConvStep):
            length = -(-length // step.stride)


def _needs_own_call(plan: list, length: int) -> bool:
    """Whether audiocraft's short-input reflect rule (input no longer than the pad: zeros are reflected too)
    applies to a clip of ``length`` samples in some layer; such a clip is encoded alone."""
    for conv, n in _walk(plan, length):
        if conv.module.pad_mode == "reflect" and n <= max(_conv_padding(conv, n)):
            return True
    return False


def _padded_length(plan: list, lengths: list[int], hop: int) -> int:
    """The shortest batch length (the longest clip, plus whole hops) that leaves room, in every layer, for each
    shorter clip's right padding."""
    for extra in range(0, 1 << 20, hop):
        total = max(lengths) + extra
        fits = True
        walks = [list(_walk(plan, n)) for n in lengths]
        for layer, (conv, t) in enumerate(_walk(plan, total)):
            for walk in walks:
                n = walk[layer][1]
                if n != t and n + _conv_padding(conv, n)[1] > t:
                    fits = False
        if fits:
            return total
    raise AssertionError("no batch length leaves room for the padding")  # margin >= 1 frame per hop: unreachable


def _write_padding(x: torch.Tensor, lengths: list[int], conv: _ConvStep) -> None:
    """Write into x (B, C, T) past each clip's length what that clip's conv would pad there alone."""
    total = x.shape[-1]
    for b, n in enumerate(lengths):
        if n == total:
            continue  # the kernel's own padding is the clip's
        right = _conv_padding(conv, n)[1]
        if right == 0:
            continue
        if conv.module.pad_mode == "reflect":
            x[b, :, n:n + right] = x[b, :, n - 1 - right:n - 1].flip(-1)
        else:
            x[b, :, n:n + right] = 0


def _run_padded(encoder: nn.Module, x: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, list[int]]:
    """The fast SEANet forward of the right-padded batch x (B, C, T), which this call may overwrite past each
    clip's length -> (latents (B, D, T'), valid frames per clip)."""
    encoder._check(x)
    lengths = list(lengths)
    with _pool.active(encoder._activation_pool(x)) as pool:
        for step in encoder._fast_plan():
            conv = _padding_conv(step)
            if conv is not None:
                _write_padding(x, lengths, conv)
            x = step(x)
            if isinstance(step, _ConvStep):
                lengths = [-(-n // step.stride) for n in lengths]
        return (x.clone() if pool is not None and pool.owns(x) else x), lengths
