"""Asynchronous input checks for the GPU training step, which must not wait for the device.

A synchronous check (``bool(torch.isfinite(x).all())``) stalls the host until the GPU has caught up, once per
check. Inside ``deferred(device)`` the checks in ``fastcodec.ops._checks`` instead OR a bit into a per-device
error word on the device (a few tensor ops, no transfer); the Triton EMA kernels read that word and leave
every buffer untouched when it is set, so bad input never reaches the codebooks. ``publish`` copies the word
to host memory asynchronously at the end of a step; the next deferred step (or ``check_errors()``, which
waits) raises ``ValueError`` with the same messages the synchronous checks give, and clears the word.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

X_NONFINITE, CODES_RANGE, CODEBOOK_NONFINITE, EMA_NONFINITE = 1, 2, 4, 8
_NO_LAYER = 1 << 62
_MESSAGES = {
    X_NONFINITE: "x contains NaN or Inf: the nearest codeword is undefined",
    CODES_RANGE: "codes out of range [0, bins)",
    EMA_NONFINITE: "ema_update: residuals, cluster_size or embed_avg contains NaN or Inf",
}

_local = threading.local()
_words: dict[torch.device, torch.Tensor] = {}
_pending: dict[torch.device, tuple[torch.Tensor, object]] = {}
_lock = threading.Lock()


def active(device: torch.device) -> torch.Tensor | None:
    """The error word (int64 ``[flags, first bad layer]``) when checks on ``device`` are deferred, else None."""
    dev = getattr(_local, "device", None)
    return _word(device) if dev is not None and dev == device else None


def _word(device: torch.device) -> torch.Tensor:
    with _lock:
        w = _words.get(device)
        if w is None:
            w = _words[device] = torch.tensor([0, _NO_LAYER], dtype=torch.int64, device=device)
        return w


@contextmanager
def deferred(device: torch.device):
    """Checks on ``device`` tensors inside the block record into the error word instead of synchronising."""
    prev = getattr(_local, "device", None)
    _local.device = torch.device(device)
    try:
        yield _word(_local.device)
    finally:
        _local.device = prev


def flag(word: torch.Tensor, bad: torch.Tensor, bit: int) -> None:
    """``word[0] |= bit`` where the 0-dim bool tensor ``bad`` is true (on the device, no sync)."""
    word[:1].bitwise_or_(bad.reshape(1).to(torch.int64) * bit)


def flag_layers(word: torch.Tensor, bad: torch.Tensor, first_layer: int = 0) -> None:
    """Record non-finite codebooks: ``bad`` (K,) bool per layer; keeps the first bad layer's index."""
    idx = torch.arange(first_layer, first_layer + bad.shape[0], device=bad.device)
    first = torch.where(bad, idx, torch.full_like(idx, _NO_LAYER)).amin().reshape(1)
    torch.minimum(word[1:], first, out=word[1:])
    flag(word, bad.any(), CODEBOOK_NONFINITE)


def host_buffer(t: torch.Tensor) -> torch.Tensor:
    """Mark ``t`` as host memory written by an asynchronous copy (read without a device sync; the tests'
    sync counter skips it)."""
    t._fc_host_buffer = True
    return t


def publish(device: torch.device) -> None:
    """Start copying the error word to the host (non-blocking); ``raise_pending`` reads it later."""
    w = _word(torch.device(device))
    if w.device.type == "cuda":
        host = torch.empty(2, dtype=torch.int64, pin_memory=True)
        host.copy_(w, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(w.device))
    else:
        host, ev = w.clone(), None
    _pending[w.device] = (host_buffer(host), ev)


def message(flags: int, layer: int) -> str:
    parts = [m for bit, m in _MESSAGES.items() if flags & bit]
    if flags & CODEBOOK_NONFINITE:
        parts.append(f"vq.layers.{layer}._codebook.embed holds NaN or Inf; a codebook must be finite "
                     f"(reload the state_dict or re-initialise the quantizer)")
    return "; ".join(parts)


def raise_pending(device: torch.device | None = None, wait: bool = False) -> None:
    """Raise ValueError for a failed asynchronous check whose result has arrived (``wait``: wait for it).
    The error word is cleared, so the next step starts clean."""
    for dev in [torch.device(device)] if device is not None else list(_pending):
        got = _pending.get(dev)
        if got is None:
            continue
        host, ev = got
        if ev is not None and not ev.query():
            if not wait:
                continue
            ev.synchronize()
        del _pending[dev]
        flags, layer = (int(v) for v in host.numpy())  # host memory: no device read
        if flags:
            w = _word(dev)
            w[:1].zero_()
            w[1:].fill_(_NO_LAYER)
            raise ValueError(f"fastcodec (asynchronous check of a training step on {dev}, whose codebook "
                             f"update was skipped): {message(flags, layer)}")


def check_errors() -> None:
    """Wait for the asynchronous checks of every device and raise ValueError if one failed."""
    for dev in list(_words):
        if dev not in _pending:
            publish(dev)
    raise_pending(wait=True)
