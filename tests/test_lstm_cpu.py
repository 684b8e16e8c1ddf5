"""The fused CPU LSTM (csrc/lstm_cpu.cpp, fastcodec/ops/lstm.py) against torch.nn.LSTM and float64.

Accuracy: the kernel's error against a float64 LSTM, max |a - ref| / (1 + |ref|) over y and the final h and c,
must stay within 2x ATen's own float32 error on the same problem, or 2 eps when ATen happens to be under one
eps (at a few dozen terms per gate both sit at the rounding floor, where the ratio is noise). Measured over
46 shapes (I, H = 40, 48 and 512, 512; T 1..750; B 1, 3, 8; seed 0): kernel 0.9e-7..2.6e-7, ATen (MKL path)
0.5e-7..4.7e-7, worst ratio 2.4 at I=40 H=48 T=2 B=1 (1.3e-7 vs 5.3e-8), at most 1.2 at H = 512 (the
kernel sums each gate in blocks of 64 terms). Exactness: bitwise the same for 1 and 2 threads, run to run,
per batch row whatever the batch, and for a sequence split into pieces with the state carried.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from fastcodec.ops import lstm as L

# kernel error <= ERR_FACTOR * max(ATen's error, EPS32): see the module docstring for the measurements
ERR_FACTOR = 2.0
EPS32 = 2.0 ** -23
U = 2.0 ** -24
# gradients through the kernel's forward (ATen's backward on the kernel's y) vs ATen's own, both against
# float64: the forward's rounding differences propagate through the backward; measured ratio 1.0-1.5
# over 4 seeds (AMD EPYC Zen 2)
GRAD_FACTOR = 4.0


@pytest.fixture(scope="module")
def ext():
    return L.extension()


@pytest.fixture
def threads():
    """Restores torch's thread count after a test changes it."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _problem(I, H, layers, T, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    lstm = torch.nn.LSTM(I, H, layers)
    with torch.no_grad():  # nn.LSTM's init (uniform +-1/sqrt(H)) from our generator, for reproducibility
        for w in lstm.parameters():
            w.uniform_(-H ** -0.5, H ** -0.5, generator=g)
    x = torch.randn(T, B, I, generator=g)
    h0 = 0.5 * torch.randn(layers, B, H, generator=g)
    c0 = torch.randn(layers, B, H, generator=g)
    return lstm, x, h0, c0


@contextlib.contextmanager
def _aten_native_lstm():
    """ATen's own LSTM loop (MKL GEMMs) rather than oneDNN's RNN, which JIT-compiles for ~2.5 s per new shape."""
    was = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(was)


@pytest.fixture
def aten_native():
    with _aten_native_lstm():
        yield


def _lstm64(lstm):
    l64 = torch.nn.LSTM(lstm.input_size, lstm.hidden_size, lstm.num_layers).double()
    l64.load_state_dict(lstm.state_dict())
    return l64


def _check_against_float64(I, H, layers, T, B):
    _assert_matches_float64(*_problem(I, H, layers, T, B))


def _assert_matches_float64(lstm, x, h0, c0):
    """The kernel's y and final h, c against a float64 LSTM, within ERR_FACTOR x ATen's float32 error."""
    layers, T, B, H = lstm.num_layers, x.shape[0], x.shape[1], lstm.hidden_size
    with torch.no_grad():
        with _aten_native_lstm():
            ya, (ha, ca) = lstm(x, (h0, c0))
        y6, (h6, c6) = _lstm64(lstm)(x.double(), (h0.double(), c0.double()))
        h, c = h0.clone(), c0.clone()
        y = L.lstm_cpu(x, lstm._flat_weights, layers, h, c)

    def err(outs, refs):
        return max(((a.double() - r).abs() / (1 + r.abs())).max().item() for a, r in zip(outs, refs))

    e_aten = err((ya, ha, ca), (y6, h6, c6))
    e_fast = err((y, h, c), (y6, h6, c6))
    assert y.shape == (T, B, H) and y.is_contiguous()
    assert e_fast <= ERR_FACTOR * max(e_aten, EPS32), f"kernel error {e_fast:.3e}, ATen's {e_aten:.3e}"
    assert torch.equal(h[-1], y[-1])  # the final h of the last layer is the last output


