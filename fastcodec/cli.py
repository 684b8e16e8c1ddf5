"""The ``fastcodec`` command.

    fastcodec info                   versions, CPU/GPU, backends per family and device (and why not), build cache
    fastcodec build [--verbose]      prebuild the C++ extensions; non-zero exit with the reason if one fails
    fastcodec bench [--full] [--only OPS] [--device cpu|cuda] [--budget S] [--threads N] [--json OUT] [--plot OUT.png]
                                     exit 1 when fastcodec's output disagrees with the oracle or a case cannot
                                     be built (another provider's mismatch is listed, not a failure)
    fastcodec encode IN.wav OUT.ecdc --model PATH|24khz|48khz|32khz [--bandwidth 6]
    fastcodec decode IN OUT.wav --model ...    IN: .ecdc, tokenized codes, a codes array or JASCO latents
    fastcodec tokenize SRC_DIR_OR_MANIFEST OUT_DIR --model ... [--bandwidth 6]   (resumable; under torchrun too)
    fastcodec selftest [--device cpu|cuda] [--quick]   every op and module against the reference on your device

Errors in the command line or the environment print one clear message and exit non-zero, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import torch

EXIT_USAGE = 2


class CliError(Exception):
    """A problem with the command line or the environment; main prints it and exits 2."""


def _threads(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _device(v: str) -> str:
    try:
        d = torch.device(v)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{v!r} is not a device; use cpu or cuda[:N]") from None
    if d.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device type {d.type!r} is not supported; use cpu or cuda[:N]")
    return v


def _seconds(v: str) -> float:
    try:
        s = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {v!r}") from None
    if not s > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {v}")
    return s


def _check_cuda_device(device: torch.device, flag: str = "--device") -> None:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise CliError(f"{flag} {device}: CUDA is not available ({why})")
        if (device.index or 0) >= torch.cuda.device_count():
            raise CliError(f"{flag} {device}: only {torch.cuda.device_count()} CUDA device(s)")


def _selftest(args) -> int:
    from . import selftest

    device = torch.device(args.device)
    _check_cuda_device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"fastcodec selftest on {device} ({name}), {'quick' if args.quick else 'full'} shapes")
    only = {c.strip() for c in args.only.split(",")} if args.only else None
    results = selftest.run(str(device), quick=args.quick, only=only)
    if not results:
        raise CliError(f"--only {args.only}: no such case (the cases: {', '.join(selftest.case_names())})")
    bad = [r.name for r in results if not r.ok]
    print(f"{len(results) - len(bad)}/{len(results)} passed" + (f"; FAILED: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="fastcodec", description="EnCodec with fused kernels: info, build, benchmarks, self-test, encode/decode/tokenize audio.")
    p.add_argument("--version", action="version", version=f"fastcodec {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{info,build,bench,selftest,encode,decode,tokenize}")
    sub.required = True
    sub.add_parser("info", help="versions, hardware, available backends and why not, build cache")
    b = sub.add_parser("build", help="prebuild the C++ extensions (otherwise built on first use)")
    b.add_argument("--verbose", action="store_true", help="show the compiler's output")
    be = sub.add_parser(
        "bench", help="benchmark fastcodec against the reference, audiocraft, torch.compile and onnxruntime",
        description="Times every operation interleaved (fastcodec, reference, audiocraft, compiled reference, "
                    "onnxruntime) after checking that their outputs agree; prints one table per operation.")
    suite = be.add_mutually_exclusive_group()
    suite.add_argument("--full", action="store_true", help="the complete suite (long); default: the quick one")
    suite.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny shapes, seconds: for tests/CI
    be.add_argument("--only", metavar="OPS", help="comma-separated operations, e.g. rvq_encode,seanet_encoder")
    be.add_argument("--device", default="cpu", type=_device,
                    help="cpu (default) or cuda[:N]; cuda runs the GPU suite unless --full/--smoke")
    be.add_argument("--threads", type=_threads, help="torch threads (default: torch's, i.e. OMP_NUM_THREADS)")
    be.add_argument("--json", metavar="OUT", type=Path, help="write every number and the machine description")
    be.add_argument("--plot", metavar="OUT", type=Path, help="draw speed-up by shape (needs matplotlib)")
    be.add_argument("--list", action="store_true", help="list the operations and shapes of the suite and exit")
    be.add_argument("--quiet", action="store_true", help="no progress on stderr")
    be.add_argument("--budget", type=_seconds, metavar="SECONDS",
                    help="stop starting new cases after this many seconds (the results so far are kept)")
    st = sub.add_parser("selftest", help="every op and module against the reference on your device (~1 min)",
                        description="Runs every fastcodec op and module against the PyTorch reference on the given "
                                    "device: one line per case with the max error and the tolerance. Exit 1 if one "
                                    "fails. GPU users: run this first.")
    st.add_argument("--device", default="cpu", type=_device, help="cpu (default) or cuda[:N]")
    st.add_argument("--quick", action="store_true", help="tiny shapes (seconds)")
    st.add_argument("--only", metavar="CASES", help="comma-separated case names, e.g. rvq_encode,SEANetEncoder")
    from . import codec_cli  # encode, decode, tokenize

    codec_cli.add_parsers(sub, _device)
    return p


def _codec_command(args) -> int:
    from . import codec_cli
    from .audio import AudioError
    from .checkpoint import CheckpointError
    from .ecdc import EcdcError
    from .tokenize import TokenizeError

    try:
        return getattr(codec_cli, args.command)(args)
    except (codec_cli.ModelError, AudioError, EcdcError, TokenizeError, CheckpointError, ValueError, OSError) as e:
        raise CliError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage and the error (or --help) on stderr/stdout
        return int(e.code or 0)
    try:
        return {"info": _info, "build": _build, "bench": _bench, "selftest": _selftest, "encode": _codec_command,
                "decode": _codec_command, "tokenize": _codec_command}[args.command](args)
    except CliError as e:
        print(f"fastcodec {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"fastcodec {args.command}: interrupted", file=sys.stderr)
        return 130


def _info(args) -> int:
    from . import __version__, _backend, _build
    from .bench.harness import machine_info

    m = machine_info()
    print(f"fastcodec {__version__}")
    print("versions: " + ", ".join(f"{k} {m[k]}" for k in ("python", "torch", "triton", "numpy")))
    print(f"CPU: {m['cpu_model']} ({m['cpu_count']} logical CPUs), torch threads {m['threads']}")
    level = _backend.simd_level()
    print(f"SIMD: {_backend.SIMD_NAMES[level]} (from {_backend.simd_source()}): the C++ kernels take their "
          f"{_backend.kernel_path(level)} path")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"CUDA device {i}: {torch.cuda.get_device_name(i)} (CUDA {torch.version.cuda})")
    else:
        why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        print(f"CUDA: not available ({why})")
    print(f"build cache: {_build.cache_root()}")
    from . import precision
    for dev in ("cpu",) + (("cuda",) if torch.cuda.is_available() else ()):
        st = precision.status(dev)
        print(f"precision='bf16' on {dev}: {st['mode']}: {st['reason']}")
    if _triton_line():
        print(_triton_line())
    rc = 0
    forced = {k: v for k, v in os.environ.items() if k.startswith("FASTCODEC_") and k.endswith("BACKEND")}
    if forced:
        print("forced: " + ", ".join(f"{k}={v}" for k, v in sorted(forced.items())))
    problems = _backend.check_environment()
    for p in problems:
        print(f"error: {p}")
    if problems:
        rc = 1
    try:
        import fastcodec.ops  # noqa: F401  (the ops modules register the backends' probes)
    except Exception as e:
        print(f"fastcodec.ops cannot be imported ({type(e).__name__}: {e}): backends below may be incomplete")
        rc = 1
    print("backends (family, device, backend: status):")
    for fam, devs in _backend.backends().items():
        for dev, bs in devs.items():
            for b, status in bs.items():
                print(f"  {fam:9} {dev:5} {b:10} {'available' if status == 'available' else 'unavailable: ' + status}")
    # what runs per family: auto's pick and why
    print("in use (family, device, backend: why):")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for fam in _backend.FAMILIES:
        for dev in devices:
            print(f"  {fam:9} {dev:5} {_in_use(_backend, fam, dev)}")
    kids = ", ".join(f"{k} ({_backend.env_var(k)})" for k in _backend.PARENT)
    print(f"  ({kids} follow {_backend.env_var('conv')} unless their own variable is set)")
    if not torch.cuda.is_available():
        print(f"  (cuda: {_backend._no_cuda_reason()})")
    # builds what is not cached yet: a family whose extension cannot build says why above, and here
    print("C++ extensions (name: status):")
    for name in _backend.CPP_EXTENSIONS:
        try:
            ext = _build.load_named(name)
            status = "built" + (f" ({ext.simd()} path)" if hasattr(ext, "simd") else "")
        except _build.ExtensionBuildError as e:
            status = "unavailable: " + " ".join(str(e).split())
        print(f"  {name:10} {status}")
    return rc


def _triton_line() -> str:
    """What ``info`` says when triton is missing (it is optional where it has no wheel: macOS, Windows)."""
    from . import _backend

    tri = _backend._triton_probe()
    if tri.ok:
        return ""
    return (f"triton: unavailable ({tri.reason}): the CPU path (C++ and reference) does not need it; "
            f"on CUDA the RVQ ops would run the reference")


def _in_use(_backend, fam: str, dev: str) -> str:
    """``backend  why`` for one family and device: a forced backend, or auto's pick and what it passed over."""
    try:
        want = _backend.requested(fam)
    except ValueError as e:
        return f"{'-':10} {e}"
    if want != "auto":
        a = _backend.availability(fam, want, dev)
        why = "" if a.ok else f", but it cannot run: {a.reason}"
        return f"{want:10} forced by {_backend.deciding_var(fam)}{why}"
    b, passed = _backend.auto_choice(fam, dev)
    if b is None:
        return f"{'-':10} nothing can run: " + "; ".join(passed)
    if b == "cpp" and dev == "cpu":
        path = _backend.kernel_path(_backend.simd_level())
        why = f"auto: the C++ kernels' {path} path"
        if (fam, path) in _backend.CPP_MEASURED:
            why += f"; measured: {_backend.CPP_MEASURED[fam, path]}"
    else:
        why = "auto"
    return f"{b:10} {why}" + ("; passed over " + "; ".join(passed) if passed else "")


