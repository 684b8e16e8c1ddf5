"""csrc/conv1d_cuda.cu compiles with plain nvcc (no torch headers) for sm_80 and sm_90, warning-free,
and its extern "C" interface matches the ctypes mirror in fastcodec/ops/conv.py. Runs without a GPU;
skips only when nvcc is absent."""
from __future__ import annotations

import ctypes
import subprocess

import pytest
import torch

from fastcodec import _build
from fastcodec.ops import conv as C

NVCC = C._nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
SRC = _build.CSRC / "conv1d_cuda.cu"
# every nvcc and host-compiler warning is an error: unused values, narrowing, sign compares all hide bugs here
STRICT = ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra"]
GENCODE = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


def _nvcc(args: list[str]) -> None:
    r = subprocess.run([NVCC, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and not r.stderr.strip(), f"nvcc {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"


@needs_nvcc
def test_compiles_sm80_sm90(tmp_path):
    obj = tmp_path / "conv1d_cuda.o"
    _nvcc(["-c", "-O3", *GENCODE, *STRICT, f"-I{_build.CSRC}", "-o", str(obj), str(SRC)])
    assert obj.stat().st_size > 0
    includes = [ln for ln in SRC.read_text().splitlines() if ln.startswith("#include")]
    assert not [ln for ln in includes if any(h in ln for h in ("torch", "ATen", "c10"))], includes


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc is not installed")
    so = tmp_path_factory.mktemp("cuda") / "libconv1d_cuda.so"
    _nvcc(["-shared", "-Xcompiler", "-fPIC", "-gencode", "arch=compute_80,code=sm_80", *STRICT,
           f"-I{_build.CSRC}", "-o", str(so), str(SRC)])
    lib = ctypes.CDLL(str(so))
    lib.fastcodec_conv1d_params_size.restype = ctypes.c_int64
    lib.fastcodec_conv1d_cuda.restype = ctypes.c_int
    lib.fastcodec_conv1d_cuda.argtypes = [ctypes.POINTER(C._Conv1dParams), ctypes.c_int, ctypes.c_void_p]
    lib.fastcodec_cuda_error_string.restype = ctypes.c_char_p
    return lib


def test_params_layout_matches_ctypes(lib):
    assert lib.fastcodec_conv1d_params_size() == ctypes.sizeof(C._Conv1dParams)


def _params(**over) -> C._Conv1dParams:
    p = dict(x=1, weight=1, out=1, batch=1, c_in=2, c_out=3, t_in=10, t_out=8, kernel=3, stride=1, dilation=1,
             pad_left=0, pad_right=0, reflect_len=10, x_stride_b=20, x_stride_c=10, x_stride_t=1,
             out_stride_b=24, out_stride_c=8, pad_mode=0)
    p.update(over)
    return C._Conv1dParams(**p)


@pytest.mark.parametrize("over", [
    dict(stride=0), dict(kernel=0), dict(t_out=9), dict(pad_left=-1), dict(pad_mode=5), dict(x=None),
    dict(kernel=20), dict(pad_mode=1, reflect_len=3), dict(batch=0),
], ids=["stride0", "kernel0", "t_out", "pad", "mode", "null-x", "kernel-too-long", "reflect_len", "batch0"])
def test_launcher_rejects_bad_params(lib, over):
    """The launcher re-validates before touching the device: bad params return cudaErrorInvalidValue (1)."""
    assert lib.fastcodec_conv1d_cuda(_params(**over), 0, None) == 1
    assert lib.fastcodec_cuda_error_string(1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_launcher_without_gpu_returns_error(lib):
    """Valid params on a machine without a GPU: an error code (no device / no driver), not a crash."""
    err = lib.fastcodec_conv1d_cuda(_params(), 0, None)
    assert err not in (0, 1), lib.fastcodec_cuda_error_string(err)


def test_build_command_has_sass_and_ptx_for_the_inputs_arch():
    cmd = C.cuda_build_command("nvcc", "90", "out.so")
    assert "-gencode=arch=compute_90,code=sm_90" in cmd
    assert "-gencode=arch=compute_90,code=compute_90" in cmd  # PTX: a newer GPU JITs it


def test_build_key_has_arch_and_nvcc_version(monkeypatch):
    monkeypatch.setattr(C, "_nvcc_version", lambda nvcc: "Build cuda_12.4")
    d80, d90 = C.cuda_build_dir("nvcc", "80"), C.cuda_build_dir("nvcc", "90")
    assert d80 != d90 and "sm80" in d80.name
    monkeypatch.setattr(C, "_nvcc_version", lambda nvcc: "Build cuda_12.8")
    assert C.cuda_build_dir("nvcc", "80") != d80


def test_arch_is_the_inputs_device(monkeypatch):
    seen = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: seen.append(dev) or (8, 6))
    dev = torch.device("cuda", 1)
    assert C._cuda_arch(dev) == "86" and seen == [dev]


def test_missing_nvcc_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(C, "_nvcc", lambda: None)
    monkeypatch.setattr(C, "_cuda_arch", lambda dev=None: "00")
    monkeypatch.delitem(C._cuda, "00", raising=False)
    with pytest.raises(_build.ExtensionBuildError, match="nvcc .* is needed .* CUDA_HOME"):
        C._cuda_lib(None)
    C._cuda.pop("00", None)
