"""Backend choice: the only place that decides which implementation runs.

``FASTCODEC_BACKEND=auto|reference|cpp|triton|cuda`` (default ``auto``) applies to every op family;
``FASTCODEC_<FAMILY>_BACKEND`` overrides it for one family. The families: ``rvq`` (the quantizer ops), ``conv``
(the SEANet convs and fused residual blocks), ``lstm`` (``fastcodec::lstm`` and the LSTM step) and ``streaming``
(the single-step conv updates). ``lstm`` and ``streaming`` are SEANet kernels too: unless their own variable is
set they follow ``FASTCODEC_CONV_BACKEND`` (``PARENT``), so one variable still switches a whole SEANet.

- ``auto``: the fastest implementation available for the tensor's device. If the preferred one
  cannot run (e.g. the C++ build failed), warn once with the reason and use the reference.
- a forced backend that cannot run for that family and device raises ``BackendUnavailableError``
  with the reason. Never a silent fallback. ``choose`` is the only place that applies this rule; an op asks it
  and runs what it returns.
- ``auto`` on CPU tensors weighs the CPU's SIMD level (``simd_level()``): the C++ kernels are built with
  ``-march=native`` and have AVX-512 and AVX2+FMA paths; without AVX2 they are portable scalar loops,
  slower than the reference, so ``auto`` warns once and uses the reference (forcing ``cpp`` still runs them).
- a value that is not a backend raises ``ValueError`` naming the variable wherever an op reads it; it, a
  backend that a family does not implement and a ``FASTCODEC_*_BACKEND`` name that no family reads also warn
  at import (``check_environment()``) and make ``fastcodec info`` exit 1.
"""
from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ._build import CPP_EXTENSIONS, ExtensionBuildError  # noqa: F401  (CPP_EXTENSIONS: re-exported for info)

BACKENDS = ("reference", "cpp", "triton", "cuda")
FAMILIES = ("rvq", "conv", "lstm", "streaming")
# a family without its own variable set follows its parent's variable before FASTCODEC_BACKEND
PARENT = {"lstm": "conv", "streaming": "conv"}

