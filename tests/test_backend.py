"""Backend choice (``fastcodec._backend``) and ``fastcodec info``: the CPU's SIMD level, ``auto`` per family,
invalid ``FASTCODEC_*BACKEND`` values, CUDA rows without CUDA; and the kernels' vector paths (AVX-512,
AVX2+FMA, portable) agreeing bit for bit."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from fastcodec import _backend
from fastcodec._build import load_extension, load_named

def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return set(next(ln for ln in f if ln.startswith("flags")).split(":", 1)[1].split())


FLAGS = _cpu_flags()
NATIVE = "avx512" if "avx512f" in FLAGS else "avx2" if {"avx2", "fma"} <= FLAGS else "portable"


@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith("FASTCODEC_") and k.endswith("BACKEND"):
            monkeypatch.delenv(k)
    monkeypatch.setattr(_backend, "_warned", set())
    return monkeypatch


def _info(**env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not (k.startswith("FASTCODEC_") and k.endswith("BACKEND"))}
    return subprocess.run([sys.executable, "-m", "fastcodec.cli", "info"], capture_output=True, text=True,
                          timeout=900, env={**e, **env})


# --------------------------------------------------------------------------------------------------
# SIMD level and auto
# --------------------------------------------------------------------------------------------------


def test_simd_level_is_the_cpus_and_the_kernels_report_it():
    level = _backend.simd_level()
    assert level == ("avx512_bf16" if NATIVE == "avx512" and "avx512_bf16" in FLAGS else NATIVE)
    assert _backend.kernel_path(level) == NATIVE
    for name in _backend.CPP_EXTENSIONS:  # -march=native: each extension compiled the CPU's vector path
        assert load_named(name).simd() == NATIVE, name


@pytest.mark.parametrize("level", ["avx512_bf16", "avx512", "avx2"])
def test_auto_picks_cpp_with_vector_kernels(clean_env, level):
    clean_env.setattr(_backend, "_simd", (level, "test"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fam in _backend.FAMILIES:
            assert _backend.choose(fam, "cpu") == "cpp"
            assert _backend.auto_choice(fam, "cpu") == ("cpp", [])


def test_auto_passes_over_portable_kernels_and_warns_once(clean_env):
    clean_env.setattr(_backend, "_simd", ("portable", "test"))
    for fam in _backend.FAMILIES:
        with pytest.warns(RuntimeWarning, match=rf"'reference' backend for the {fam} ops on cpu: cpp: this CPU has "
                                                r"no AVX2\+FMA.*slower than the reference"):
            assert _backend.choose(fam, "cpu") == "reference"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _backend.choose(fam, "cpu") == "reference"  # once only
        b, passed = _backend.auto_choice(fam, "cpu")
        assert b == "reference" and passed[0].startswith("cpp: this CPU has no AVX2+FMA")
        # forcing the portable kernels still runs them: they work, they are only slower
        clean_env.setenv(_backend.env_var(fam), "cpp")
        assert _backend.choose(fam, "cpu") == "cpp"
        clean_env.delenv(_backend.env_var(fam))


def test_portable_cpu_runs_the_reference_ops(clean_env):
    """On a CPU without AVX2 the fast modules give the reference's numbers (auto runs the reference)."""
    from fastcodec.ops import conv as C

    clean_env.setattr(_backend, "_simd", ("portable", "test"))
    x, w, b = torch.randn(1, 4, 50), torch.randn(8, 4, 3), torch.randn(8)
    with pytest.warns(RuntimeWarning, match="no AVX2"):
        y = C.conv1d(x, w, b, None, 1, 1, 2, 0, "reflect", 1.0)
    assert torch.equal(y, C.conv1d_reference(x, w, b, None, 1, 1, 2, 0, "reflect", 1.0))


# --------------------------------------------------------------------------------------------------
# the environment
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fam", _backend.FAMILIES)
def test_invalid_family_value_names_its_variable(clean_env, fam):
    var = _backend.env_var(fam)
    clean_env.setenv(var, "avx2")
    with pytest.raises(ValueError, match=rf"{var}='avx2' is not a backend; choose one of auto, reference"):
        _backend.choose(fam, "cpu")


