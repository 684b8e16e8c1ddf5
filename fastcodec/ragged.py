"""Encode clips of different lengths: ``encode_batch(model, wavs, bandwidth=None)``.

THE SIMPLE VERSION: clips of exactly equal length are encoded together (one ``model.encode`` on a stacked
batch), every other clip one at a time. Clip i's result is ``model.encode(wavs[i][None])``: the frames
``(codes (1, K, T_i), scale (1, 1) or None)`` of that clip alone. A batched implementation with padding
masks replaces this module with the same signature and the same results (exact codes).
"""
from __future__ import annotations

import typing as tp

import torch

EncodedFrame = tp.Tuple[torch.Tensor, tp.Optional[torch.Tensor]]


def encode_batch(model, wavs: tp.Sequence[torch.Tensor], bandwidth: tp.Optional[float] = None
                 ) -> list[list[EncodedFrame]]:
    """``[model.encode(w[None]) for w in wavs]``, stacking clips of equal length. ``bandwidth`` (kbps), when
    given, is set on the model first (``model.set_target_bandwidth``)."""
    if bandwidth is not None:
        model.set_target_bandwidth(bandwidth)
    for i, w in enumerate(wavs):
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ValueError(f"wavs[{i}] must be a (channels, samples) tensor, got {getattr(w, 'shape', type(w))}")
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(wavs):
        groups.setdefault(tuple(w.shape), []).append(i)
    out: list[tp.Optional[list[EncodedFrame]]] = [None] * len(wavs)
    with torch.no_grad():
        for idx in groups.values():
            frames = model.encode(torch.stack([wavs[i] for i in idx]))
            for j, i in enumerate(idx):
                out[i] = [(c[j:j + 1], None if s is None else s[j:j + 1]) for c, s in frames]
    return tp.cast(list, out)