# family -> device type -> backends in order of preference (reference is always last)
PREFERENCE: dict[str, dict[str, tuple[str, ...]]] = {
    "rvq": {"cpu": ("cpp", "reference"), "cuda": ("triton", "reference")},
    # cuda conv: only where CUDA_CONV_MEASURED_FASTER lists the GPU (see auto_skip_reason)
    "conv": {"cpu": ("cpp", "reference"), "cuda": ("cuda", "reference")},
    # reference: ATen's LSTM (cuDNN on CUDA); the single-step updates as ATen GEMMs
    "lstm": {"cpu": ("cpp", "reference"), "cuda": ("reference",)},
    "streaming": {"cpu": ("cpp", "reference"), "cuda": ("reference",)},
}
# backends a family implements at all, per device type (forcing one outside this raises)
SUPPORTED: dict[str, dict[str, tuple[str, ...]]] = {
    # triton on CPU tensors runs only under TRITON_INTERPRET=1 (tests exercise the kernels that way)
    "rvq": {"cpu": ("cpp", "triton", "reference"), "cuda": ("triton", "reference")},
    "conv": {"cpu": ("cpp", "reference"), "cuda": ("cuda", "reference")},
    "lstm": {"cpu": ("cpp", "reference"), "cuda": ("reference",)},
    "streaming": {"cpu": ("cpp", "reference"), "cuda": ("reference",)},
}


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run here; the message says why."""


GLOBAL_VAR = "FASTCODEC_BACKEND"


def env_var(family: str) -> str:
    """The variable that overrides ``FASTCODEC_BACKEND`` for one family, e.g. ``FASTCODEC_RVQ_BACKEND``."""
    return f"FASTCODEC_{family.upper()}_BACKEND"


# --------------------------------------------------------------------------------------------------
# SIMD level of the CPU: which vector path the C++ kernels compile to (csrc/vf16.h, FC_SIMD_NAME)
# --------------------------------------------------------------------------------------------------

SIMD_LEVELS = ("avx512_bf16", "avx512", "avx2", "portable")  # best first
SIMD_NAMES = {
    "avx512_bf16": "AVX-512 with AVX512_BF16",
    "avx512": "AVX-512",
    "avx2": "AVX2+FMA, no AVX-512",
    "portable": "portable, no AVX2+FMA",
}

# Why `auto` does not pick a family's C++ kernels on a CPU without AVX2+FMA: their portable scalar loops against
# the reference, interleaved on an AMD EPYC Zen 2, 1 thread, shared machine (2026-12-02).
PORTABLE_SLOWER = {
    "rvq": "the RVQ encode 6.8x slower than the reference (B8 T750 K8, 1024 bins, D 128: 5.3 s vs 0.78 s)",
    "conv": "the 24 kHz SEANet encoder 1.8x slower than the reference (B1 10 s: 3.2 s vs 1.7 s)",
    "lstm": "the LSTM 4x slower than the reference (ATen's LSTM)",
    "streaming": "a streamed chunk 3.6x slower than the reference (the ATen steps)",
}
# What the C++ kernels measured against the reference/audiocraft on each vector path (`fastcodec info`).
CPP_MEASURED = {
    ("rvq", "avx2"): "RVQ encode B8 T750 K8 at 2.1x the reference's speed on a Zen 2, 1 thread",
    ("conv", "avx2"): "24 kHz SEANet B1 10 s encoder at 1.4x, decoder 1.6x the reference's speed on a Zen 2, "
                      "1 thread",
    ("streaming", "avx2"): "a streamed chunk at 1.2x the reference's (the ATen steps') speed on a Zen 2, 1 thread",
    ("rvq", "avx512"): "RVQ encode B8 T750 K8 at 4.8x audiocraft's speed on a Zen 4, 2 threads",
    ("conv", "avx512"): "24 kHz SEANet B1 10 s encoder at 2.3x, decoder 1.8x audiocraft's speed on a Zen 4, "
                        "2 threads",
}

_simd: tuple[str, str] | None = None


def _cpuinfo_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _detect_simd() -> tuple[str, str]:
    flags = _cpuinfo_flags()
    if flags is not None:
        source = "/proc/cpuinfo flags"
        if "avx512f" in flags:
            level = "avx512_bf16" if "avx512_bf16" in flags else "avx512"
        elif "avx2" in flags and "fma" in flags:
            level = "avx2"
        else:
            level = "portable"
        return level, source
    # no /proc/cpuinfo: ATen's own CPU capability (cpuinfo library), which knows no AVX512_BF16
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception as e:  # pragma: no cover - torch without the query
        return "portable", f"unknown ({type(e).__name__}: {e}); assumed portable"
    level = {"AVX512": "avx512", "AVX2": "avx2"}.get(cap, "portable")
    return level, f"torch.backends.cpu.get_cpu_capability() = {cap!r}"


def simd_level() -> str:
    """The vector path the C++ kernels (built with ``-march=native``) take on this CPU: ``avx512_bf16``,
    ``avx512``, ``avx2`` or ``portable``. Detected once, from /proc/cpuinfo (else torch's CPU capability)."""
    global _simd
    if _simd is None:
        _simd = _detect_simd()
    return _simd[0]


def simd_source() -> str:
    """Where ``simd_level()`` came from (for ``fastcodec info``)."""
    simd_level()
    return _simd[1]


def kernel_path(level: str) -> str:
    """The ``simd()`` an extension built for ``level`` reports: avx512, avx2 or portable (bf16 is a sub-path)."""
    return "avx512" if level.startswith("avx512") else level


# GPUs (torch.cuda.get_device_name) on which the CUDA conv (csrc/conv1d_cuda.cu) was measured faster than
# cuDNN, with the committed result that shows it. Empty: it has never run on a GPU, so `auto` keeps ATen/cuDNN
# for the convs on CUDA (the transposed conv and the LSTM are ATen there anyway).
CUDA_CONV_MEASURED_FASTER: dict[str, str] = {}
CUDA_CONV_OPT_IN = "FASTCODEC_CONV_BACKEND=cuda"
# a reason that is the default policy, not a failure: `auto` does not warn about it
_POLICY = "cuda: fastcodec's CUDA conv has not been measured faster"


def _cuda_device_name() -> str:
    try:
        return torch.cuda.get_device_name()
    except Exception as e:  # pragma: no cover - no driver
        return f"unknown GPU ({type(e).__name__})"


def auto_skip_reason(family: str, backend: str, device_type: str) -> str | None:
    """Why ``auto`` passes over an available ``backend`` for ``family`` on ``device_type``, or None."""
    if family == "conv" and backend == "cuda" and device_type == "cuda":
        name = _cuda_device_name()
        if name not in CUDA_CONV_MEASURED_FASTER:
            return (f"fastcodec's CUDA conv has not been measured faster than cuDNN on {name} (no committed "
                    f"result), so ATen/cuDNN runs the convs; set {CUDA_CONV_OPT_IN} to opt in")
    if backend == "cpp" and device_type == "cpu" and simd_level() == "portable":
        return (f"this CPU has no AVX2+FMA, so the C++ kernels run their portable scalar loops, which ran "
                f"{PORTABLE_SLOWER[family]}; set {env_var(family)}=cpp to use them anyway")
    return None


# --------------------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------------------


def _parse(var: str) -> str | None:
    """The value of ``var`` (lowercased; None when unset or blank); ValueError naming ``var`` if not a backend."""
    raw = os.environ.get(var)
    if raw is None or not raw.strip():
        return None
    v = raw.strip().lower()
    if v != "auto" and v not in BACKENDS:
        raise ValueError(f"{var}={raw!r} is not a backend; choose one of auto, {', '.join(BACKENDS)}")
    return v


def check_environment() -> list[str]:
    """Problems with the ``FASTCODEC_*BACKEND`` variables: values that are not backends, backends a family
    does not implement on any device, names that no family reads. Empty when all is well."""
    known = [GLOBAL_VAR] + [env_var(f) for f in FAMILIES]
    problems = []
    for var in sorted(k for k in os.environ if k.startswith("FASTCODEC_") and k.endswith("BACKEND")):
        if var not in known:
            problems.append(f"{var} is not read by fastcodec (the variables are {', '.join(known)})")
            continue
        try:
            v = _parse(var)
        except ValueError as e:
            problems.append(str(e))
            continue
        fams = FAMILIES if var == GLOBAL_VAR else [f for f in FAMILIES if env_var(f) == var]
        for fam in fams:
            if v not in (None, "auto", "reference") and not any(v in bs for bs in SUPPORTED[fam].values()):
                impl = "; ".join(f"{', '.join(bs)} on {dev}" for dev, bs in SUPPORTED[fam].items())
                problems.append(f"{var}={v}: the {fam} ops have no {v!r} implementation (implemented: {impl}); "
                                f"they will raise BackendUnavailableError")
    return problems


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
        try:
            load()
        except ExtensionBuildError as e:
            return Availability(False, str(e))
        return Availability(True)

    return probe


def _deciding_vars(family: str) -> list[str]:
    """The variables that set ``family``'s backend, first match wins: its own, its parent's, the global one."""
    chain = [env_var(family)] + ([env_var(PARENT[family])] if family in PARENT else [])
    return chain + [GLOBAL_VAR]


def requested(family: str) -> str:
    """The backend asked for ``family``: ``FASTCODEC_<FAMILY>_BACKEND``, else its parent family's variable
    (``PARENT``), else ``FASTCODEC_BACKEND``, else auto. Every variable in that chain is checked, so a bad value
    raises ValueError naming it even where another one decides."""
    if family not in FAMILIES:
        raise ValueError(f"unknown op family {family!r}; the families are {', '.join(FAMILIES)}")
    values = [_parse(v) for v in _deciding_vars(family)]
    return next((v for v in values if v), "auto")


def deciding_var(family: str) -> str:
    """The variable whose value ``requested(family)`` returned (``FASTCODEC_BACKEND`` when none is set)."""
    return next((v for v in _deciding_vars(family) if os.environ.get(v, "").strip()), GLOBAL_VAR)


def _triton_probe() -> Availability:
    try:
        import triton  # noqa: F401
    except Exception as e:  # optional: no wheel outside Linux (pyproject marker)
        return Availability(False, f"triton cannot be imported: {e}")
    return Availability(True)


def _no_cuda_reason() -> str:
    return "no CUDA device (" + ("torch was built without CUDA" if torch.version.cuda is None
                                 else "none is visible") + ")"


def availability(family: str, backend: str, device_type: str = "cpu") -> Availability:
    """Whether ``backend`` can run ``family`` on ``device_type``, and if not, why."""
    if device_type == "cuda" and not torch.cuda.is_available():
        return Availability(False, _no_cuda_reason())
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


def auto_choice(family: str, device_type: str) -> tuple[str | None, list[str]]:
    """What ``auto`` runs ``family`` on for ``device_type`` tensors, and why each better-ranked backend was
    passed over (``"backend: reason"``); the backend is None when nothing can run there."""
    reasons = []
    for b in PREFERENCE[family].get(device_type, ("reference",)):
        a = availability(family, b, device_type)
        why = a.reason if not a.ok else auto_skip_reason(family, b, device_type)
        if why is None:
            return b, reasons
        reasons.append(f"{b}: {why}")
    return None, reasons


def choose(family: str, device: torch.device | str) -> str:
    """The backend that runs ``family`` for tensors on ``device`` (see the module docstring)."""
    dtype = torch.device(device).type
    want = requested(family)
    if want != "auto":
        a = availability(family, want, dtype)
        if not a.ok:
            var = deciding_var(family)
            raise BackendUnavailableError(
                f"{var}={want} was forced for the {family} ops on {dtype}, but it cannot run: {a.reason}"
            )
        return want
    b, reasons = auto_choice(family, dtype)
    if b is None:
        raise BackendUnavailableError(f"no backend can run the {family} ops on {dtype}: " + "; ".join(reasons))
    if reasons and not (b == "reference" and all(r.startswith(_POLICY) for r in reasons)):
        key = (family, dtype, b)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(
                f"fastcodec: using the {b!r} backend for the {family} ops on {dtype}: " + "; ".join(reasons)
                + " (see `fastcodec info`; set FASTCODEC_BACKEND to force one)",
                RuntimeWarning,
                stacklevel=3,
            )
    return b


def backends() -> dict[str, dict[str, dict[str, str]]]:
    """Report: ``{family: {device: {backend: "available" | reason}}}``. Probing may build extensions.
    Without CUDA every cuda entry, the reference included, says "no CUDA device (...)"."""
    out: dict[str, dict[str, dict[str, str]]] = {}
    for fam in FAMILIES:
        out[fam] = {}
        for dev, bs in SUPPORTED[fam].items():
            out[fam][dev] = {}
            for b in bs:
                a = availability(fam, b, dev)
                out[fam][dev][b] = "available" if a.ok else a.reason
    return out


for _problem in check_environment():  # at import: a mistyped variable is flagged before any op reads it
    warnings.warn(f"fastcodec: {_problem}", RuntimeWarning, stacklevel=2)
