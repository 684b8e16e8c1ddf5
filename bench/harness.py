"""Timing engine of ``fastcodec bench``: interleaved timing, output checks, GEMM rate, peak memory, tables.

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
from typing import Any, Callable, NamedTuple

import torch

import fastcodec

# row order within a table; a provider absent from a case is not applicable to it (no row)
PROVIDERS = ("fastcodec", "reference", "audiocraft", "compiled", "onnxruntime")
EPS32 = 2.0**-23
U32 = 2.0**-24  # float32 unit roundoff
GEMM_SHAPE = (6000, 128, 1024)  # the DESIGN's GEMM: [6000,128] x [128,1024], the RVQ encode's inner product
MiB = 2**20


@dataclass
class Check:
    ok: bool
    detail: str
    flips: int = 0  # codes: rows that differ at exact duplicates or certified near-ties
    err: float | None = None  # max abs error (floats)
    tol: float | None = None

    @staticmethod
    def all(checks: list["Check"]) -> "Check":
        return Check(all(c.ok for c in checks), "; ".join(c.detail for c in checks), sum(c.flips for c in checks))


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


def float_tolerance(ref: torch.Tensor, ref64: torch.Tensor) -> float:
    """Tolerance for a float32 output: 4x PyTorch's own float32 error against a float64 run of the
    reference (DESIGN: "the error of PyTorch's own float32 result vs a float64 reference, times a
    small factor"), plus one float32 ulp of the largest value so an output that float64 happens to
    reproduce exactly does not demand bit-equality."""
    err = (ref.detach().double().cpu() - ref64.detach().double().cpu()).abs().max().item()
    scale = ref64.detach().abs().max().item() if ref64.numel() else 0.0
    return 4.0 * err + EPS32 * scale


def compare_floats(name: str, out: Any, ref: torch.Tensor, tol: float, rtol: float = 0.0) -> Check:
    """``|out - ref| <= tol + rtol * |ref|`` everywhere; shapes and NaN patterns must agree."""
    if not isinstance(out, torch.Tensor):
        return Check(False, f"{name}: got {type(out).__name__}, expected a tensor")
    if tuple(out.shape) != tuple(ref.shape):
        return Check(False, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}")
    a = out.detach().cpu().double()
    b = ref.detach().cpu().double()
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return Check(False, f"{name}: NaN pattern differs ({int(torch.isnan(a).sum())} vs {int(torch.isnan(b).sum())})")
    if not a.numel():
        return Check(True, f"{name} empty", err=0.0, tol=tol)
    diff = (a - b).abs().nan_to_num(0.0)
    err = diff.max().item()
    if rtol:
        bound = tol + rtol * b.abs().nan_to_num(0.0)
        worst = torch.where(diff == 0, 0.0, diff / bound).max().item()  # 0/0 where both are exactly 0
        return Check(worst <= 1.0, f"{name} max abs err {err:.1e}, {worst:.2f} of tol (rtol {rtol:.1e})",
                     err=worst, tol=1.0)
    return Check(err <= tol, f"{name} max abs err {err:.1e} (tol {tol:.1e})", err=err, tol=tol)


def compare_float_dict(out: dict, expected: dict, tols: dict[str, float | tuple[float, float]]) -> Check:
    """``compare_floats`` on every key of ``tols`` (a tol or (tol, rtol)); the detail names the
    failures, or the closest call."""
    checks = {k: compare_floats(k, out.get(k), expected[k], *(t if isinstance(t, tuple) else (t,)))
              for k, t in tols.items()}
    bad = [c.detail for c in checks.values() if not c.ok]
    if bad:
        return Check(False, "; ".join(bad))
    if not checks:
        return Check(True, "")
    worst = max(checks.values(), key=lambda c: c.err / c.tol if c.tol else 0.0)
    if len(checks) == 1:
        return worst
    return Check(True, f"{len(checks)} float outputs within tol (closest: {worst.detail})")


def gamma(n, u: float = U32):
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term sum or dot product
    in floating point, in any summation order, with or without FMA. n: an int or a tensor."""
    return n * u / (1 - n * u)


def distance_rounding_bound(r_norm: torch.Tensor, e_norm: torch.Tensor, dim: int) -> torch.Tensor:
    """Bound on the float32 rounding error of one squared distance |r - e|^2 of ``dim``-vectors:
    gamma_{dim+2} (|r| + |e|)^2. It covers the expanded form (|r|^2 - 2 r.e + |e|^2, with or without
    |r|^2, norms precomputed or not: three dot products and two additions) and the direct sum of
    (r_i - e_i)^2 (three roundings per term), in any order: every way our kernels and audiocraft compute it."""
    return gamma(dim + 2) * (r_norm + e_norm) ** 2


def residual_rounding_bound(abs_sum: torch.Tensor, layer) -> torch.Tensor:
    """Bound on the norm of a float32 residual's rounding error at RVQ ``layer`` (0 at layer 0: both
    sides read the same float32 x). Each earlier layer rounds at most three times (audiocraft's
    straight-through value r + (q - r), then r - q), each by u times at most ``abs_sum`` =
    |x| + sum_{j<layer} |e_j| (elementwise, (N, D) float64); layer: an int or (N,) -> (N,)."""
    return gamma(3 * layer) * abs_sum.norm(dim=1)


def near_tie_bound(d_a: torch.Tensor, d_b: torch.Tensor, r_norm: torch.Tensor, ea_norm: torch.Tensor,
                   eb_norm: torch.Tensor, eab: torch.Tensor, dim: int, rho=0.0, cb_err: float = 0.0) -> torch.Tensor:
    """How close two exact (float64) squared distances d_a = |r - e_a|^2, d_b = |r - e_b|^2 may be
    for two float32 computations to rank e_a and e_b differently (all float64 tensors, broadcast).

    Each side computes its distances with at most ``distance_rounding_bound`` of error, from an input
    within ``rho`` of r and codewords within ``cb_err`` of e_a, e_b (norms). Expanding
    |r + eta - e - delta|^2 gives: both roundings, + 2 rho |e_a - e_b| (the input moves both distances
    alike but for its projection on e_a - e_b), + 2 cb_err (|r - e_a| + |r - e_b|) + (rho + cb_err)^2.
    ``eab``: |e_a - e_b|.
    """
    rn = r_norm + rho
    bound = (distance_rounding_bound(rn, ea_norm + cb_err, dim) + distance_rounding_bound(rn, eb_norm + cb_err, dim)
             + 2 * rho * eab)
    if cb_err:
        bound = bound + 2 * cb_err * (d_a.clamp(min=0).sqrt() + d_b.clamp(min=0).sqrt()) + (rho + cb_err) ** 2
    return bound


def canonical_codes(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """codes (N, K) with each code replaced by the lowest index of an equal codeword (elementwise ==) of
    its layer: exact duplicates quantize to the same vector, so later layers see the same residual."""
    out = codes.clone()
    bins = codebooks.shape[1]
    for k in range(codes.shape[1]):
        _, group = torch.unique(codebooks[k], dim=0, return_inverse=True)
        first = torch.full((int(group.max()) + 1,), bins, dtype=torch.long)
        first.scatter_reduce_(0, group, torch.arange(bins), "amin")
        out[:, k] = first[group][codes[:, k]]
    return out


class CodesCheck(NamedTuple):
    ok: bool
    flips: int  # rows (b, t) whose codes differ anywhere
    detail: str


def check_codes_equivalent(codes: Any, expected: torch.Tensor, x: torch.Tensor,
                           codebooks: torch.Tensor) -> CodesCheck:
    """Codes must be equal except at exact duplicates and certified near-ties: the one rule behind
    ``compare_codes`` (the bench's check) and ``tests/utils.assert_codes_equivalent``.

    codes, expected: (B, K, T) integers; x: (B, D, T) the quantizer's float32 input; codebooks:
    (K', bins, D), K' >= K. Per row, codes are first mapped to the lowest index of an equal codeword
    of their layer (an exact duplicate gives the same quantized vector, so the later layers see the
    same residual and are still compared). At the first layer k where the mapped codes differ, both
    candidates' squared distances to the residual of the expected codes are computed in float64;
    they may differ by at most ``near_tie_bound``: the float32 rounding bound of the two distances
    (it grows with D) plus the residual's own rounding through k layers (0 at layer 0). Later layers
    of such a row are not compared (their residuals differ). Everything else fails, with an example.
    ``flips`` counts the rows whose codes differ anywhere.
    """
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex():
        return CodesCheck(False, 0, f"codes: expected an integer tensor, got {getattr(codes, 'dtype', type(codes))}")
    if tuple(codes.shape) != tuple(expected.shape):
        return CodesCheck(False, 0, f"codes shape {tuple(codes.shape)} != {tuple(expected.shape)}")
    B, K, T = expected.shape
    bins, D = codebooks.shape[1:]
    if codebooks.shape[0] < K or tuple(x.shape) != (B, D, T):
        return CodesCheck(False, 0, f"x {tuple(x.shape)} and codebooks {tuple(codebooks.shape)} do not fit "
                                    f"codes {(B, K, T)}")
    c = codes.detach().cpu().long().permute(0, 2, 1).reshape(B * T, K)
    e = expected.detach().cpu().long().permute(0, 2, 1).reshape(B * T, K)
    for name, t in (("codes", c), ("expected", e)):
        if bool(((t < 0) | (t >= bins)).any()):
            bad = sorted(set(t[(t < 0) | (t >= bins)].tolist()))[:5]
            return CodesCheck(False, 0, f"{name}: values outside [0, {bins}): {bad}")
    flips = int((c != e).any(1).sum())
    if flips == 0:
        return CodesCheck(True, 0, "codes equal")
    cb32 = codebooks.detach().cpu()[:K]
    diff = canonical_codes(c, cb32) != canonical_codes(e, cb32)
    rows = diff.any(1).nonzero().flatten()
    n_dup = flips - rows.numel()
    cb = cb32.double()
    x_rows = x.detach().cpu().double().permute(0, 2, 1).reshape(B * T, D)
    n_bad, example, worst = 0, "", 0.0
    for chunk in rows.split(1024) if rows.numel() else ():  # bounds the float64 gather to 1024 x D per layer
        cc, ee, n = c[chunk], e[chunk], chunk.numel()
        k = diff[chunk].int().argmax(1)  # the first layer where the sequences quantize differently
        r = x_rows[chunk].clone()
        abs_sum = r.abs()
        for j in range(K - 1):
            m = j < k
            if m.any():
                q = cb[j, ee[m, j]]
                r[m] -= q
                abs_sum[m] += q.abs()
        ar = torch.arange(n)
        ea, eb = cb[k, cc[ar, k]], cb[k, ee[ar, k]]
        d_a, d_b = ((r - ea) ** 2).sum(1), ((r - eb) ** 2).sum(1)
        rho = residual_rounding_bound(abs_sum, k.double())
        bound = near_tie_bound(d_a, d_b, r.norm(dim=1), ea.norm(dim=1), eb.norm(dim=1), (ea - eb).norm(dim=1), D, rho)
        gap = (d_a - d_b).abs()
        bad = gap > bound
        worst = max(worst, float((gap / bound.clamp(min=1e-300)).max()))
        if bad.any() and not example:
            i = int(bad.nonzero()[0])
            b_, t_ = divmod(int(chunk[i]), T)
            example = (f"e.g. row {int(chunk[i])} layer {int(k[i])} (batch {b_}, frame {t_}): code "
                       f"{int(cc[i, k[i]])} (float64 distance {d_a[i]:.9g}) vs expected {int(ee[i, k[i]])} "
                       f"({d_b[i]:.9g}), difference "
                       f"{(d_a[i] - d_b[i]).abs():.3e} > float32 bound {bound[i]:.3e}")
        n_bad += int(bad.sum())
    if n_bad:
        return CodesCheck(False, flips, f"codes: {n_bad} of {flips} differing rows are neither exact duplicates "
                                        f"nor near-ties ({example})")
    return CodesCheck(True, flips, f"codes equal except {flips} row(s): {n_dup} exact-duplicate codeword(s), "
                                   f"{rows.numel()} certified near-tie(s) (largest at {worst:.2f} of the bound)")


def compare_codes(codes: Any, expected: torch.Tensor, x: torch.Tensor, codebooks: torch.Tensor) -> Check:
    """``check_codes_equivalent`` as a ``Check`` (shapes there); ``flips``: rows that differ."""
    ok, flips, detail = check_codes_equivalent(codes, expected, x, codebooks)
    return Check(ok, detail, flips=flips)


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