@pytest.mark.parametrize("layers", [1, 2], ids=lambda v: f"L{v}")
@pytest.mark.parametrize("B", [1, 3, 8], ids=lambda v: f"B{v}")
@pytest.mark.parametrize("T", [1, 2, 37, 750], ids=lambda v: f"T{v}")
def test_matches_nn_lstm_input_ne_hidden(T, B, layers):
    # I != H and H = 48 = 3 blocks of 16 (one thread gets 1 block, the other 2); the odd H is covered below
    _check_against_float64(40, 48, layers, T, B)


@pytest.mark.parametrize("I,H", [(5, 20), (17, 1)], ids=["I5-H20", "I17-H1"])
def test_matches_nn_lstm_partial_block(I, H):
    # H not a multiple of 16: the last block's padding lanes must neither leak nor be written
    _check_against_float64(I, H, 2, 9, 3)


@pytest.mark.parametrize("T,B", [(1, 1), (37, 8), pytest.param(750, 1, marks=pytest.mark.slow)],
                         ids=["T1-B1", "T37-B8", "T750-B1"])
def test_matches_nn_lstm_seanet_shape(T, B):
    _check_against_float64(512, 512, 2, T, B)


def test_pointwise_accuracy(ext):
    x = torch.cat([torch.linspace(-30, 30, 600_001), torch.linspace(-1, 1, 200_001), torch.linspace(-110, -30, 8_001),
                   torch.logspace(-30, 1.5, 20_001), -torch.logspace(-30, 1.5, 20_001)])
    s, t = ext.pointwise(x)
    sr, tr = torch.sigmoid(x.double()), torch.tanh(x.double())

    def ulps(got, ref):
        r = ref.float().abs()
        ulp = (torch.nextafter(r, torch.tensor(float("inf"))) - r).double()
        return (got.double() - ref).abs() / ulp

    normal = sr >= 2.0 ** -126
    # measured max 2.46 ulp (x = -16.6: 1 + exp(-x) rounds, then the division); ATen's sigmoid: the same 2.46
    assert ulps(s, sr)[normal].max().item() <= 3.0
    # below 2^-126 exp(-x) overflows and sigmoid is 0, like ATen: error at most the smallest normal
    assert (s.double() - sr)[~normal].abs().max().item() <= 2.0 ** -126
    # measured max 1.30 ulp (x = -0.634, just past the polynomial's range)
    assert ulps(t, tr).max().item() <= 2.0
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 100.0, -100.0])
    s, t = ext.pointwise(special)
    assert torch.equal(torch.isnan(s), torch.isnan(special)) and torch.equal(torch.isnan(t), torch.isnan(special))
    assert s[1:].tolist() == [1.0, 0.0, 0.5, 0.5, 1.0, 0.0]
    assert t[1:].tolist() == [1.0, -1.0, 0.0, 0.0, 1.0, -1.0]
    assert torch.signbit(t[4])


@pytest.mark.parametrize("I,H,T,B", [(512, 512, 37, 3), (40, 48, 20, 8)], ids=["I512-H512-T37-B3", "I40-H48-T20-B8"])
def test_bitwise_across_threads_and_runs(I, H, T, B, threads):
    lstm, x, h0, c0 = _problem(I, H, 2, T, B)

    def run():
        h, c = h0.clone(), c0.clone()
        with torch.no_grad():
            return L.lstm_cpu(x, lstm._flat_weights, 2, h, c), h, c

    torch.set_num_threads(2)
    first, again = run(), run()
    torch.set_num_threads(1)
    single = run()
    for a, b, s in zip(first, again, single):
        assert torch.equal(a, b) and torch.equal(a, s)


