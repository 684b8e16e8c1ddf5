"""Timing engine of ``fastcodec bench``: interleaved timing, output checks, GEMM rate, peak memory, tables
(the output checks themselves are in ``checks.py``).

Every case is measured the same way (``run_case``):

1. each provider runs once and its output is checked against the oracle (the reference, or
   audiocraft where the reference is missing); a provider that disagrees is marked ``MISMATCH``
   and gets no speed-up;
2. warm-up calls, then timed calls interleaved round-robin (rep 1 of every provider, rep 2 of
   every provider, ...; the order rotates each rep) in one process, because the shared machines
   drift by up to 2x within minutes;
3. one more untimed call per provider measures the peak extra memory it allocates.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import fastcodec

from .checks import (  # noqa: F401  (re-exported: callers import the checks from the harness too)
    EPS32, U32, Check, CodesCheck, canonical_codes, check_codes_equivalent, compare_codes, compare_float_dict,
    compare_floats, distance_rounding_bound, float_tolerance, gamma, near_tie_bound, residual_rounding_bound)

# row order within a table; a provider absent from a case is not applicable to it (no row)
PROVIDERS = ("fastcodec", "reference", "audiocraft", "compiled", "onnxruntime")
GEMM_SHAPE = (6000, 128, 1024)  # the DESIGN's GEMM: [6000,128] x [128,1024], the RVQ encode's inner product
MiB = 2**20


class Missing(str):
    """Why a provider is absent because an optional peer (audiocraft, onnxruntime) is not installed:
    its rows are left out of the tables and the reason is printed once."""


@dataclass
class Impl:
    """One provider's way to run a case.

    ``fn()`` does the timed work; ``setup()`` runs untimed before every call (fresh state for
    stateful ops); ``outputs(result)`` turns fn's result into what ``check`` compares (only on the
    checking call, so conversions stay out of the timings); ``check`` overrides the case's check
    for this provider; ``close()`` runs once after the case.
    """
    fn: Callable[[], Any]
    setup: Callable[[], None] | None = None
    outputs: Callable[[Any], Any] | None = None
    check: Callable[[Any], Check] | None = None
    close: Callable[[], None] | None = None
    note: str = ""
    measure_memory: bool = True


@dataclass
class Built:
    """A case made runnable: ``impls[provider]`` is an ``Impl`` or the reason it is not available."""
    impls: dict[str, Impl | str]
    check: Callable[[Any], Check]
    flops: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class ProviderResult:
    status: str  # "ok" | "MISMATCH" | "error" | "n/a"
    note: str = ""
    check: str = ""
    times_ms: list[float] = field(default_factory=list)
    first_call_s: float | None = None
    peak_bytes: int | None = None
    omitted: bool = False  # an optional peer is not installed (see Missing)

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None

    def to_json(self) -> dict:
        d = {"status": self.status, "note": self.note, "check": self.check, "times_ms": self.times_ms,
             "first_call_s": self.first_call_s, "peak_extra_bytes": self.peak_bytes, "omitted": self.omitted}
        if self.times_ms:
            d.update(median_ms=self.median_ms, min_ms=min(self.times_ms), max_ms=max(self.times_ms))
        return d


@dataclass
class CaseResult:
    op: str
    title: str
    shape: str
    params: dict
    flops: float | None
    providers: dict[str, ProviderResult] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def speedups(self) -> dict[str, float]:
        """fastcodec's speed-up over every other provider, only where both outputs agree."""
        fast = self.providers.get("fastcodec")
        if fast is None or fast.status != "ok" or not fast.times_ms:
            return {}
        return {
            name: p.median_ms / fast.median_ms
            for name, p in self.providers.items()
            if name != "fastcodec" and p.status == "ok" and p.times_ms
        }

    def gflops(self, name: str) -> float | None:
        p = self.providers.get(name)
        if self.flops is None or p is None or not p.times_ms:
            return None
        return self.flops / (p.median_ms * 1e-3) / 1e9

    def to_json(self, gemm_best: float | None) -> dict:
        provs = {}
        for name, p in self.providers.items():
            d = p.to_json()
            g = self.gflops(name)
            d["gflops"] = g
            d["pct_gemm"] = 100 * g / gemm_best if g is not None and gemm_best else None
            provs[name] = d
        return {"op": self.op, "title": self.title, "shape": self.shape, "params": self.params,
                "flops": self.flops, "providers": provs,
                "speedup": {f"vs_{k}": v for k, v in self.speedups().items()}, "notes": self.notes}


