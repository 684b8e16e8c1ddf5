"""The ``fastcodec`` command (info, build, bench) and the benchmark harness behind ``fastcodec bench``."""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import subprocess
import sys
import types

import pytest
import torch

from fastcodec import cli
from fastcodec._oracles import OracleUnavailable
from fastcodec.bench import case_base
from fastcodec.bench import cases as bc
from fastcodec.bench import harness as bh


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastcodec.cli", *args], capture_output=True, text=True,
                          timeout=600)


def test_console_script_is_declared():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert eps.get("fastcodec") == "fastcodec.cli:main"


def test_info_lists_versions_and_backends():
    r = _run("info")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    for needle in ("fastcodec 0.1.0", "torch", "triton", "numpy", "python", "CPU:", "build cache:", "backends"):
        assert needle in r.stdout, f"{needle!r} missing from:\n{r.stdout}"
    rows = [ln.split() for ln in r.stdout.splitlines() if ln.startswith("  ")]
    assert ["rvq", "cpu", "reference", "available"] in rows
    assert ["conv", "cpu", "reference", "available"] in rows
    # a backend that cannot run says why, e.g. triton on CPU tensors outside the interpreter
    assert any(row[:3] == ["rvq", "cuda", "triton"] and row[3] in ("available", "unavailable:") for row in rows)
    # every C++ extension, the fused LSTM and the streaming steps included, with its status
    for name in ("rvq_cpu", "conv_cpu", "lstm_cpu", "stream_cpu"):
        assert any(row[:1] == [name] and row[1] in ("built", "unavailable:") for row in rows), r.stdout


