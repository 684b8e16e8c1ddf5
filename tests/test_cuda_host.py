"""The CUDA conv's logic on the CPU: csrc/conv1d_cuda_host.cpp drives the kernel bodies of
csrc/conv1d_cuda_body.cuh (the same header nvcc compiles into csrc/conv1d_cuda.cu) block by block and
phase by phase, with the launcher's plan (tiles, shared memory, grid chunking in y/z, direct fallback),
and is compared with the reference conv on many small geometries. Needs only g++; no GPU, no nvcc."""
from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
import torch

from fastcodec import _build
from fastcodec.ops import conv as C

CXX = shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    so = tmp_path_factory.mktemp("cuda_host") / "libconv1d_cuda_host.so"
    # -ffp-contract=off: the kernel's fmaf calls are explicit; nothing else may be fused (as on the GPU's adds)
    cmd = [CXX, "-O2", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror",
           f"-I{_build.CSRC}", "-o", str(so), str(_build.CSRC / "conv1d_cuda_host.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lib = ctypes.CDLL(str(so))
    lib.fastcodec_conv1d_host_params_size.restype = ctypes.c_int64
    lib.fastcodec_conv1d_host.restype = ctypes.c_int
    lib.fastcodec_conv1d_host.argtypes = [ctypes.POINTER(C._Conv1dParams), ctypes.c_int64, ctypes.c_int64,
                                          ctypes.c_int, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)]
    assert lib.fastcodec_conv1d_host_params_size() == ctypes.sizeof(C._Conv1dParams)
    return lib


# (B, C_in, C_out, T, K, stride, dilation, pad_left, pad_right, pad_mode, elu, skip, (grid y, z limits), direct)
GEOMS = {
    "basic": (1, 3, 5, 20, 3, 1, 1, 2, 0, "constant", False, False, (0, 0), 0),
    "two-time-tiles-co20": (2, 4, 20, 300, 3, 1, 1, 1, 1, "reflect", True, True, (0, 0), 0),
    "stride8-k16": (1, 2, 3, 1100, 16, 8, 1, 8, 8, "reflect", False, False, (0, 0), 0),
    "dilation9": (1, 3, 4, 150, 3, 1, 9, 18, 0, "reflect", True, True, (0, 0), 0),
    "ci-chunks-40": (1, 40, 17, 140, 7, 1, 1, 6, 0, "constant", True, False, (0, 0), 0),
    "short-reflect": (2, 2, 3, 3, 7, 1, 1, 6, 0, "reflect", False, False, (0, 0), 0),
    "short-reflect-both": (1, 2, 2, 2, 5, 1, 1, 2, 2, "reflect", True, False, (0, 0), 0),
    "grid-chunks-yz": (3, 2, 40, 130, 3, 2, 1, 1, 1, "constant", False, True, (1, 2), 0),
    "direct-span-too-big": (1, 3, 5, 450, 4, 100, 1, 0, 0, "constant", True, True, (0, 0), 0),
    "direct-chunked": (2, 3, 50, 400, 3, 1, 2, 4, 0, "reflect", True, True, (0, 0), 1),
}


def _run(host, geom, seed=0):
    B, ci, co, T, K, s, d, pl, pr, mode, elu, with_skip, (gy, gz), force = geom
    g = torch.Generator().manual_seed(seed)
    # inputs sliced from bigger buffers so that no stride is trivial
    x = torch.randn(B + 1, ci + 1, T * 2, generator=g)[1:, 1:, ::2]
    w = torch.randn(co, ci, K, generator=g) / (ci * K) ** 0.5
    bias = torch.randn(co, generator=g)
    t_out = C.conv1d_output_length(T, K, s, d, pl, pr)
    skip = torch.randn(B, t_out, co + 2, generator=g).transpose(1, 2)[:, 1:-1] if with_skip else None
    alpha = 0.7 if elu else None
    out = torch.full((B, co, t_out), float("nan"))
    p = C.conv1d_params(x, w, bias, skip, out, s, d, pl, pr, mode, alpha)
    n = ctypes.c_int64(0)
    err = host.fastcodec_conv1d_host(ctypes.byref(p), gy, gz, force, 7 * 256 if force else 0,
                                     ctypes.byref(n))
    assert err == 0, f"host run returned {err}"
    f64 = [None if t is None else t.double() for t in (x, w, bias, skip)]
    ref64 = C.conv1d_reference(*f64, s, d, pl, pr, mode, alpha)
    ref32 = C.conv1d_reference(x, w, bias, skip, s, d, pl, pr, mode, alpha)
    return out, ref32, ref64, n.value


@pytest.mark.parametrize("name", list(GEOMS))
def test_host_driven_kernel_matches_reference(host, name):
    out, ref32, ref64, launches = _run(host, GEOMS[name])
    assert not out.isnan().any(), "an output was never written (or read unstaged shared memory)"
    # the kernel sums in its own chunked order: allow 4x PyTorch's own float32 error against float64,
    # with a floor of a few ulps of the largest output (PyTorch can be exact on tiny sums)
    err32 = (ref32.double() - ref64).abs().max().item()
    tol = max(4 * err32, 8 * torch.finfo(torch.float32).eps * ref64.abs().max().item())
    err = (out.double() - ref64).abs().max().item()
    assert err <= tol, f"{name}: max error {err:.3g} > tolerance {tol:.3g} (torch fp32 {err32:.3g})"
    if name == "grid-chunks-yz":
        assert launches == 2 * 3  # batch 3 in z-chunks of 2, 3 output-channel blocks in y-chunks of 1
    if name == "direct-chunked":
        assert launches == 23  # 2 * 50 * 400 outputs, 1792 per launch


def test_host_rejects_bad_params(host):
    x, w = torch.randn(1, 2, 10), torch.randn(3, 2, 3)
    out = torch.empty(1, 3, 8)
    p = C.conv1d_params(x, w, None, None, out, 1, 1, 0, 0, "constant", None)
    p.t_out = 9
    n = ctypes.c_int64(0)
    assert host.fastcodec_conv1d_host(ctypes.byref(p), 0, 0, 0, 0, ctypes.byref(n)) == 1
