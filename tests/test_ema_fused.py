"""The fused RVQ training step (fastcodec/_fused_train.py): all K layers quantized in one launch and
updated in one EMA launch sequence, no host syncs, asynchronous input checks. On CPU the Triton kernels
run under TRITON_INTERPRET=1 (tests/conftest.py) at tiny shapes; the same tests run on a GPU."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

import fastcodec
from fastcodec import _devcheck
from fastcodec import _fused_train as FT
from fastcodec.reference.quantization import ResidualVectorQuantizer as RefRVQ
from tests.utils import requires_cuda

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("tests/test_ema_fused.py needs TRITON_INTERPRET=1 without CUDA (tests/conftest.py sets it)")

# tiny: 64 random codewords and 12 rows a step, so that no code gets more than two rows (checked below): then
# the order of a code's row sum cannot matter and the EMA buffers are bit-identical to the reference's
# x^T @ onehot
D, BINS, K, B, T = 16, 64, 2, 2, 6


@pytest.fixture(autouse=True)
def _triton(monkeypatch):
    monkeypatch.setenv("FASTCODEC_RVQ_BACKEND", "triton")
    if DEV == "cuda":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def _pair(threshold=2, **kw):
    torch.manual_seed(0)
    fast = fastcodec.ResidualVectorQuantizer(dimension=D, n_q=K, bins=BINS, kmeans_init=False,
                                             threshold_ema_dead_code=threshold, **kw).to(DEV).train()
    with torch.no_grad():  # spread-out codewords (the uniform init is tiny) and a few dead codes
        for layer in fast.vq.layers:
            cbk = layer._codebook
            cbk.embed.copy_(torch.randn(BINS, D))
            cbk.embed_avg.copy_(cbk.embed)
            cbk.cluster_size.copy_(torch.rand(BINS) * 4)
    ref = RefRVQ(dimension=D, n_q=K, bins=BINS, kmeans_init=False, threshold_ema_dead_code=threshold, **kw)
    ref = ref.to(DEV).train()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def _bufs(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_fused_step_runs_and_is_bit_identical_to_the_reference(monkeypatch):
    fast, ref = _pair()
    calls = []
    real = FT.train_step
    monkeypatch.setattr(FT, "train_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    for step in range(2):
        x = torch.randn(B, D, T, device=DEV, requires_grad=True)
        xr = x.detach().clone().requires_grad_(True)
        torch.manual_seed(10 + step)
        out = fast(x, 75)
        rng = torch.get_rng_state()
        torch.manual_seed(10 + step)
        out_r = ref(xr, 75)
        assert torch.equal(rng, torch.get_rng_state()), "the expiry draws consume the RNG as the reference does"
        assert torch.equal(out.codes, out_r.codes)
        counts = torch.stack([torch.bincount(c.flatten(), minlength=BINS) for c in out.codes.unbind(1)])
        assert counts.max() <= 2, "test data must give each code at most two rows (see the comment above)"
        assert torch.equal(out.x, out_r.x) and torch.equal(out.bandwidth, out_r.bandwidth)
        assert torch.equal(out.penalty, out_r.penalty)
        (out.x.sum() + out.penalty).backward()
        (out_r.x.sum() + out_r.penalty).backward()
        # autograd adds the layers' commitment gradients in another order than the reference's graph: a few ulps
        torch.testing.assert_close(x.grad, xr.grad, rtol=4 * 2**-24, atol=2**-24)
        for k, v in _bufs(ref).items():
            if k.endswith(".embed"):
                # embed_avg / (smoothed size * n): n = sum of the layer's cluster sizes, which the kernel adds in
                # its own fixed order (torch's CPU sum order is its vectorisation's); a few ulps
                torch.testing.assert_close(fast.state_dict()[k], v, rtol=8 * 2**-24, atol=0, msg=k)
            else:
                assert torch.equal(fast.state_dict()[k], v), f"step {step}: {k}"
    assert len(calls) == 2


class _SyncCounter:
    """Counts the calls that read a device tensor on the host (each one a sync on a GPU)."""

    NAMES = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "cpu", "numpy", "nonzero")

    def __init__(self):
        self.calls = []

    @contextlib.contextmanager
    def count(self, monkeypatch):
        for name in self.NAMES:
            real = getattr(torch.Tensor, name)

            def wrapped(t, *a, _real=real, _name=name, **k):
                if not getattr(t, "_fc_host_buffer", False):
                    self.calls.append(_name)
                return _real(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapped)
        yield self  # the caller's monkeypatch context restores the methods


def test_training_step_makes_no_host_sync(monkeypatch):
    fast, _ = _pair()
    fast(torch.randn(B, D, T, device=DEV), 75)  # the first fused step reads the expiry flags once
    # the step reads two host buffers on purpose (_devcheck.host_buffer: pinned, written by async copies)
    counter = _SyncCounter()
    with monkeypatch.context() as m, counter.count(m):
        if DEV == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(2):
                fast(torch.randn(B, D, T, device=DEV), 75)
        finally:
            if DEV == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    assert counter.calls == [], f"host reads of device tensors in the training step: {counter.calls}"


def test_quantize_train_op_opcheck_and_reference():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, D, 5, generator=g).to(DEV)
    cb = torch.randn(K, BINS, D, generator=g).to(DEV)
    cn = (cb * cb).sum(-1)
    torch.library.opcheck(torch.ops.fastcodec.rvq_quantize_train, (x, cb, cn),
                          test_utils=("test_schema", "test_faketensor"))
    from fastcodec.ops import rvq as R
    for got, want in zip(torch.ops.fastcodec.rvq_quantize_train(x, cb, cn), R._quantize_train_ref(x, cb, cn)):
        assert torch.equal(got, want)


def test_nan_input_is_caught_asynchronously_and_never_reaches_the_codebooks():
    fast, _ = _pair()
    fast(torch.randn(B, D, T, device=DEV), 75)
    before = _bufs(fast)
    x = torch.randn(B, D, T, device=DEV)
    x[1, 3, 5] = float("nan")
    fast(x, 75)  # no sync, so no error yet
    for k, v in before.items():
        if "inited" not in k:
            assert torch.equal(fast.state_dict()[k], v), f"{k} changed although x held NaN"
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        fastcodec.check_errors()
    fast(torch.randn(B, D, T, device=DEV), 75)  # the word was cleared: good input trains again
    fastcodec.check_errors()
    assert not torch.equal(fast.state_dict()["vq.layers.0._codebook.embed_avg"],
                           before["vq.layers.0._codebook.embed_avg"])


def test_nan_codebook_raises_at_the_next_step_naming_the_layer():
    fast, _ = _pair()
    with torch.no_grad():
        fast.vq.layers[1]._codebook.embed[3, 0] = float("inf")
    fast(torch.randn(B, D, T, device=DEV), 75)
    if DEV == "cuda":
        torch.cuda.synchronize()
    with pytest.raises(ValueError, match=r"vq\.layers\.1\._codebook\.embed holds NaN or Inf"):
        fast(torch.randn(B, D, T, device=DEV), 75)
    _devcheck.check_errors()


@pytest.mark.cuda
@requires_cuda
def test_real_shape_step_is_sync_free_on_cuda():
    """B8 T750 K8 with 1024 bins on the GPU: no synchronising call in steady-state training steps."""
    m = fastcodec.ResidualVectorQuantizer(dimension=128, n_q=8, bins=1024, kmeans_init=False).cuda().train()
    x = torch.randn(8, 128, 750, device="cuda")
    for _ in range(2):
        m(x, 75)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            m(x, 75)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    fastcodec.check_errors()