def test_invalid_global_value_is_flagged_when_a_family_variable_decides(clean_env):
    clean_env.setenv("FASTCODEC_RVQ_BACKEND", "cpp")
    clean_env.setenv("FASTCODEC_BACKEND", "gpu")
    with pytest.raises(ValueError, match="FASTCODEC_BACKEND='gpu'"):
        _backend.requested("rvq")


def test_blank_value_means_auto(clean_env):
    clean_env.setenv("FASTCODEC_CONV_BACKEND", " ")
    assert _backend.requested("conv") == "auto"
    assert _backend.check_environment() == []


def test_check_environment_lists_every_problem(clean_env):
    assert _backend.check_environment() == []
    clean_env.setenv("FASTCODEC_BACKEND", "Reference")  # case and blanks are fine
    clean_env.setenv("FASTCODEC_RVQ_BACKEND", "gpu")
    clean_env.setenv("FASTCODEC_CONV_BACKEND", "triton")
    clean_env.setenv("FASTCODEC_DECODER_BACKEND", "cpp")
    problems = _backend.check_environment()
    assert len(problems) == 3, problems
    assert any("FASTCODEC_RVQ_BACKEND='gpu' is not a backend" in p for p in problems)
    assert any("FASTCODEC_CONV_BACKEND=triton: the conv ops have no 'triton' implementation" in p for p in problems)
    assert any("FASTCODEC_DECODER_BACKEND is not read by fastcodec" in p for p in problems)