def _build(args) -> int:
    from . import _build as builder

    print(f"building C++ extensions into {builder.cache_root()}", file=sys.stderr)
    results = builder.build_all(verbose=args.verbose)
    failed = {k: v for k, v in results.items() if v != "ok"}
    for name, status in results.items():
        print(f"{name}: {'ok' if status == 'ok' else 'FAILED'}")
    for name, reason in failed.items():
        print(f"\n{name}: {reason}", file=sys.stderr)
    return 1 if failed else 0


def _bench(args) -> int:
    with warnings.catch_warnings():  # the filters set for the run do not outlive it (main() runs in tests)
        return _bench_run(args)


def _bench_run(args) -> int:
    from .bench import cases as bc
    from .bench import harness as bh

    gpu = torch.device(args.device).type == "cuda"
    suite = "full" if args.full else "smoke" if args.smoke else "gpu" if gpu else "quick"
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    if args.only is not None and not only:
        raise CliError("--only needs at least one operation, e.g. --only rvq_encode,seanet_encoder")
    try:
        selected = bc.select(suite, only)
    except ValueError as e:
        raise CliError(str(e)) from None
    if args.list:
        for c in selected:
            print(f"{c.op:18} {c.id}")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise CliError(f"--device {args.device}: CUDA is not available ({why})")
        if (device.index or 0) >= torch.cuda.device_count():
            raise CliError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
    if args.plot is not None:
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise CliError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None
        kinds = Figure().canvas.get_supported_filetypes()
        if args.plot.suffix.lstrip(".").lower() not in kinds:
            raise CliError(f"--plot {args.plot}: unknown image type; use one of .{', .'.join(sorted(kinds))}")
    for opt, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None and (path.is_dir() or not path.parent.resolve().is_dir()):
            raise CliError(f"{opt} {path}: " + ("is a directory" if path.is_dir()
                                                else f"directory {path.parent} does not exist"))
    if not selected:
        raise CliError(f"the {suite} suite has no case for {', '.join(only or [])}")
    if args.threads:
        torch.set_num_threads(args.threads)

    # audiocraft builds its convs with the deprecated torch.nn.utils.weight_norm: not our news
    warnings.filterwarnings("ignore", message=r".*weight_norm.*deprecated", category=FutureWarning)
    torch._logging.set_logs(dynamo=logging.ERROR)  # graph-break advice from compiling the reference
    backends, fallbacks = _backends_in_use(device)
    progress = bh.Progress(enabled=not args.quiet)
    opts = bc.Options(device=device, suite=suite, threads=torch.get_num_threads())
    timing = bc.SUITE_TIMING[suite]
    machine = bh.machine_info(device)
    progress(f"fastcodec bench: {suite} suite, {len(selected)} cases on {machine['cpu_model']}, "
             f"{machine['threads']} threads, device {device}")
    t0 = time.perf_counter()
    progress("GEMM rate (start)")
    gemm_reps = 5 if suite == "smoke" else 15
    gemm_start = bh.gemm_rate(device, gemm_reps)
    results: list[bh.CaseResult] = []
    over_budget: list[str] = []
    for i, case in enumerate(selected, 1):
        if args.budget is not None and time.perf_counter() - t0 >= args.budget:
            over_budget.append(f"{case.op} {case.id}")  # not started: the --budget is spent
            continue
        label = f"[{i}/{len(selected)}] {case.op} {case.id}"
        progress(f"{label}: building providers")
        title = bc.OPS[case.op]
        try:
            built = bc.build(case, opts)
        except Exception as e:  # a broken case must not hide the others
            r = bh.CaseResult(case.op, title, case.id, case.params, None)
            r.notes.append(f"could not build the case: {type(e).__name__}: {e}"[:400])
            results.append(r)
            continue
        r = bh.run_case(case.op, title, case.id, case.params, built, device, progress=progress, **timing)
        _note_bandwidth(r, case, device)
        results.append(r)
        med = {n: p.median_ms for n, p in r.providers.items() if p.median_ms is not None}
        progress(f"{label}: " + (", ".join(f"{n} {v:.2f} ms" for n, v in med.items()) or "nothing timed"))
    progress("GEMM rate (end)")
    gemm_end = bh.gemm_rate(device, gemm_reps) if not over_budget else gemm_start  # a spent budget: no more
    # the machine's demonstrated GEMM rate in this run: the better of the two measurements
    gemm_best = max((g["best_gflops"] or 0.0) for g in (gemm_start, gemm_end)) or None
    elapsed = time.perf_counter() - t0

    omitted = sorted({p.note for r in results for p in r.providers.values() if p.omitted})
    print(_header(suite, device, machine, gemm_start, gemm_end, gemm_best))
    print(f"fastcodec backends on {device.type}: " + ", ".join(f"{k} {v}" for k, v in backends.items()))
    for note in fallbacks:
        print(f"  {note}")
    for note in omitted:
        print(f"omitted: {note}")
    for op in dict.fromkeys(r.op for r in results):
        print(f"\n== {bc.OPS[op]} ==")
        print(bh.format_table([r for r in results if r.op == op], gemm_best))
    problems = [f"{r.op} {r.shape} {n}: {p.status}" for r in results for n, p in r.providers.items()
                if p.status in ("MISMATCH", "error")]
    problems += [f"{r.op} {r.shape}: {n}" for r in results for n in r.notes if n.startswith("could not build")]
    # the exit status is about fastcodec and the harness: another provider's disagreement with the oracle
    # (onnxruntime's export of time_group_norm, the compiled reference's rounding) is listed, not a failure
    failed = [f for f in problems if " fastcodec: " in f or ": could not build" in f]
    if over_budget:
        print(f"\nnot run (--budget {args.budget:g} s spent): " + ", ".join(over_budget))
    if args.json is not None:
        doc = {"machine": machine, "suite": suite, "device": str(device), "threads": torch.get_num_threads(),
               "device_name": machine.get("gpu") or machine["cpu_model"], "budget_s": args.budget,
               "not_run_budget": over_budget, "peak_bandwidth_gbps": _peak_gbps(device),
               "only": only, "timing": timing, "elapsed_s": elapsed, "backends": backends, "fallbacks": fallbacks,
               "gemm": {"start": gemm_start, "end": gemm_end, "best_gflops": gemm_best},
               "omitted": omitted, "results": [r.to_json(gemm_best) for r in results], "problems": problems}
        try:
            args.json.write_text(json.dumps(doc, indent=1))
        except OSError as e:
            raise CliError(f"--json {args.json}: {e}") from None
        progress(f"wrote {args.json}")
    if args.plot is not None:
        try:
            _plot(results, args.plot, bc.OPS)
        except OSError as e:
            raise CliError(f"--plot {args.plot}: {e}") from None
        progress(f"wrote {args.plot}")
    if problems:
        print("\nproblems (no speed-up is reported for these):\n  " + "\n  ".join(problems))
    progress(f"done in {elapsed:.0f}s")
    return 1 if failed else 0


