"""Small ``torch.distributed`` helpers for the quantizer's codebooks (``sync_ema``, docs/distributed-training.md).

Every function is a no-op (or the identity) when ``torch.distributed`` is not initialised or the group has
one process, so the single-process path never touches the distributed package.

- ``broadcast_buffers``: audiocraft's ``flashy.distrib.broadcast_tensors`` (default mode, after k-means init
  and dead-code expiry).
- ``EmaStats``: the one flat buffer that carries every layer's cluster counts and ``embed_sum`` (plus the
  number of frames) through a single all-reduce per training step.
- ``gather_rows``: the k-means sample of all ranks, in rank order (ranks may hold different numbers of rows).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

from .reference.quantization import broadcast_tensors as broadcast_buffers  # noqa: F401  (re-export)


def world_size(group=None) -> int:
    """Number of processes in ``group`` (the default group if None); 1 when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _src(group) -> int:
    """Global rank of the group's rank 0 (the source of every broadcast here)."""
    return 0 if group is None else dist.get_global_rank(group, 0)


def broadcast_(t: torch.Tensor, group=None) -> torch.Tensor:
    """Overwrite ``t`` with the group's rank 0's ``t``, in place; returns ``t``."""
    if world_size(group) > 1:
        dist.broadcast(t, src=_src(group), group=group)
    return t


def broadcast_int(v: int, device: torch.device, group=None) -> int:
    """The group's rank 0's value of ``v``."""
    if world_size(group) == 1:
        return v
    return int(broadcast_(torch.tensor([v], dtype=torch.long, device=device), group).item())


def _all_gather(out: torch.Tensor, t: torch.Tensor, group) -> None:
    """``out`` (W * n, ...) <- every rank's ``t`` (n, ...), in rank order."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    fn(out, t, group=group)


def gather_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """x: (N_r, D) on rank r -> (sum of N_r, D), the ranks' rows in rank order, on every rank.

    Two collectives (sizes, then rows padded to the largest size): used once per layer, at k-means init.
    """
    W = world_size(group)
    if W == 1:
        return x
    x = x.contiguous()
    sizes = torch.zeros(W, dtype=torch.long, device=x.device)
    _all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device), group)
    sizes = sizes.tolist()
    padded = x.new_zeros((max(sizes),) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    out = x.new_empty((W * padded.shape[0],) + tuple(padded.shape[1:]))
    _all_gather(out, padded, group)
    out = out.view((W,) + tuple(padded.shape))
    return torch.cat([out[r, : sizes[r]] for r in range(W)])


class EmaStats:
    """One flat float32 buffer: ``[frames | counts (K, bins) | embed_sum (K, bins, D)]``.

    Each layer writes its counts and ``embed_sum`` (as the EMA kernel computes them: ``ema_update`` with
    ``decay=0`` on zeroed rows gives ``counts`` and ``x^T onehot`` exactly); ``all_reduce`` sums them over
    the group in one call. Counts are integers, exact in float32 below 2^24 frames per code and step.
    Bytes per step: ``4 * (1 + K * bins * (D + 1))``.
    """

    def __init__(self, K: int, bins: int, D: int, device: torch.device):
        self.K, self.bins, self.D = K, bins, D
        self.buf = torch.zeros(1 + K * bins * (D + 1), dtype=torch.float32, device=device)
        self.counts = self.buf[1: 1 + K * bins].view(K, bins)
        self.sums = self.buf[1 + K * bins:].view(K, bins, D)

    def all_reduce(self, frames: int, group=None) -> int:
        """Sum the buffer over the group; returns the total number of frames."""
        if frames >= 2 ** 24:  # the frame count travels in the float32 buffer: exact below 2^24
            raise ValueError(f"sync_ema: {frames} frames on one rank in one step; at most 2^24 - 1 are supported")
        self.buf[0] = float(frames)
        if world_size(group) > 1:
            dist.all_reduce(self.buf, group=group)
        return int(self.buf[0].item())


def buffers_equal_across_ranks(tensors: Iterable[torch.Tensor], group=None) -> bool:
    """True when every tensor is bitwise the same on all ranks of ``group`` (a debugging check:
    one all-gather per tensor)."""
    W = world_size(group)
    if W == 1:
        return True
    ok = True
    for t in tensors:
        t = t.detach().contiguous()
        out = t.new_empty((W * max(t.numel(), 1),))
        _all_gather(out, t.reshape(-1), group)
        out = out.view(W, -1)
        ok &= all(torch.equal(out[r], out[0]) for r in range(W))
    return ok