def test_batch_rows_are_independent():
    # rows are grouped 4 + 4 at B=8 and run alone at B=1: each lane's sum order is the same either way
    lstm, x, h0, c0 = _problem(40, 48, 2, 12, 8)
    with torch.no_grad():
        y = L.lstm_cpu(x, lstm._flat_weights, 2, h0.clone(), c0.clone())
        for b in (0, 5, 7):
            yb = L.lstm_cpu(x[:, b:b + 1], lstm._flat_weights, 2, h0[:, b:b + 1].clone(), c0[:, b:b + 1].clone())
            assert torch.equal(yb[:, 0], y[:, b])


@pytest.mark.slow
def test_split_sequence_is_bitwise_one_call():
    lstm, x, h0, c0 = _problem(512, 512, 2, 750, 1)
    with torch.no_grad():
        h1, c1 = h0.clone(), c0.clone()
        y1 = L.lstm_cpu(x, lstm._flat_weights, 2, h1, c1)
        h2, c2 = h0.clone(), c0.clone()
        ys, t = [], 0
        for n in (1, 1, 300, 448):
            ys.append(L.lstm_cpu(x[t:t + n], lstm._flat_weights, 2, h2, c2))
            t += n
    assert torch.equal(torch.cat(ys), y1)
    assert torch.equal(h2, h1) and torch.equal(c2, c1)


def test_streaming_call_with_transposed_state_and_out(ext):
    # the streaming path: state kept as (B, L, H), x a (B, C, 1) chunk, packed weights cached, y into out
    lstm, x, h0, c0 = _problem(40, 48, 2, 6, 3)
    with torch.no_grad():
        y_ref = L.lstm_cpu(x, lstm._flat_weights, 2, h0.clone(), c0.clone())
    packer = L.PackedLSTMWeights(lstm)
    hs, cs = h0.transpose(0, 1).contiguous(), c0.transpose(0, 1).contiguous()  # (B, L, H)
    chunk = x.permute(1, 2, 0).contiguous()  # (B, C, T) as the streaming code holds it
    out = torch.empty(1, 3, 48)
    for t in range(6):
        xt = chunk[:, :, t:t + 1].contiguous().permute(2, 0, 1)  # (B, C, 1) -> (1, B, C), a view
        y = L.forward_packed(xt, packer.get(), hs.transpose(0, 1), cs.transpose(0, 1), out)
        assert y.data_ptr() == out.data_ptr()
        assert torch.equal(y[0], y_ref[t])
    assert packer.get() is packer.get()


def test_x_strided_along_time_and_batch():
    lstm, x, h0, c0 = _problem(40, 48, 1, 7, 3)
    big = torch.randn(7, 5, 2, 40)
    big[:, ::2, 1] = x[:, :3]
    xs = big[:, ::2, 1]
    assert xs.stride(2) == 1 and not xs.is_contiguous()
    with torch.no_grad():
        assert torch.equal(L.lstm_cpu(xs, lstm._flat_weights, 1, h0.clone(), c0.clone()),
                           L.lstm_cpu(x, lstm._flat_weights, 1, h0.clone(), c0.clone()))


def test_nan_propagates_like_aten():
    lstm, x, h0, c0 = _problem(40, 48, 2, 10, 3)
    x[4, 1, 7] = float("nan")
    with torch.no_grad(), _aten_native_lstm():
        ya, _ = lstm(x, (h0, c0))
        y = L.lstm_cpu(x, lstm._flat_weights, 2, h0.clone(), c0.clone())
    assert torch.equal(torch.isnan(y), torch.isnan(ya))
    assert torch.isnan(y[4:, 1]).all() and not torch.isnan(y[:, [0, 2]]).any()


def test_weights_packed_once_per_change():
    lstm, x, h0, c0 = _problem(40, 48, 2, 5, 2)
    ws = lstm._flat_weights
    p = L.pack(ws, 2)
    assert L.pack(ws, 2) is p
    packer = L.PackedLSTMWeights(lstm)
    q = packer.get()
    with torch.no_grad():
        lstm.weight_hh_l1.mul_(0.5)  # bumps _version: both caches repack
        assert L.pack(ws, 2) is not p and packer.get() is not q
    _assert_matches_float64(lstm, x, h0, c0)  # computed with the new weights, not the stale pack