def test_bad_option_exits_with_usage_not_traceback():
    r = _run("bench", "--bogus")
    assert r.returncode == 2
    assert "unrecognized arguments: --bogus" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("argv, message", [
    (["bench", "--threads", "0"], "expected a positive integer"),
    (["bench", "--threads", "two"], "expected a positive integer"),
    (["bench", "--only", "rvq_encode,nope"], "unknown operation(s) nope"),
    (["bench", "--only", ","], "--only needs at least one operation"),
    (["bench", "--device", "tpu"], "not a device"),
    (["bench", "--device", "meta"], "not supported"),
    (["bench", "--full", "--smoke"], "not allowed with argument"),
    (["bench", "--json", "/nonexistent-dir/out.json", "--smoke"], "does not exist"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
], ids=["threads0", "threads-word", "only-unknown", "only-empty", "device-word", "device-meta",
        "full-and-smoke", "json-dir", "command", "no-command"])
def test_bad_input_is_a_message_and_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err


def test_cuda_unavailable_is_a_message(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "--device", "cuda", "--smoke"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: CUDA is not available" in err


def test_plot_without_matplotlib_is_a_message(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert cli.main(["bench", "--smoke", "--only", "rvq_decode", "--plot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and "pip install matplotlib" in err
    assert not (tmp_path / "x.png").exists()


def test_build_reports_each_extension_and_fails_with_the_reason(monkeypatch, capsys):
    from fastcodec import _build

    monkeypatch.setattr(_build, "build_all", lambda verbose=False: {"rvq_cpu": "ok", "conv_cpu": "g++: boom (fix: x)"})
    assert cli.main(["build"]) == 1
    out = capsys.readouterr()
    assert "rvq_cpu: ok" in out.out and "conv_cpu: FAILED" in out.out
    assert "g++: boom (fix: x)" in out.err
    monkeypatch.setattr(_build, "build_all", lambda verbose=False: {"rvq_cpu": "ok"})
    assert cli.main(["build"]) == 0


def test_bench_smoke_writes_json_with_machine_block(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--smoke", "--only", "rvq_encode", "--threads", "1", "--quiet", "--json", str(out)])
    stdout = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert rc == 0, doc["problems"]
    m = doc["machine"]
    for key in ("cpu_model", "cpu_count", "threads", "torch", "triton", "numpy", "python", "date", "gpu"):
        assert key in m, key
    assert m["threads"] == 1 and doc["threads"] == 1 and m["torch"] == torch.__version__
    assert doc["suite"] == "smoke" and doc["only"] == ["rvq_encode"]
    assert doc["gemm"]["best_gflops"] > 0 and set(doc["gemm"]["start"]["gflops"]) >= {"torch.mm"}
    (res,) = doc["results"]
    assert res["op"] == "rvq_encode" and res["flops"] == 2.0 * 1 * 20 * 2 * 64 * 16
    ref = res["providers"]["reference"]
    assert ref["status"] == "ok" and ref["check"] == "codes equal"
    assert len(ref["times_ms"]) >= 2 and ref["min_ms"] <= ref["median_ms"] <= ref["max_ms"]
    assert ref["peak_extra_bytes"] > 0 and ref["gflops"] > 0
    assert res["providers"]["compiled"]["status"] == "n/a"  # the smoke suite does not compile
    for name, p in res["providers"].items():
        assert p["status"] in ("ok", "n/a"), (name, p)
    assert "== RVQ encode" in stdout and "B1-T20-K2-bins64-D16" in stdout


def _standin_module(monkeypatch, **classes) -> str:
    mod = types.ModuleType("fastcodec_bench_standins")
    for k, v in classes.items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return mod.__name__


def _oracle_class(kind: str):
    cls = bc.load_class(kind, "reference")
    return cls if not isinstance(cls, str) else bc.load_class(kind, "audiocraft")


def _bench_with_wrong_rvq(monkeypatch, tmp_path, capsys, provider: str, base: type):
    """The smoke rvq_encode bench with ``provider``'s quantizer replaced by one whose codes are off by one:
    -> (exit status, the case's JSON result, stdout)."""

    class WrongRVQ(base):
        def encode(self, x):
            return (super().encode(x) + 1) % self.bins

    name = _standin_module(monkeypatch, WrongRVQ=WrongRVQ)
    monkeypatch.setitem(bc.SOURCES["rvq"], provider, (name, "WrongRVQ"))
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--smoke", "--only", "rvq_encode", "--threads", "1", "--quiet", "--json", str(out)])
    (res,) = json.loads(out.read_text())["results"]
    return rc, res, capsys.readouterr().out


def test_wrong_fast_module_is_a_mismatch_without_speedup(monkeypatch, tmp_path, capsys):
    rc, res, stdout = _bench_with_wrong_rvq(monkeypatch, tmp_path, capsys, "fastcodec", _oracle_class("rvq"))
    assert rc == 1
    fast = res["providers"]["fastcodec"]
    assert fast["status"] == "MISMATCH" and "nor near-ties" in fast["check"]
    assert res["speedup"] == {}
    assert "MISMATCH" in stdout and "problems" in stdout


def test_another_providers_mismatch_is_listed_but_not_a_failure(monkeypatch, tmp_path, capsys):
    # e.g. onnxruntime's export of the 48 kHz model: listed under problems, no ratio, exit status 0
    base = bc.load_class("rvq", "audiocraft")
    assert not isinstance(base, str), base  # the test set-up installs audiocraft (--no-deps)
    rc, res, stdout = _bench_with_wrong_rvq(monkeypatch, tmp_path, capsys, "audiocraft", base)
    assert res["providers"]["audiocraft"]["status"] == "MISMATCH" and res["providers"]["fastcodec"]["status"] == "ok"
    assert "audiocraft" not in res["speedup"]
    assert "problems" in stdout and "audiocraft: MISMATCH" in stdout
    assert rc == 0


def test_missing_audiocraft_is_omitted_with_a_note(monkeypatch, tmp_path, capsys):
    def not_installed(name, on_missing=None):
        raise OracleUnavailable("audiocraft is not installed (bash scripts/run.sh setup installs it)")

    monkeypatch.setattr(case_base, "import_oracle", not_installed)  # where load_class looks it up
    out = tmp_path / "bench.json"
    rc = cli.main(["bench", "--smoke", "--only", "rvq_decode", "--threads", "1", "--quiet", "--json", str(out)])
    stdout = capsys.readouterr().out
    assert rc == 0
    assert "omitted: audiocraft: audiocraft is not installed" in stdout
    table = stdout[stdout.index("== RVQ decode"):]
    assert "audiocraft" not in table and "reference" in table
    (res,) = json.loads(out.read_text())["results"]
    assert res["providers"]["audiocraft"]["omitted"] is True


def test_missing_fast_module_shows_na(monkeypatch):
    monkeypatch.setitem(bc.SOURCES["rvq"], "fastcodec", ("fastcodec", "NoSuchQuantizer"))
    case = next(c for c in bc.CASES if c.op == "rvq_decode" and "smoke" in c.suites)
    res = bh.run_case(case.op, "t", case.id, case.params, bc.build(case, bc.Options(suite="smoke")),
                      torch.device("cpu"), warmup=0, reps=2, min_reps=1, memory=False)
    assert res.providers["fastcodec"].status == "n/a"
    assert "fastcodec.NoSuchQuantizer is not available yet" in res.providers["fastcodec"].note
    assert res.speedups() == {}
    assert "n/a" in bh.format_table([res], gemm_best=100.0)


def _streaming_encoder(base, keep_state: bool):
    class StreamingEncoder(base):
        """Streams by recomputing the offline output of everything seen so far (exact for a causal model)."""

        @contextlib.contextmanager
        def streaming(self):
            self._seen = []
            try:
                yield
            finally:
                del self._seen

        def forward(self, x):
            if not hasattr(self, "_seen"):
                return super().forward(x)
            if not keep_state:
                self._seen = []
            done = sum(c.shape[-1] for c in self._seen) // 320
            self._seen.append(x)
            return super().forward(torch.cat(self._seen, -1))[..., done:]

    return StreamingEncoder


@pytest.mark.filterwarnings("ignore:.*weight_norm.*deprecated:FutureWarning")  # audiocraft's convs
@pytest.mark.parametrize("keep_state, status", [(True, "ok"), (False, "MISMATCH")], ids=["stateful", "stateless"])
def test_streaming_is_checked_against_the_offline_output(monkeypatch, keep_state, status):
    name = _standin_module(monkeypatch, Enc=_streaming_encoder(_oracle_class("encoder"), keep_state))
    monkeypatch.setitem(bc.SOURCES["stream_encoder"], "fastcodec", (name, "Enc"))
    case = next(c for c in bc.CASES if c.op == "seanet_streaming" and c.params["side"] == "encoder")
    res = bh.run_case(case.op, "t", case.id, case.params, bc.build(case, bc.Options(suite="smoke")),
                      torch.device("cpu"), warmup=0, reps=2, min_reps=1, memory=False)
    fast = res.providers["fastcodec"]
    assert fast.status == status, fast.check
    assert fast.check.startswith("stream vs offline")
    assert len(fast.times_ms) == 2
    assert res.providers["reference" if "reference" in res.providers else "audiocraft"].status == "ok"


def test_timing_is_interleaved_round_robin_and_drops_a_failing_provider():
    calls = []

    def impl(name, fail_at=None):
        def fn():
            calls.append(name)
            if fail_at is not None and calls.count(name) == fail_at:
                raise RuntimeError("boom")

        return bh.Impl(fn)

    times, errors = bh.time_interleaved({"a": impl("a"), "b": impl("b"), "c": impl("c", fail_at=4)},
                                        torch.device("cpu"), warmup=1, reps=4, min_reps=4)
    # warm-up a b c, then each round starts one provider later: a b c | b c a | c(fails) a b | b a
    assert calls == list("abc" "abc" "bca" "cab" "ba")
    assert errors == {"c": "RuntimeError: boom"}
    assert set(times) == {"a", "b"} and len(times["a"]) == 4 and len(times["b"]) == 4


def test_peak_extra_bytes_counts_live_allocations():
    def fn():
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(1_000_000)  # 4 MB live together
        del a, b
        c = torch.empty(500_000)  # 2 MB after both were freed: not a new peak
        return c

    peak = bh.peak_extra_bytes(bh.Impl(fn), torch.device("cpu"))
    assert 8_000_000 <= peak <= 8_000_000 + 4096, peak


def test_compare_codes_allows_only_certified_near_ties():
    # layer 0: [1,0] is exact (dist 0) against [5,5] (dist 41); layer 1: residual 0 is equidistant from
    # [1,0] and [0,1], an exact tie
    codebooks = torch.tensor([[[1.0, 0.0], [5.0, 5.0]], [[1.0, 0.0], [0.0, 1.0]]])
    x = torch.tensor([[[1.0], [0.0]]])  # (B=1, D=2, T=1)
    expected = torch.tensor([[[0], [0]]])  # (B=1, K=2, T=1)
    assert bh.compare_codes(expected.clone(), expected, x, codebooks).detail == "codes equal"
    tie = bh.compare_codes(torch.tensor([[[0], [1]]]), expected, x, codebooks)
    assert tie.ok and tie.flips == 1 and "1 certified near-tie" in tie.detail
    wrong = bh.compare_codes(torch.tensor([[[1], [0]]]), expected, x, codebooks)
    assert not wrong.ok and "row 0 layer 0" in wrong.detail
    out_of_range = bh.compare_codes(torch.tensor([[[0], [7]]]), expected, x, codebooks)
    assert not out_of_range.ok
    assert not bh.compare_codes(expected.float(), expected, x, codebooks).ok
    assert not bh.compare_codes(expected[:, :1], expected, x, codebooks).ok


def test_compare_codes_accepts_exact_duplicates_and_uses_the_float32_bound():
    # layer 0: codewords 0 and 1 are the same vector, so codes 0 and 1 quantize alike and layer 1 is still
    # compared; layer 1: residual [0,1] is exactly codeword 0, at distance 4 from codeword 1
    codebooks = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [5.0, 5.0]], [[0.0, 1.0], [0.0, -1.0], [4.0, 4.0]]])
    x = torch.tensor([[[1.0], [1.0]]])
    expected = torch.tensor([[[0], [0]]])
    dup = bh.compare_codes(torch.tensor([[[1], [0]]]), expected, x, codebooks)
    assert dup.ok and dup.flips == 1 and "1 exact-duplicate" in dup.detail, dup.detail
    wrong_after_dup = bh.compare_codes(torch.tensor([[[1], [1]]]), expected, x, codebooks)
    assert not wrong_after_dup.ok and "row 0 layer 1" in wrong_after_dup.detail
    # D=2: a gap of 2^-16 (1.5e-5) is far above the float32 bound 2 gamma_4 (|r| + |e|)^2 ~ 1.9e-6, though
    # within a flat 1e-5 (|r|^2 + |e|^2)
    codebooks = torch.tensor([[[1.0, 0.0], [1.0, 2.0**-8]]])
    x = torch.tensor([[[1.0], [0.0]]])
    close = bh.compare_codes(torch.tensor([[[1]]]), torch.tensor([[[0]]]), x, codebooks)
    assert not close.ok and "float32 bound" in close.detail, close.detail


def test_float_checks_use_the_float64_error():
    ref64 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    ref = torch.tensor([1.0 + 2**-20, -2.0])
    tol = bh.float_tolerance(ref, ref64)
    assert tol == pytest.approx(4 * 2**-20 + 2 * 2**-23)
    assert bh.compare_floats("y", ref + tol / 2, ref, tol).ok
    assert not bh.compare_floats("y", ref + 2 * tol, ref, tol).ok
    assert not bh.compare_floats("y", torch.tensor([float("nan"), -2.0]), ref, tol).ok
    assert not bh.compare_floats("y", ref[:1], ref, tol).ok
    # relative bound (k-means means): |a - b| <= rtol * |b| elementwise; exact zeros compare equal
    b = torch.tensor([0.0, 1e-3, 1e3])
    assert bh.compare_floats("m", b * (1 + 1e-6), b, 0.0, rtol=2e-6).ok
    assert not bh.compare_floats("m", b + torch.tensor([0.0, 1e-6, 0.0]), b, 0.0, rtol=2e-6).ok


def test_seanet_flops_count_convs_and_lstm():
    # one conv (C_in 2, C_out 3, k 5, T_out 10) and a 1-layer LSTM (I = H = 3) over 10 steps
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(2, 3, 5)
            self.lstm = torch.nn.LSTM(3, 3, 1)

        def forward(self, x):
            return self.lstm(self.conv(x).permute(2, 0, 1))[0]

    _, flops = bc._conv_lstm_flops(Net(), torch.randn(1, 2, 14))
    assert flops == 2 * 2 * 3 * 5 * 10 + 2 * 4 * 3 * (3 + 3) * 10


def test_receptive_fields_of_the_24k_seanet():
    kw = bc.SEANET_CONFIGS["24k"]["kwargs"]
    # encoder: 6 + (2+3) + (2*2+7*2) + (2*8+9*8) + (2*40+15*40) + 6*320 samples
    assert bc.encoder_context(kw) == 6 + 5 + 18 + 88 + 680 + 1920
    assert bc.decoder_context(kw) == 8


def test_suites_select_cases():
    assert {c.op for c in bc.select("smoke")} == set(bc.OPS)
    assert {c.op for c in bc.select("quick")} == set(bc.OPS)
    assert len(bc.select("full")) > len(bc.select("quick"))
    assert all(c.op == "rvq_encode" for c in bc.select("quick", ["rvq_encode"]))
    with pytest.raises(ValueError, match="unknown operation"):
        bc.select("quick", ["nope"])
    with pytest.raises(ValueError, match="unknown suite"):
        bc.select("huge")


def test_rtf_script_runs_and_writes_json(tmp_path, capsys):
    # python -m fastcodec.bench.rtf on a tenth of a second: every provider, both stages, the paper's numbers
    from fastcodec.bench import rtf

    out = tmp_path / "rtf.json"
    assert rtf.main(["--seconds", "0.1", "--repeats", "1", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["codes_equal_fraction"] == 1.0
    res = d["results"]["1"]
    assert {"fastcodec", "reference", "audiocraft"} <= set(res)
    for stages in res.values():
        assert stages["encode"]["rtf"] > 0 and stages["decode"]["rtf"] > 0
    assert "paper (one thread): encode 9.8x, decode 10.4x" in capsys.readouterr().out