def test_import_warns_about_an_invalid_value():
    env = {**os.environ, "FASTCODEC_BACKEND": "cpu"}
    r = subprocess.run([sys.executable, "-c", "import fastcodec"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "RuntimeWarning: fastcodec: FASTCODEC_BACKEND='cpu' is not a backend" in r.stderr


# --------------------------------------------------------------------------------------------------
# CUDA rows without CUDA, and fastcodec info
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a machine without CUDA")
def test_no_cuda_backend_is_available_without_cuda(clean_env):
    report = _backend.backends()
    for fam in _backend.FAMILIES:
        assert report[fam]["cuda"], fam
        for b, status in report[fam]["cuda"].items():
            assert status.startswith("no CUDA device"), (fam, b, status)
        assert not _backend.availability(fam, "reference", "cuda").ok
    with pytest.raises(_backend.BackendUnavailableError, match="no CUDA device"):
        _backend.choose("rvq", "cuda")


def test_info_shows_simd_level_and_what_each_family_runs():
    r = _info()
    assert r.returncode == 0, r.stdout + r.stderr
    level = _backend.simd_level()
    assert f"SIMD: {_backend.SIMD_NAMES[level]} (from /proc/cpuinfo flags)" in r.stdout, r.stdout
    rows = [ln.split() for ln in r.stdout.splitlines() if ln.startswith("  ")]
    pick = "reference" if NATIVE == "portable" else "cpp"
    for fam in _backend.FAMILIES:
        assert any(row[:3] == [fam, "cpu", pick] and "auto" in " ".join(row) for row in rows), r.stdout
    for name in _backend.CPP_EXTENSIONS:
        assert [name, "built", f"({NATIVE}", "path)"] in rows, r.stdout
    if not torch.cuda.is_available():
        cuda_rows = [row for row in rows if row[1:2] == ["cuda"]]
        assert cuda_rows and all(row[3:6] == ["unavailable:", "no", "CUDA"] for row in cuda_rows), r.stdout
        assert "no CUDA device" in r.stdout


def test_info_flags_an_invalid_value_and_exits_1():
    r = _info(FASTCODEC_CONV_BACKEND="fast", FASTCODEC_RVQ_BACKEND="cpp")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "error: FASTCODEC_CONV_BACKEND='fast' is not a backend" in r.stdout, r.stdout
    rows = [ln.split() for ln in r.stdout.splitlines() if ln.startswith("  ")]
    assert any(row[:3] == ["rvq", "cpu", "cpp"] and row[3] == "forced" for row in rows), r.stdout
    assert any(row[:3] == ["conv", "cpu", "-"] and "FASTCODEC_CONV_BACKEND='fast'" in " ".join(row)
               for row in rows), r.stdout


# --------------------------------------------------------------------------------------------------
# every vector path gives bitwise the same results
# --------------------------------------------------------------------------------------------------

SOURCES = {"rvq_cpu": "rvq_cpu.cpp", "conv_cpu": "conv1d_cpu.cpp", "lstm_cpu": "lstm_cpu.cpp",
           "stream_cpu": "stream_cpu.cpp"}
# builds of every lower vector path this CPU can run: -march=native minus AVX-512, minus AVX2
LEVEL_FLAGS = {"avx2": ["-mno-avx512f"], "portable": ["-mno-avx2"]}
LOWER = [lv for lv in ("avx2", "portable") if lv != NATIVE and (lv == "portable" or NATIVE == "avx512")]


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _same(a, b, what):
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (u, v) in enumerate(zip(a, b)):
            _same(u, v, f"{what}[{i}]")
        return
    same = torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())
    assert same, f"{what}: {(a != b).sum().item()} of {a.numel()} elements differ"


def _run_rvq(e):
    out = []
    for B, D, T, K, bins in ((2, 130, 37, 3, 1000), (1, 64, 300, 2, 256), (3, 7, 5, 4, 17)):
        x, cb = _rand(B, D, T, seed=B), _rand(K, bins, D, seed=D)
        cn = (cb * cb).sum(-1)
        out.append(e.encode(x, cb, cn, True, True))
        xf = x[:1, :, :5].contiguous()  # few rows: packed and in-place codebooks
        out.append(e.encode(xf, cb, cn, True, True, e.pack_few(cb)))
        out.append(e.encode(xf, cb, cn, True, True))
        codes = torch.randint(0, bins, (B, K, T), generator=torch.Generator().manual_seed(1))
        out.append(e.decode(codes, cb))
        samples = x.transpose(1, 2).reshape(-1, D).contiguous()
        out.append(e.kmeans(samples, samples[: min(bins, samples.shape[0])].clone(), 3))
        codes, _, res = e.encode(x, cb, cn, False, True)
        bufs = [_rand(K, bins, seed=5).abs(), _rand(K, bins, D, seed=3), _rand(K, bins, D, seed=4)]
        e.ema_update(res, codes, *bufs, 0.8, 1e-5)
        out.append(bufs)
    return out


def _run_conv(e):
    out = []
    # c_out not a multiple of 6, lengths not multiples of 16, strides, dilations, ELU, skip, reflect
    for B, ci, co, K, s, d, T, mode, elu, skip in ((2, 5, 13, 3, 1, 3, 129, 1, 1.0, True),
                                                   (1, 32, 64, 16, 8, 1, 1001, 1, 0.5, False),
                                                   (1, 16, 7, 1, 1, 1, 37, 0, None, True)):
        x, w, b = _rand(B, ci, T, seed=ci), _rand(co, ci, K, seed=co) / (ci * K) ** 0.5, _rand(co, seed=1)
        pad = (K - 1) * d
        t_out = (T + pad - (K - 1) * d - 1) // s + 1
        sk = _rand(B, co, t_out, seed=2) if skip else None
        y = torch.empty(B, co, t_out)
        e.conv1d(x, e.pack_weight(w), b, sk, y, co, K, s, d, pad, 0, mode, elu)
        out.append(y)
    for B, ci, co, K, s, T in ((1, 24, 10, 16, 8, 53), (2, 8, 4, 4, 2, 100)):
        x, w, b = _rand(B, ci, T, seed=5), _rand(ci, co, K, seed=6) / (ci * K) ** 0.5, _rand(co, seed=7)
        y = torch.empty(B, co, (T - 1) * s + K - (K - s))
        e.conv_transpose1d(x, e.pack_weight(e.polyphase_weight(w, s)), b, y, co, K, s, 0, 1.0)
        out.append(y)
    x = _rand(2, 32, 777, seed=8)
    w0, w1, wsc = _rand(16, 32, 3, seed=9) / 10, _rand(32, 16, 1, seed=10) / 4, _rand(32, 32, 1, seed=11) / 6
    y = torch.empty(2, 32, 777)
    e.resblock(x, e.pack_weight(w0), _rand(16, seed=12), e.pack_weight(w1), _rand(32, seed=13), e.pack_weight(wsc),
               None, y, 16, 3, 3, 6, 0, 1, 1.0, 1.0, 0)
    out.append(y)
    v = torch.cat([torch.linspace(-100, 10, 20001), torch.tensor([0.0, -0.0, -1e-40, -87.9, -88.5, -float("inf")])])
    out.append(e.elu(v, 0.3))
    return out


def _run_lstm(e):
    out = []
    for I, H, layers, T, B in ((40, 50, 2, 9, 7), (16, 32, 1, 20, 1), (8, 24, 2, 3, 13)):
        lstm = torch.nn.LSTM(I, H, layers)
        with torch.no_grad():
            for i, w in enumerate(lstm.parameters()):
                w.copy_(_rand(*w.shape, seed=i) * H ** -0.5)
        x, h, c = _rand(T, B, I, seed=20), 0.5 * _rand(layers, B, H, seed=21), _rand(layers, B, H, seed=22)
        out.append((e.forward(x, e.pack(lstm._flat_weights, layers), h, c, None), h, c))
    v = torch.cat([torch.linspace(-110, 110, 10_001), torch.tensor([float("nan"), float("inf"), -float("inf")])])
    out.append(e.pointwise(v))
    return out


def _run_stream(e):
    out = []
    for B, C, N, kernel, stride, dil, T, frames in ((2, 5, 37, 3, 1, 2, 9, 5), (1, 32, 64, 16, 8, 1, 40, 4),
                                                    (1, 64, 100, 7, 1, 1, 12, 6)):
        cap = T + 4
        buf = torch.zeros(B, cap, C).transpose(1, 2)
        o = torch.empty(B, frames, N).transpose(1, 2)
        w = _rand(kernel * C, N, seed=N) / (kernel * C) ** 0.5
        e.conv_push(buf, _rand(B, C, T, seed=C), 0, 0, 1.0, frames, kernel, stride, dil, e.pack_panels(w, 64),
                    _rand(N, seed=1), o)
        out += [o.clone(), buf.clone()]
    for B, C, N, kernel, stride, T in ((1, 48, 20, 8, 4, 3), (2, 16, 7, 4, 2, 5)):
        ov = kernel - stride
        pending = torch.zeros(B, ov, N).transpose(1, 2).copy_(_rand(B, N, ov, seed=2))
        o = torch.empty(B, T * stride - 1, N).transpose(1, 2)
        w = _rand(C, kernel * N, seed=3) / C ** 0.5
        e.convtr_push(_rand(B, C, T, seed=4), 1.0, kernel, stride, e.pack_panels(w, 32), _rand(N, seed=5), pending,
                      1, o)
        out += [o.clone(), pending.clone()]
    out.append(e.elu(torch.linspace(-100, 10, 20001), 1.0))
    return out


RUNS = {"rvq_cpu": _run_rvq, "conv_cpu": _run_conv, "lstm_cpu": _run_lstm, "stream_cpu": _run_stream}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SOURCES))
def test_vector_paths_are_bitwise_equal(name):
    """The native build (this CPU's best path) and a build of each lower path it can run (AVX2 where the CPU
    has AVX-512, the portable loops everywhere) give bitwise the same outputs: the same fma chains per lane,
    in the same order, the same ELU/exp/tanh steps."""
    native = load_named(name)
    assert native.simd() == NATIVE
    expected = RUNS[name](native)
    if not LOWER:
        pytest.skip("this CPU has no vector path to compare with")
    for level in LOWER:
        other = load_extension(f"{name}_simd_{level}", [SOURCES[name]], LEVEL_FLAGS[level])
        assert other.simd() == level
        _same(RUNS[name](other), expected, f"{name}: {level} vs {NATIVE}")