# HBM/GDDR peak of common GPUs in GB/s (vendor data sheets), for the decode's share of it
_PEAK_GBPS = {"H200": 4800, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100": 3350, "A100-SXM4-80GB": 2039,
              "A100 80GB PCIe": 1935, "A100": 1555, "L40S": 864, "L4": 300, "A10G": 600, "RTX 4090": 1008,
              "RTX 3090": 936, "V100": 900, "T4": 320}


def _peak_gbps(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((float(v) for k, v in _PEAK_GBPS.items() if k in name), None)


def _note_bandwidth(r, case, device: torch.device) -> None:
    """rvq_decode: the bytes fastcodec moves (codes, gathered codewords, output) per second, and the share of
    the device's peak, as a note of the result."""
    fc = r.providers.get("fastcodec")
    if case.op != "rvq_decode" or fc is None or not fc.median_ms:
        return
    p = case.params
    n = p["B"] * p["T"]
    gbps = (n * p["K"] * 8 + n * p["K"] * p["D"] * 4 + n * p["D"] * 4) / (fc.median_ms * 1e-3) / 1e9
    peak = _peak_gbps(device)
    r.notes.append(f"fastcodec moves {gbps:.0f} GB/s" + (f", {100 * gbps / peak:.0f}% of the {peak:.0f} GB/s peak"
                                                        if peak else ""))


def _backends_in_use(device: torch.device) -> tuple[dict[str, str], list[str]]:
    """The backend each op family runs on ``device`` (what the fastcodec rows measure), and the
    fallback warnings, recorded here instead of interrupting the progress display."""
    from . import _backend

    chosen = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            import fastcodec.ops  # noqa: F401  (registers the backends' probes)
        except Exception as e:
            chosen["ops"] = f"cannot be imported ({type(e).__name__}: {e})"
        for fam in _backend.FAMILIES:
            try:
                chosen[fam] = _backend.choose(fam, device)
            except Exception as e:  # a forced backend that cannot run: the fastcodec rows will fail too
                chosen[fam] = f"unavailable ({e})"
    return chosen, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def _header(suite, device, machine, gemm_start, gemm_end, gemm_best) -> str:
    def rates(g):
        return ", ".join(f"{k} {v:.0f}" for k, v in g["gflops"].items()) or "not measured"

    lines = [
        f"fastcodec bench, {suite} suite, device {device}: {machine['cpu_model']}, {machine['threads']} threads, "
        f"torch {machine['torch']}, {machine['date']}" + (f", GPU {machine['gpu']}" if device.type == "cuda" else ""),
        f"GEMM rate {gemm_start['shape']}, GFLOP/s: start {rates(gemm_start)}; end {rates(gemm_end)}; "
        f"%GEMM below is against {gemm_best:.0f}" if gemm_best else "GEMM rate: not measured",
        "times: median and min-max ms of calls interleaved round-robin; fastcodec x = fastcodec's speed-up "
        "over that row (only where outputs agree); peak MiB = most extra memory live during one call, "
        "as allocated through torch's allocator",
    ]
    load, cpus = machine.get("loadavg"), machine.get("cpu_count") or 1
    if load and load[0] > 0.5 * cpus:
        lines.append(f"warning: the machine was busy when the run started (load average {load[0]:.1f} on {cpus} "
                     "CPUs): times include waiting for a CPU; only the interleaved ratios are comparable")
    return "\n".join(lines)


def _plot(results, path: Path, titles: dict[str, str]) -> None:
    """Speed-up by shape: one panel per operation, bars = each provider's speed over the baseline
    (audiocraft where it ran, else the reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .bench.harness import PROVIDERS

    ops = list(dict.fromkeys(r.op for r in results))
    fig, axes = plt.subplots(len(ops), 1, figsize=(10, 2.8 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops, strict=True):
        rs = [r for r in results if r.op == op]

        def ok(r, n):
            p = r.providers.get(n)
            return p is not None and p.status == "ok" and p.times_ms

        base = "audiocraft" if any(ok(r, "audiocraft") for r in rs) else "reference"
        shown = [n for n in PROVIDERS if n != base and any(ok(r, n) for r in rs)]
        width = 0.8 / max(len(shown), 1)
        for j, name in enumerate(shown):
            vals = [r.providers[base].median_ms / r.providers[name].median_ms if ok(r, name) and ok(r, base)
                    else float("nan") for r in rs]
            ax.bar([i + (j - (len(shown) - 1) / 2) * width for i in range(len(rs))], vals, width, label=name,
                   color=f"C{PROVIDERS.index(name)}")  # one colour per provider across panels
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(range(len(rs)), [r.shape for r in rs], fontsize=8)
        ax.set_ylabel(f"speed-up vs {base}", fontsize=8)
        ax.set_title(titles.get(op, op), fontsize=9)
        if shown:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
