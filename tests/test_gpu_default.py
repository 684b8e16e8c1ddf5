"""What a GPU user gets by default, checkable without a GPU: ``auto`` keeps ATen/cuDNN for the convs on
CUDA until fastcodec's CUDA conv is measured faster there, and the library works without triton."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from fastcodec import _backend


@pytest.fixture
def fake_cuda(monkeypatch):
    """Every backend available on 'cuda', as on a GPU machine with nvcc and triton."""
    monkeypatch.setattr(_backend, "availability", lambda fam, b, dev="cpu": _backend.Availability(True))
    monkeypatch.setattr(_backend, "_cuda_device_name", lambda: "NVIDIA Test GPU")
    for var in ("FASTCODEC_BACKEND", "FASTCODEC_CONV_BACKEND", "FASTCODEC_RVQ_BACKEND"):
        monkeypatch.delenv(var, raising=False)


def test_auto_keeps_cudnn_for_conv_on_cuda(fake_cuda):
    b, passed = _backend.auto_choice("conv", "cuda")
    assert b == "reference"
    assert len(passed) == 1 and "not been measured faster than cuDNN on NVIDIA Test GPU" in passed[0]
    assert _backend.CUDA_CONV_OPT_IN in passed[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default policy is not a fallback: no warning
        assert _backend.choose("conv", "cuda") == "reference"
    assert _backend.auto_choice("rvq", "cuda")[0] == "triton"


def test_measured_gpu_and_opt_in_use_the_cuda_conv(fake_cuda, monkeypatch):
    monkeypatch.setenv("FASTCODEC_CONV_BACKEND", "cuda")
    assert _backend.choose("conv", "cuda") == "cuda"
    monkeypatch.delenv("FASTCODEC_CONV_BACKEND")
    monkeypatch.setitem(_backend.CUDA_CONV_MEASURED_FASTER, "NVIDIA Test GPU", "bench/results/x.json")
    assert _backend.auto_choice("conv", "cuda") == ("cuda", [])


NO_TRITON = textwrap.dedent("""
    import sys, warnings
    sys.modules["triton"] = None  # what `import triton` does where no wheel was installed
    warnings.simplefilter("error", RuntimeWarning)
    import torch, fastcodec
    from fastcodec import _backend
    a = _backend.availability("rvq", "triton", "cpu")
    assert not a.ok and "triton cannot be imported" in a.reason, a
    torch.manual_seed(0)
    rvq = fastcodec.ResidualVectorQuantizer(dimension=8, n_q=2, bins=16).eval()
    x = torch.randn(1, 8, 5)
    ref = fastcodec.reference.ResidualVectorQuantizer(dimension=8, n_q=2, bins=16).eval()
    ref.load_state_dict(rvq.state_dict())
    assert torch.equal(rvq.encode(x), ref.encode(x))
    assert _backend.choose("rvq", "cpu") in ("cpp", "reference")
    from fastcodec import cli
    print(cli._triton_line())
""")


def test_works_without_triton():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTCODEC_", "TRITON_"))}
    r = subprocess.run([sys.executable, "-c", NO_TRITON], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "triton: unavailable" in r.stdout and "does not need it" in r.stdout
