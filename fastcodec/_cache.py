"""Values derived from parameters and buffers (folded weight norm, packed panels, stacked codebooks): one rule.

An entry derived from source tensors is valid while every source

- is the same tensor object (weak reference: a new Parameter from ``load_state_dict(assign=True)`` or a
  replaced buffer misses, and so does a new tensor that reuses a freed address),
- has the same dtype, device, shape, strides and data pointer, and the same version counter (in-place writes
  under ``torch.no_grad()``, optimizer steps, ``load_state_dict``),
- and holds the same bytes: a 64-bit xxh3 fingerprint of its contents, taken again at every use. This is what
  catches the writes that no counter sees: ``p.data.copy_(...)`` (audiocraft's EMA and k-means write that way),
  numpy/DLPack aliases, a ``.to(float64).to(float32)`` round trip that lands at the old address.

A fingerprint reads each source once (xxh3 runs at memory speed: ~0.25 ms per 4 MiB codebook set here), much
less than rebuilding the derived value (folding + packing read and write it several times). Two exceptions:

- ``trusting(epoch)``: the per-chunk calls of a stream trust an entry whose fingerprints were checked since the
  stream began (``new_epoch()`` when its state was made): a 320-sample chunk is bound by reading the weights
  once, and reading them twice would double it. So each stream checks every fingerprint once, at its first
  chunk; identity, metadata and version counters are still checked at every chunk. A write through ``.data``
  in the middle of a stream is seen by the next stream, not by the running one (documented).
- values a cache made itself are private (``mark_private``): nobody else writes them, so a cache derived from
  one (packed panels of a folded weight) trusts it.

Sources on other devices than the CPU are not cached: the value is derived at every call (a fold or a stack
is microseconds at GPU bandwidth, and a fingerprint would need a host sync). Inside ``torch.compile`` nothing
is cached either.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from typing import Callable, Sequence

import torch
import xxhash
from torch.utils.weak import WeakIdKeyDictionary

_local = threading.local()
_private = WeakIdKeyDictionary()  # tensors made by a cache: identity -> True


def mark_private(t: torch.Tensor) -> torch.Tensor:
    """Declare ``t`` a value only fastcodec holds and never writes (a cache's own output)."""
    _private[t] = True
    return t


_epochs = itertools.count(1)
_epoch = 0  # the latest epoch handed out; entries record the epoch of their last fingerprint check


def new_epoch() -> int:
    """A new epoch: entries checked before it are not trusted by ``trusting(<it>)``."""
    global _epoch
    _epoch = next(_epochs)
    return _epoch


@contextlib.contextmanager
def trusting(since: int):
    """In this thread, skip the fingerprint of entries already checked in epoch ``since`` or later."""
    prev = getattr(_local, "trust", None)
    _local.trust = since
    try:
        yield
    finally:
        _local.trust = prev


_NUMPY_DTYPES = {torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.uint8, torch.bool}


def fingerprint(t: torch.Tensor) -> int:
    """xxh3-64 of ``t``'s bytes in row-major order (contiguous tensors are read in place)."""
    t = t.detach()
    if t.is_contiguous() and t.dtype in _NUMPY_DTYPES:
        return xxhash.xxh3_64_intdigest(t.numpy())  # the buffer itself: 5 us for a small weight
    if not t.is_contiguous():
        t = t.contiguous()
    return xxhash.xxh3_64_intdigest(t.reshape(-1).view(torch.uint8).numpy())


def _meta(t: torch.Tensor) -> tuple:
    try:
        version = t._version
    except RuntimeError:  # inference tensors have no version counter: the fingerprint covers them
        version = None
    return (t.dtype, t.device, tuple(t.shape), t.stride(), t.data_ptr(), version)


def _quick(ts: Sequence[torch.Tensor]) -> tuple | None:
    try:
        return tuple((t._version, t.data_ptr()) for t in ts)
    except RuntimeError:  # inference tensors: no version counter, so no quick check
        return None


def _fingerprints(ts: Sequence[torch.Tensor]) -> tuple:
    return tuple(None if t in _private else fingerprint(t) for t in ts)


def cacheable(ts: Sequence[torch.Tensor]) -> bool:
    return not torch.compiler.is_compiling() and all(t.device.type == "cpu" for t in ts)


class TensorCache:
    """Derived values keyed by their source tensors (by identity, plus an optional ``extra`` key), valid under
    the module rule above. Thread-safe; entries die with their sources. Not copied or pickled with anything:
    keep it at module level or in a side table, never in an ``nn.Module``'s ``__dict__``."""

    def __init__(self) -> None:
        self._d: dict[tuple, tuple] = {}
        self._lock = threading.Lock()

    def get(self, sources: Sequence[torch.Tensor], make: Callable[[], object], extra: tuple = ()):
        """The value derived from ``sources`` by ``make()``, rebuilt when any source changed."""
        ts = tuple(sources)
        key = tuple(map(id, ts)) + extra
        hit = self._d.get(key)  # a plain dict read (atomic); writers take the lock
        trust = getattr(_local, "trust", None)
        if hit is not None and trust is not None and hit[4] >= trust:
            # inside a stream, after its first check: identity, version and address only (~1 us a source)
            quick, refs = hit[5], hit[0]
            if quick is not None:
                try:
                    for i, t in enumerate(ts):
                        if refs[i]() is not t or quick[i] != (t._version, t.data_ptr()):
                            break
                    else:
                        return hit[3]
                except RuntimeError:  # an inference tensor where the entry had a normal one
                    pass
        if not cacheable(ts):
            return make()
        meta = tuple(_meta(t) for t in ts)
        fps = None
        if hit is not None and hit[1] == meta and all(r() is t for r, t in zip(hit[0], ts)):
            fps = _fingerprints(ts)
            if fps == hit[2]:
                hit[4] = _epoch
                return hit[3]
        if fps is None:
            fps = _fingerprints(ts)
        value = make()
        for v in (value if isinstance(value, (list, tuple)) else (value,)):
            if isinstance(v, torch.Tensor):
                mark_private(v)
        refs = tuple(weakref.ref(t, lambda _r, k=key: self._drop(k)) for t in ts)
        with self._lock:
            self._d[key] = [refs, meta, fps, value, _epoch, _quick(ts)]
        return value

    def _drop(self, key) -> None:
        with self._lock:
            self._d.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()

    def __len__(self) -> int:
        return len(self._d)


class Memo:
    """A one-entry front to a ``TensorCache`` for one owner (a streaming step, a quantizer), for the per-chunk
    calls of a stream: once the value was looked up in the stream's epoch, the next chunks check only that
    the sources are the same objects at the same version and address (as cheap as the old version keys:
    a cold ``TensorCache.get`` walks ~10x more Python objects between two chunks that evict the caches).
    Outside ``trusting`` it always defers to the cache (fingerprints)."""

    __slots__ = ("epoch", "sources", "quick", "value")

    def __init__(self) -> None:
        self.epoch, self.sources, self.quick, self.value = -1, (), None, None

    def hit(self, sources: Sequence[torch.Tensor]):
        """The remembered value if this thread is inside a stream that already looked it up and the sources are
        the same objects at the same version and address; else None."""
        trust = getattr(_local, "trust", None)
        if trust is None or self.epoch < trust or len(sources) != len(self.sources):
            return None
        try:
            for s, t, q in zip(self.sources, sources, self.quick):
                if s is not t or q != (t._version, t.data_ptr()):
                    return None
        except RuntimeError:  # an inference tensor (no version): the cache decides
            return None
        return self.value

    def store(self, sources: Sequence[torch.Tensor], value):
        """Remember ``value``, just obtained from a cache (so checked in the current epoch), for ``sources``."""
        quick = _quick(sources)
        if quick is None:
            self.epoch, self.sources, self.quick, self.value = -1, (), None, None
        else:  # strong references: identity cannot be faked by a new tensor at a reused address
            self.epoch, self.sources, self.quick, self.value = _epoch, tuple(sources), quick, value
        return value

    def get(self, cache: TensorCache, sources: Sequence[torch.Tensor], make: Callable[[], object],
            extra: tuple = ()):
        v = self.hit(sources)
        return v if v is not None else self.store(sources, cache.get(sources, make, extra))
