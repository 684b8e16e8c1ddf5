"""pytest-benchmark suites over the cases of ``fastcodec.bench.cases``.

    pytest bench/ --benchmark-only                   smoke + quick cases, timed (add --bench-full for the rest)
    pytest bench -m smoke --benchmark-disable        tiny cases, each run once: CI's guard against rot

pytest-benchmark times one provider per test, one after the other; the interleaved, drift-proof
ratios come from ``fastcodec bench``. Each test first checks its provider's output against the
oracle and fails (no number) on a mismatch. Providers that are not available are not collected.
"""
from __future__ import annotations

import pytest
import torch

from fastcodec.bench import cases as bc
from fastcodec.bench import harness as bh


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true", help="also collect the full suite's large cases")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    config.addinivalue_line("markers", "smoke: tiny benchmark cases that finish in seconds (CI runs them)")
    config.addinivalue_line("markers", "bench_full: large cases of the full suite (collected with --bench-full)")
    # audiocraft builds its convs with the deprecated torch.nn.utils.weight_norm: not our news
    config.addinivalue_line("filterwarnings", "ignore:.*weight_norm.*deprecated:FutureWarning")
    # pyproject's addopts carry --benchmark-disable for the unit tests; --benchmark-only here means "time them"
    if config.getoption("benchmark_only", False):
        config.option.benchmark_enable = True


def _providers(case: bc.Case, suite: str) -> list[str]:
    """The providers that can run ``case`` here, decided at collection (imports only, no build)."""
    kinds = {"rvq_": ("rvq",), "seanet_encoder": ("encoder",), "seanet_decoder": ("decoder",),
             "seanet_streaming": ("stream_" + case.params.get("side", "encoder"),),
             "codec": ("encoder", "decoder", "rvq")}
    need = next(v for k, v in kinds.items() if case.op.startswith(k))
    out = [p for p in ("fastcodec", "reference", "audiocraft")
           if all(not isinstance(bc.load_class(kind, p), str) for kind in need)]
    if "reference" in out and suite in case.compiled_in:
        out.append("compiled")
    if case.op in ("seanet_encoder", "seanet_decoder") and suite != "smoke":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401

            out.append("onnxruntime")
        except ImportError:
            pass
    return out


def pytest_generate_tests(metafunc):
    """A test module lists its operations in ``OPS``; every (case, provider) becomes one test."""
    if "bench_case" in metafunc.fixturenames:
        metafunc.parametrize(("bench_case", "provider", "suite"),
                             _params(metafunc.module.OPS, metafunc.config.getoption("--bench-full")))


def _params(ops: tuple[str, ...], full: bool) -> list:
    out = []
    for case in bc.CASES:
        if case.op not in ops:
            continue
        suite = "smoke" if "smoke" in case.suites else "quick" if "quick" in case.suites else "full"
        marks = [pytest.mark.smoke] if suite == "smoke" else [pytest.mark.bench_full] if suite == "full" else []
        for prov in _providers(case, "full" if full else suite):
            out.append(pytest.param(case, prov, suite, id=f"{case.op}-{case.id}-{prov}", marks=marks))
    return out


def pytest_collection_modifyitems(config, items):
    if config.getoption("--bench-full"):
        return
    keep = [it for it in items if it.get_closest_marker("bench_full") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[it for it in items if it.get_closest_marker("bench_full")])
        items[:] = keep


class _OneCase:
    """Builds a case once for all its providers (tests of a case are adjacent), keeps only the last."""

    def __init__(self):
        self.key = None
        self.built: bh.Built | None = None

    def get(self, case: bc.Case, suite: str) -> bh.Built:
        key = (case.op, case.id, suite)
        if key != self.key:
            self.close()
            self.built = bc.build(case, bc.Options(suite=suite, threads=torch.get_num_threads()))
            self.key = key
        return self.built

    def close(self):
        if self.built is not None:
            for impl in self.built.impls.values():
                if isinstance(impl, bh.Impl) and impl.close is not None:
                    impl.close()
        self.key = self.built = None


@pytest.fixture(scope="session")
def machine(request):
    info = bh.machine_info()
    if request.config.getoption("benchmark_enable") or not request.config.getoption("benchmark_disable"):
        info["gemm"] = bh.gemm_rate(torch.device("cpu"))
    return info


@pytest.fixture(scope="session")
def _cases():
    cache = _OneCase()
    yield cache
    cache.close()


@pytest.fixture
def run_bench(benchmark, machine, _cases, request):
    """Check the provider's output against the oracle, then time it with pytest-benchmark."""

    def run(case: bc.Case, provider: str, suite: str):
        if request.config.getoption("--bench-full"):
            suite = "full"
        built = _cases.get(case, suite)
        impl = built.impls[provider]
        assert isinstance(impl, bh.Impl), f"{provider} was collected but cannot run: {impl}"
        out, _ = bh.call(impl, torch.device("cpu"))
        chk = (impl.check or built.check)(impl.outputs(out) if impl.outputs else out)
        del out
        assert chk.ok, f"{case.op} {case.id} {provider}: output disagrees with the oracle: {chk.detail}"
        benchmark.group = f"{case.op} {case.id}"
        benchmark.extra_info.update(machine=machine, op=case.op, shape=case.id, params=case.params,
                                    provider=provider, check=chk.detail, flops=built.flops)
        rounds = 3 if suite == "smoke" else 10
        benchmark.pedantic(impl.fn, setup=impl.setup, rounds=rounds, warmup_rounds=1, iterations=1)
        stats = getattr(benchmark, "stats", None)
        if built.flops and stats is not None:
            median_s = stats.stats.median
            benchmark.extra_info["gflops"] = built.flops / median_s / 1e9
            gemm = machine.get("gemm", {}).get("best_gflops")
            if gemm:
                benchmark.extra_info["pct_gemm"] = 100 * built.flops / median_s / 1e9 / gemm
        return chk

    return run
