"""Reuse of CPU activation buffers across the layers and calls of a fast SEANet's inference forward.

glibc gives a freed multi-megabyte tensor's pages back to the kernel (munmap, or trimming the heap top), so
every layer output of a long signal lands on fresh pages: ~18k page faults per 24 kHz B=1 10 s encoder call.
With glibc's mmap/trim thresholds raised so that pages stay mapped, the encoder and the decoder ran about 13%
faster (measured: bench/results/design-measurements.md). A pool keeps the module's flat float32 buffers
between calls and hands out views of free ones; a buffer is free when no tensor views it any more (its
storage's use count is back to the pool's own reference), so a tensor kept by anyone (a forward hook, a
norm module, autograd) keeps its buffer out of reuse.

``FASTCODEC_POOL_MB`` (default 128) caps the bytes each pool holds (24 kHz B=1 10 s: encoder 59 MiB, decoder
101 MiB; one pool per encoder or decoder module); a request that does not fit gets a plain
tensor. ``0`` turns pooling off. ``fastcodec.release_pools()`` frees every pool's buffers.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import weakref

import torch

_local = threading.local()
_pools: "weakref.WeakSet[ActivationPool]" = weakref.WeakSet()
_DEFAULT_MB = 128


def cap_bytes() -> int:
    """The per-pool cap from ``FASTCODEC_POOL_MB`` (a non-negative number of MiB)."""
    raw = os.environ.get("FASTCODEC_POOL_MB")
    if raw is None or raw.strip() == "":
        return _DEFAULT_MB << 20
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not mb >= 0 or math.isinf(mb):
        raise ValueError(f"FASTCODEC_POOL_MB must be a non-negative number of MiB, got {raw!r}")
    return int(mb * (1 << 20))


def supported() -> bool:
    """Whether this torch exposes a storage's use count (a private API, present since torch 2.0): without it
    no buffer could be proven free, so the forward allocates plainly."""
    return hasattr(torch._C, "_storage_Use_Count")


def _use_count(buf: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(buf.untyped_storage()._cdata)


class ActivationPool:
    """Flat CPU float32 buffers of one module, reused while nothing else views them (see the module doc)."""

    def __init__(self):
        self.slots: list[tuple[torch.Tensor, int]] = []  # (buffer, its use count when nothing views it)
        self.lock = threading.Lock()
        _pools.add(self)

    def nbytes(self) -> int:
        return sum(buf.numel() * buf.element_size() for buf, _ in self.slots)

    def _free(self, slot: tuple[torch.Tensor, int]) -> bool:
        return _use_count(slot[0]) == slot[1]

    def empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A float32 CPU tensor of ``shape`` (uninitialised): a view of a free buffer when one fits."""
        n = math.prod(shape)
        free = [s for s in self.slots if self._free(s)]
        fits = [s for s in free if s[0].numel() >= n]
        if fits:
            return min(fits, key=lambda s: s[0].numel())[0][:n].view(shape)
        cap = cap_bytes()
        for slot in sorted(free, key=lambda s: s[0].numel()):  # make room: drop the free buffers, small first
            if self.nbytes() + 4 * n <= cap:
                break
            # by identity: list.remove would compare the tensors with == (elementwise)
            self.slots = [s for s in self.slots if s is not slot]
        if self.nbytes() + 4 * n > cap:
            return torch.empty(shape, dtype=torch.float32)
        with torch.inference_mode(False):  # a normal tensor: its views are usable outside inference mode too
            buf = torch.empty(n, dtype=torch.float32)
        self.slots.append((buf, _use_count(buf)))
        return buf[:n].view(shape)

    def owns(self, t: torch.Tensor) -> bool:
        ptr = t.untyped_storage().data_ptr()
        return any(buf.untyped_storage().data_ptr() == ptr for buf, _ in self.slots)

    def release(self) -> None:
        self.slots = [s for s in self.slots if not self._free(s)]


@contextlib.contextmanager
def active(pool: ActivationPool | None):
    """Route ``empty`` of this thread to ``pool`` (a pool busy in another thread is not shared: plain tensors)."""
    if pool is None or not pool.lock.acquire(blocking=False):
        yield None
        return
    prev = getattr(_local, "pool", None)
    _local.pool = pool
    try:
        yield pool
    finally:
        _local.pool = prev
        pool.lock.release()


def empty(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """``torch.empty(shape)`` like ``like``, from the active pool for CPU float32."""
    pool = getattr(_local, "pool", None)
    if pool is None or like.device.type != "cpu" or like.dtype != torch.float32:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return pool.empty(tuple(shape))


def release_pools() -> None:
    """Free the buffers of every activation pool that no tensor views (they are rebuilt on the next call)."""
    for pool in list(_pools):
        with pool.lock:
            pool.release()