def test_fastcodec_lstm_op_runs_the_kernel(monkeypatch, aten_native):
    for var in ("FASTCODEC_BACKEND", "FASTCODEC_CONV_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    lstm, x, _, _ = _problem(40, 48, 2, 9, 2)
    ws = [getattr(lstm, n) for n in lstm._flat_weights_names]
    with torch.no_grad():
        assert torch.equal(L.lstm_op(x, ws, 2), L.lstm_cpu(x, ws, 2))
        monkeypatch.setenv("FASTCODEC_BACKEND", "reference")
        assert torch.equal(L.lstm_op(x, ws, 2), L._lstm_impl(x, ws, 2))
    monkeypatch.delenv("FASTCODEC_BACKEND")
    # training: the forward runs the kernel, the backward recomputes with ATen
    xg = x.clone().requires_grad_()
    L.lstm_op(xg, ws, 2).square().sum().backward()
    g_op = [w.grad.clone() for w in ws]
    lstm.zero_grad()
    xr = x.clone().requires_grad_()
    lstm(xr)[0].square().sum().backward()
    l64, x64 = _lstm64(lstm), x.double().requires_grad_()
    l64(x64)[0].square().sum().backward()
    # the backward is ATen's in both; only the forward's rounding differs, so each gradient's error vs
    # float64 stays within GRAD_FACTOR x ATen float32's own (or u x the gradient's largest value)
    for name, a, r, r64 in [("x", xg.grad, xr.grad, x64.grad)] + [
            (n, a, w.grad, w64.grad) for n, a, w, w64 in zip(lstm._flat_weights_names, g_op, ws, l64._flat_weights)]:
        e_op, e_aten = (a.double() - r64).abs().max().item(), (r.double() - r64).abs().max().item()
        scale = r64.abs().max().item()
        assert e_op <= GRAD_FACTOR * max(e_aten, U * scale), \
            f"grad {name}: error vs float64 {e_op:.3e}, ATen float32's {e_aten:.3e} (u x {scale:.3g})"
    torch.library.opcheck(L.lstm_op, (x, ws, 2))
    torch.library.opcheck(L.lstm_op, (x.clone().requires_grad_(), ws, 2))


def test_unbuildable_kernel_falls_back_or_raises(monkeypatch):
    from fastcodec import _backend

    lstm, x, _, _ = _problem(40, 48, 1, 3, 2)
    ws = list(lstm._flat_weights)
    monkeypatch.setitem(_backend._probes, ("lstm", "cpp"),
                        lambda: _backend.Availability(False, "compiler missing (test)"))
    monkeypatch.setattr(_backend, "_probe_cache", {})
    monkeypatch.setattr(_backend, "_warned", set())
    for var in ("FASTCODEC_BACKEND", "FASTCODEC_CONV_BACKEND", "FASTCODEC_LSTM_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="compiler missing"):
            y = L.lstm_op(x, ws, 1)
        assert torch.equal(y, L._lstm_impl(x, ws, 1))
        monkeypatch.setenv("FASTCODEC_BACKEND", "cpp")
        with pytest.raises(_backend.BackendUnavailableError, match="compiler missing"):
            L.lstm_op(x, ws, 1)


def test_bad_input():
    lstm, x, h0, c0 = _problem(40, 48, 2, 5, 3)
    ws = lstm._flat_weights
    with torch.no_grad():
        with pytest.raises(TypeError, match="float32"):
            L.lstm_cpu(x.double(), ws, 2)
        with pytest.raises(ValueError, match="CPU"):
            L.lstm_cpu(x.to("meta"), ws, 2)
        with pytest.raises(ValueError, match="input_size 39"):
            L.lstm_cpu(x[..., :39], ws, 2)
        with pytest.raises(ValueError, match="empty"):
            L.lstm_cpu(x[:0], ws, 2)
        with pytest.raises(ValueError, match=r"\(time, batch, input_size\)"):
            L.lstm_cpu(x[0], ws, 2)
        with pytest.raises(ValueError, match="4 \\* num_layers = 12"):
            L.lstm_cpu(x, ws, 3)
        with pytest.raises(ValueError, match="num_layers must be >= 1"):
            L.lstm_cpu(x, [], 0)
        with pytest.raises(ValueError, match="w_hh_l1"):
            L.lstm_cpu(x, ws[:5] + [ws[5][:, :40]] + ws[6:], 2)
        with pytest.raises(ValueError, match="b_ih_l0"):
            L.lstm_cpu(x, ws[:2] + [ws[2][:10]] + ws[3:], 2)
        with pytest.raises(ValueError, match="h must be"):
            L.lstm_cpu(x, ws, 2, h0[:, :2])
        with pytest.raises(ValueError, match="unit stride"):
            L.lstm_cpu(x, ws, 2, h0.transpose(1, 2).contiguous().transpose(1, 2), c0)
        with pytest.raises(ValueError, match="out must be"):
            L.lstm_cpu(x, ws, 2, out=torch.empty(5, 3, 47))
    with pytest.raises(ValueError, match="no autograd"):
        L.lstm_cpu(x, ws, 2)


def test_bad_input_direct_to_the_extension(ext):
    # called without the Python checks, the C++ still refuses instead of reading or writing out of bounds
    lstm, x, h0, c0 = _problem(40, 48, 2, 5, 3)
    packed = L.pack(lstm._flat_weights, 2)
    h, c = h0.clone(), c0.clone()
    with pytest.raises(TypeError, match="float32"):
        ext.forward(x.double(), packed, h, c)
    with pytest.raises(ValueError, match="packed w_ih"):
        ext.forward(x[..., :39], packed, h, c)
    with pytest.raises(ValueError, match="3 tensors per layer"):
        ext.forward(x, packed[:4], h, c)
    with pytest.raises(ValueError, match="packed w_hh"):
        ext.forward(x, packed[:1] + [packed[1][:, :40].contiguous()] + packed[2:], h, c)
    with pytest.raises(ValueError, match="h must be"):
        ext.forward(x, packed, h[:1], c)
    with pytest.raises(ValueError, match="c must have hidden size"):
        ext.forward(x, packed, h, c[..., :40])
    with pytest.raises(ValueError, match="share memory"):
        ext.forward(x, packed, h, h)
    with pytest.raises(ValueError, match="expanded"):
        ext.forward(x, packed, h[:, :1].expand(2, 3, 48), c)
    x48 = torch.randn(5, 3, 48)
    with pytest.raises(ValueError, match="out and x share memory"):
        ext.forward(x48, L.pack(torch.nn.LSTM(48, 48, 2)._flat_weights, 2), h, c, x48)
    with pytest.raises(ValueError, match="non-empty"):
        ext.forward(x[:0], packed, h, c)
    with pytest.raises(ValueError, match="hidden"):
        ext.pack(lstm._flat_weights[:1] + [lstm._flat_weights[1][:, :40]] + lstm._flat_weights[2:], 2)
    assert torch.equal(h, h0) and torch.equal(c, c0)  # no failed call wrote the state


@pytest.mark.slow
def test_portable_build_matches_avx512(ext):
    from fastcodec._build import load_extension

    port = load_extension("lstm_cpu_portable", ["lstm_cpu.cpp"], ["-mno-avx2"])  # -mno-avx2 drops AVX-512 too
    assert port.simd() == "portable"
    lstm, x, h0, c0 = _problem(40, 50, 2, 9, 7)
    outs = []
    for e in (ext, port):
        h, c = h0.clone(), c0.clone()
        outs.append((e.forward(x, e.pack(lstm._flat_weights, 2), h, c, None), h, c))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    v = torch.cat([torch.linspace(-110, 110, 10_001), torch.tensor([float("nan"), float("inf"), -float("inf")])])
    for a, b in zip(ext.pointwise(v), port.pointwise(v)):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) and torch.equal(a.isnan(), b.isnan())
