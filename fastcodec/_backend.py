"""Backend choice: the only place that decides which implementation runs.

``FASTCODEC_BACKEND=auto|reference|cpp|triton|cuda`` (default ``auto``) applies to every op family;
``FASTCODEC_RVQ_BACKEND`` / ``FASTCODEC_CONV_BACKEND`` override it for one family.

- ``auto``: the fastest implementation available for the tensor's device. If the preferred one
  cannot run (e.g. the C++ build failed), warn once with the reason and use the reference.
- a forced backend that cannot run for that family and device raises ``BackendUnavailableError``
  with the reason. Never a silent fallback.
"""
from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

BACKENDS = ("reference", "cpp", "triton", "cuda")
FAMILIES = ("rvq", "conv")

# name -> (sources in csrc/, extra cflags). Built lazily by fastcodec._build.load_extension.
CPP_EXTENSIONS: dict[str, tuple[list[str], list[str]]] = {
    "rvq_cpu": (["rvq_cpu.cpp"], []),
    "conv_cpu": (["conv1d_cpu.cpp"], []),
    "lstm_cpu": (["lstm_cpu.cpp"], []),
    "stream_cpu": (["stream_cpu.cpp"], []),
}

# family -> device type -> backends in order of preference (reference is always last)
PREFERENCE: dict[str, dict[str, tuple[str, ...]]] = {
    "rvq": {"cpu": ("cpp", "reference"), "cuda": ("triton", "reference")},
    "conv": {"cpu": ("cpp", "reference"), "cuda": ("cuda", "reference")},
}
# backends a family implements at all, per device type (forcing one outside this raises)
SUPPORTED: dict[str, dict[str, tuple[str, ...]]] = {
    # triton on CPU tensors runs only under TRITON_INTERPRET=1 (tests exercise the kernels that way)
    "rvq": {"cpu": ("cpp", "triton", "reference"), "cuda": ("triton", "reference")},
    "conv": {"cpu": ("cpp", "reference"), "cuda": ("cuda", "reference")},
}


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run here; the message says why."""


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""


_probes: dict[tuple[str, str], Callable[[], Availability]] = {}
_probe_cache: dict[tuple[str, str], Availability] = {}
_warned: set[tuple[str, str, str]] = set()
_lock = threading.Lock()


def register_probe(family: str, backend: str, probe: Callable[[], Availability]) -> None:
    """Ops modules register how to tell whether ``backend`` can run ``family`` (called lazily)."""
    _probes[(family, backend)] = probe
    _probe_cache.pop((family, backend), None)


def probe_by_loading(load: Callable[[], object]) -> Callable[[], Availability]:
    """A probe that is available when ``load()`` (an extension build/import) succeeds, else says why."""

    def probe() -> Availability:
        from ._build import ExtensionBuildError

        try:
            load()
        except ExtensionBuildError as e:
            return Availability(False, str(e))
        return Availability(True)

    return probe


def requested(family: str) -> str:
    v = os.environ.get(f"FASTCODEC_{family.upper()}_BACKEND") or os.environ.get("FASTCODEC_BACKEND") or "auto"
    v = v.strip().lower()
    if v != "auto" and v not in BACKENDS:
        raise ValueError(
            f"FASTCODEC_BACKEND={v!r} is not a backend; choose one of auto, {', '.join(BACKENDS)}"
        )
    return v


def _triton_probe() -> Availability:
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - triton is a runtime dependency
        return Availability(False, f"triton cannot be imported: {e}")
    return Availability(True)


def availability(family: str, backend: str, device_type: str = "cpu") -> Availability:
    """Whether ``backend`` can run ``family`` on ``device_type``, and if not, why."""
    if backend == "reference":
        return Availability(True)
    if backend not in SUPPORTED[family].get(device_type, ()):
        return Availability(
            False,
            f"the {family} ops have no {backend!r} implementation for {device_type} tensors "
            f"(implemented: {', '.join(SUPPORTED[family].get(device_type, ()))})",
        )
    if backend == "triton":
        a = _triton_probe()
        if not a.ok:
            return a
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            return Availability(False, "triton runs on CPU tensors only under TRITON_INTERPRET=1")
        if device_type == "cuda" and not torch.cuda.is_available():
            return Availability(False, "no CUDA device is available")
    key = (family, backend)
    probe = _probes.get(key)
    if probe is None:
        return Availability(False, f"no {backend!r} implementation of the {family} ops is registered")
    with _lock:
        if key not in _probe_cache:
            try:
                _probe_cache[key] = probe()
            except Exception as e:  # a probe must never take the library down
                _probe_cache[key] = Availability(False, f"{type(e).__name__}: {e}")
        return _probe_cache[key]


def choose(family: str, device: torch.device | str) -> str:
    """The backend that runs ``family`` for tensors on ``device`` (see the module docstring)."""
    dtype = torch.device(device).type
    want = requested(family)
    if want != "auto":
        a = availability(family, want, dtype)
        if not a.ok:
            raise BackendUnavailableError(
                f"FASTCODEC_BACKEND={want} was forced for the {family} ops on {dtype}, "
                f"but it cannot run: {a.reason}"
            )
        return want
    prefs = PREFERENCE[family].get(dtype, ("reference",))
    reasons = []
    for b in prefs:
        a = availability(family, b, dtype)
        if a.ok:
            if reasons:
                key = (family, dtype, b)
                if key not in _warned:
                    _warned.add(key)
                    warnings.warn(
                        f"fastcodec: falling back to the {b!r} backend for the {family} ops on {dtype}: "
                        + "; ".join(reasons)
                        + " (see `fastcodec info`; set FASTCODEC_BACKEND to force one)",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            return b
        reasons.append(f"{b}: {a.reason}")
    return "reference"


def backends() -> dict[str, dict[str, dict[str, str]]]:
    """Report: ``{family: {device: {backend: "available" | reason}}}``. Probing may build extensions."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    for fam in FAMILIES:
        out[fam] = {}
        for dev, bs in SUPPORTED[fam].items():
            out[fam][dev] = {}
            for b in bs:
                a = availability(fam, b, dev)
                out[fam][dev][b] = "available" if a.ok else a.reason
    return out