class Progress:
    """Progress on stderr: one updating line on a terminal, plain lines (phases only) otherwise."""

    def __init__(self, stream=None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()

    def __call__(self, msg: str, transient: bool = False) -> None:
        if not self.enabled or (transient and not self.tty):
            return
        line = f"[{time.perf_counter() - self.t0:6.1f}s] {msg}"
        if self.tty:
            self.stream.write("\r\033[K" + line + ("" if transient else "\n"))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call(impl: Impl, device: torch.device) -> tuple[Any, float]:
    """``setup()`` then one timed ``fn()``: (its result, seconds)."""
    if impl.setup is not None:
        impl.setup()
    _sync(device)
    t0 = time.perf_counter()
    out = impl.fn()
    _sync(device)
    return out, time.perf_counter() - t0


def time_interleaved(
    impls: dict[str, Impl],
    device: torch.device,
    warmup: int = 2,
    reps: int = 10,
    min_reps: int = 3,
    budget_s: float = float("inf"),
    progress: Callable[[str, bool], None] | None = None,
    label: str = "",
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Round-robin timing. Returns ``({provider: [ms per call]}, {provider: error})``.

    Stops after ``reps`` rounds, or after ``min_reps`` rounds once ``budget_s`` seconds of timing
    have passed. A provider that raises is dropped and its error returned.
    """
    live = dict(impls)
    errors: dict[str, str] = {}
    times: dict[str, list[float]] = {n: [] for n in impls}

    def step(name: str, record: bool) -> None:
        try:
            _, dt = call(live[name], device)
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {e}"[:400]
            del live[name]
            return
        if record:
            times[name].append(dt * 1e3)

    gc.collect()
    for w in range(warmup):
        for name in list(live):
            if progress:
                progress(f"{label}: warm-up {w + 1}/{warmup} {name}", True)
            step(name, False)
    start = time.perf_counter()
    for r in range(reps):
        names = list(live)
        if not names:
            break
        k = r % len(names)
        for name in names[k:] + names[:k]:  # rotate so no provider always runs right after the same one
            step(name, True)
        if progress:
            progress(f"{label}: rep {r + 1}/{reps}", True)
        if r + 1 >= min_reps and time.perf_counter() - start > budget_s:
            break
    return {n: t for n, t in times.items() if n not in errors}, errors


def gemm_rate(device: torch.device, reps: int = 15) -> dict:
    """The machine's fp32 GEMM rate on [6000,128]x[128,1024], measured now.

    CPU: best of ``torch.mm`` (MKL) and oneDNN's linear, timed interleaved (on AMD EPYC MKL's
    sgemm is ~2.3x slower than oneDNN). CUDA: ``torch.mm`` in full fp32 (TF32 off).
    """
    M, K, N = GEMM_SHAPE
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).to(device)
    w = torch.randn(N, K, generator=g).to(device)
    wt = w.t().contiguous()
    impls = {"torch.mm": Impl(lambda: torch.mm(x, wt))}
    notes = []
    if device.type == "cpu":
        try:
            torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
            impls["onednn_linear"] = Impl(lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))
        except Exception as e:  # torch built without oneDNN
            notes.append(f"oneDNN linear unavailable: {type(e).__name__}: {e}"[:200])
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        times, errors = time_interleaved(impls, device, warmup=3, reps=reps, min_reps=reps)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    flops = 2.0 * M * K * N
    rates = {name: flops / (statistics.median(t) * 1e-3) / 1e9 for name, t in times.items()}
    notes += [f"{n}: {e}" for n, e in errors.items()]
    best = max(rates, key=rates.get) if rates else None
    return {"shape": "[6000,128]x[128,1024] fp32", "gflops": rates, "best_impl": best,
            "best_gflops": rates.get(best), "notes": notes}


def peak_extra_bytes(impl: Impl, device: torch.device) -> int | None:
    """Peak bytes allocated by one call of ``impl.fn`` above what was live before it.

    CUDA: the caching allocator's peak counter. CPU: a ``torch.profiler`` run with
    ``profile_memory=True`` records every allocation and free made through c10's CPU allocator
    (ATen tensors, also those made inside C++ extensions and compiled graphs) with its byte count;
    the running sum over the call, in time order, peaks at the answer. Memory that bypasses the
    allocator (``malloc`` inside a kernel, onnxruntime's arena) is not seen.
    """
    if impl.setup is not None:
        impl.setup()
    # fastcodec's SEANet keeps its layer outputs in a pool between calls (fastcodec/_pool.py): emptied first,
    # so that the measured call allocates its whole working set again
    fastcodec.release_pools()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = impl.fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return int(peak)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr_fd(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = impl.fn()
        del out
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return int(peak)


@contextlib.contextmanager
def _quiet_stderr_fd():
    """Silence file descriptor 2 (kineto prints two lines per profiler start/stop from C++)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def machine_info(device: torch.device | str = "cpu") -> dict:
    """What ran the benchmark: CPU model, threads, versions, GPU, date."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    info = {
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "numpy": version("numpy"),
        "fastcodec": version("fastcodec"),
        "audiocraft": version("audiocraft"),
        "onnxruntime": version("onnxruntime"),
        "device": str(device),
        "gpu": None,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        dev = torch.device(device)
        info["gpu"] = torch.cuda.get_device_name(dev if dev.type == "cuda" else 0)
    return info


def run_case(
    op: str,
    title: str,
    shape: str,
    params: dict,
    built: Built,
    device: torch.device,
    warmup: int = 2,
    reps: int = 10,
    min_reps: int = 3,
    budget_s: float = float("inf"),
    memory: bool = True,
    progress: Callable[[str, bool], None] | None = None,
) -> CaseResult:
    """Check, time (interleaved) and measure one case; never raises for a provider's failure."""
    res = CaseResult(op, title, shape, params, built.flops, notes=list(built.notes))
    live: dict[str, Impl] = {}
    label = f"{op} {shape}"
    for name in PROVIDERS:
        entry = built.impls.get(name)
        if entry is None:
            continue
        if isinstance(entry, str):
            res.providers[name] = ProviderResult("n/a", note=str(entry), omitted=isinstance(entry, Missing))
            continue
        if progress:
            progress(f"{label}: checking {name}", True)
        try:
            out, first = call(entry, device)
            chk = (entry.check or built.check)(entry.outputs(out) if entry.outputs else out)
            del out
        except Exception as e:
            res.providers[name] = ProviderResult("error", note=f"{type(e).__name__}: {e}"[:400])
            _close(entry)
            continue
        res.providers[name] = ProviderResult("ok" if chk.ok else "MISMATCH", note=entry.note,
                                             check=chk.detail, first_call_s=first)
        live[name] = entry
    times, errors = time_interleaved(live, device, warmup, reps, min_reps, budget_s, progress, label)
    for name, ts in times.items():
        res.providers[name].times_ms = ts
    for name, err in errors.items():
        res.providers[name].status = "error"
        res.providers[name].note = err
    if memory:
        for name, entry in live.items():
            if name in errors or not entry.measure_memory:
                continue
            if progress:
                progress(f"{label}: peak memory {name}", True)
            try:
                res.providers[name].peak_bytes = peak_extra_bytes(entry, device)
            except Exception as e:  # the profiler is an observer: its failure is a note, not the provider's
                res.notes.append(f"{name}: peak memory not measured ({type(e).__name__}: {e})"[:200])
    for entry in live.values():
        _close(entry)
    return res


def _close(entry: Impl) -> None:
    if entry.close is not None:
        try:
            entry.close()
        except Exception:
            pass


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(results: list[CaseResult], gemm_best: float | None) -> str:
    """One operation's table: a block of provider rows per shape, then the notes."""
    head = ("shape", "provider", "median ms", "min-max ms", "GFLOP/s", "%GEMM", "peak MiB", "fastcodec x",
            "check / note")
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    for r in results:
        sp = r.speedups()
        fast_ok = "fastcodec" in r.providers and r.providers["fastcodec"].status == "ok"
        first = True
        for name, p in r.providers.items():
            if p.omitted:
                continue
            g = r.gflops(name)
            if p.status in ("n/a", "error"):
                cells = ("n/a" if p.status == "n/a" else "error", "", "", "", "", "")
                text = p.note
            else:
                ts = p.times_ms
                cells = (
                    _fmt(p.median_ms, ".2f"),
                    f"{min(ts):.2f}-{max(ts):.2f}" if ts else "-",
                    _fmt(g, ".1f"),
                    _fmt(100 * g / gemm_best if g is not None and gemm_best else None, ".1f"),
                    _fmt(p.peak_bytes / MiB if p.peak_bytes is not None else None, ".1f"),
                )
                if p.status == "MISMATCH":
                    speed = "MISMATCH"
                elif name == "fastcodec":
                    speed = "1.00x"
                elif name in sp:
                    speed = f"{sp[name]:.2f}x"
                else:
                    speed = "-" if fast_ok else ""
                cells = cells + (speed,)
                text = p.check + (f"; {p.note}" if p.note else "")
                if name == "compiled" and p.first_call_s is not None:
                    text += f"; first call (compiles) {p.first_call_s:.1f}s"
                if p.status == "MISMATCH":
                    text = "MISMATCH: " + text
            rows.append((r.shape if first else "", name) + cells + (text,))
            first = False
        notes += [f"{r.shape}: {n}" for n in r.notes]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    widths[-1] = len(head[-1])
    right = {2, 3, 4, 5, 6, 7}

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    out = [line(head), line(tuple("-" * w for w in widths))] + [line(row) for row in rows]
    out += [f"  note: {n}" for n in notes]
    return "\n".join(out)
