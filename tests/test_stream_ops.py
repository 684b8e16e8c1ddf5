"""The SEANet kernels as ``fastcodec::`` ops: ``resblock``, ``conv1d_update``, ``conv_transpose1d_update`` and
``lstm_step`` (schemas, fake kernels and ``torch.library.opcheck``), their numbers against the reference or the
offline op they stream, and the four backend families of ``fastcodec._backend``.

Exactness: each op runs the same kernel arithmetic as the path it replaces, so streamed against offline pieces is
compared bit for bit where the kernel sums in one fixed order (resblock vs three conv1d calls, lstm_step pieces vs
one call); the single-step convs against float64 within the kernels' reduction bound of tests/test_streaming.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastcodec import _backend
from fastcodec.ops import conv as C
from fastcodec.ops import lstm as L
from fastcodec.ops import resblock as R
from fastcodec.ops import stream as S


def _bound(K: int, magnitude: torch.Tensor) -> torch.Tensor:
    # tests/test_streaming.py's worst-case reduction bound of the streaming kernels (measured <= 0.044 of it)
    return (64 + -(-K // 64) + 6) * 2.0 ** -24 * magnitude


@pytest.mark.parametrize("pad_mode,left,right,shortcut", [("reflect", 2, 0, False), ("constant", 1, 1, True)],
                         ids=["causal-reflect-identity", "centred-constant-shortcut"])
def test_resblock_op_is_bitwise_three_conv1d_calls(pad_mode, left, right, shortcut):
    torch.manual_seed(0)
    c, h, T = 8, 4, 37
    x = torch.randn(2, c, T)
    w0, b0, w1, b1 = torch.randn(h, c, 3), torch.randn(h), torch.randn(c, h, 1), torch.randn(c)
    wsc, bsc = (torch.randn(c, c, 1), torch.randn(c)) if shortcut else (None, None)
    args = (x, w0, b0, w1, b1, wsc, bsc, 1, left, right, pad_mode, 1.0, 1.0, 5)
    skip = x if wsc is None else C.conv1d(x, wsc, bsc)
    expected = C.conv1d(C.conv1d(x, w0, b0, None, 1, 1, left, right, pad_mode, 1.0), w1, b1, skip, elu_alpha=1.0)
    with torch.no_grad():
        assert torch.equal(R.resblock(*args, backend="cpp"), expected)
        assert torch.equal(R.resblock_op(*args), expected)
        ref = R.resblock_reference(*args)
    assert (ref - expected).abs().max() <= 1e-5 * expected.abs().max()
    torch.library.opcheck(R.resblock_op, args)
    with pytest.raises(ValueError, match="keep the length"):
        R.resblock_op(x, w0, b0, w1, b1, wsc, bsc, 1, 0, 0, pad_mode, 1.0, 1.0, 0)
    with pytest.raises(ValueError, match="w1 must be a kernel-size-1"):
        R.resblock_op(x, w0, b0, torch.randn(c, h, 3), b1, wsc, bsc, 1, left, right, pad_mode, 1.0, 1.0, 0)


def _conv_update_case(batch=2, c_in=5, c_out=20, k=3, s=2, d=1, n=3, T=7, cap=12):
    torch.manual_seed(1)
    w, b = torch.randn(c_out, c_in, k), torch.randn(c_out)
    held = torch.randn(batch, c_in, n)
    buf = torch.zeros(batch, cap, c_in).transpose(1, 2)
    start = cap - n  # the T new samples do not fit after them: moved to the front first
    buf[:, :, start:].copy_(held)
    x = torch.randn(batch, T, c_in).transpose(1, 2)  # strided, not contiguous
    span = (k - 1) * d + 1
    frames = (n + T - span) // s + 1
    out = torch.empty(batch, frames, c_out).transpose(1, 2)
    return w, b, held, buf, start, x, frames, out


def test_conv1d_update_op():
    k, s, d, n = 3, 2, 1, 3
    w, b, held, buf, start, x, frames, out = _conv_update_case(k=k, s=s, d=d, n=n)
    panels = S.pack_panels(S.pack_conv1d_weight(w).t())
    args = (x, buf.clone(), panels, b, start, n, frames, k, s, d, 1.0, out.clone())
    new_start = S.conv1d_update(*args[:1], args[1], *args[2:])
    assert new_start == 0
    window = torch.cat([held, F.elu(x)], -1).double()
    expected = F.conv1d(window, w.double(), b.double(), s, 0, d)[..., :frames]
    got = args[-1].double()
    bound = _bound(w.shape[1] * k, F.conv1d(window.abs(), w.double().abs(), b.double().abs(), s, 0, d)[..., :frames])
    assert ((got - expected).abs() <= bound).all()
    assert torch.equal(args[1][:, :, :n], held)  # the state holds the window, moved to the front
    # the registered op: same result, fake kernel, schema (mutations of conv_state and out)
    buf2, out2 = buf.clone(), out.clone()
    S.conv1d_update_op(x, buf2, panels, b, start, n, frames, k, s, d, 1.0, out2)
    assert torch.equal(out2, args[-1]) and torch.equal(buf2, args[1])
    torch.library.opcheck(S.conv1d_update_op, (x, buf.clone(), panels, b, start, n, frames, k, s, d, 1.0,
                                               out.clone()))


def test_conv_transpose1d_update_op():
    torch.manual_seed(2)
    c_in, c_out, k, s, T, batch = 7, 3, 5, 2, 3, 2
    w, b = torch.randn(c_in, c_out, k), torch.randn(c_out)
    x = torch.randn(batch, c_in, 2 * T)
    panels = S.pack_panels(S.pack_conv_transpose1d_weight(w))
    pending = torch.zeros(batch, k - s, c_out).transpose(1, 2)
    outs = []
    for part in (x[:, :, :T], x[:, :, T:]):
        out = torch.empty(batch, T * s, c_out).transpose(1, 2)
        S.conv_transpose1d_update(part, panels, b, pending, 0, k, s, 1.0, out)
        outs.append(out)
    got = torch.cat(outs + [pending + b[:, None]], -1).double()
    xe = F.elu(x).double()
    expected = F.conv_transpose1d(xe, w.double(), b.double(), s)
    assert ((got - expected).abs() <= _bound(c_in, F.conv_transpose1d(xe.abs(), w.double().abs(),
                                                                      b.double().abs(), s))).all()
    out = torch.empty(batch, T * s, c_out).transpose(1, 2)
    torch.library.opcheck(S.conv_transpose1d_update_op, (x[:, :, :T], panels, b, pending.clone(), 0, k, s, 1.0, out))


def test_lstm_step_op_pieces_equal_one_call():
    """A stream's chunks through lstm_step (state carried in place) against fastcodec::lstm on the whole
    sequence: bitwise for the C++ kernel (one summation order); the ATen step within float32 rounding."""
    torch.manual_seed(3)
    lstm = torch.nn.LSTM(6, 8, 2)
    handle = L.PackedLSTMWeights(lstm)
    x = torch.randn(9, 2, 6)
    with torch.no_grad():
        whole = L.lstm_op(x, handle.flat(), 2)
        for fused in (True, False):
            h, c = torch.zeros(2, 2, 8), torch.zeros(2, 2, 8)
            parts = []
            for a, e in ((0, 4), (4, 5), (5, 9)):
                out = torch.empty(e - a, 2, 8) if fused else None
                parts.append(L.lstm_step(x[a:e], handle, h, c, out, fused).clone())
            y = torch.cat(parts)
            if fused:
                assert torch.equal(y, whole)
            else:
                assert (y - whole).abs().max() <= 1e-5
        h, c, out = torch.zeros(2, 2, 8), torch.zeros(2, 2, 8), torch.empty(9, 2, 8)
        L.lstm_step_op(x, handle.flat(), 2, h, c, out)
        assert torch.equal(out, whole)
    torch.library.opcheck(L.lstm_step_op, (x, handle.flat(), 2, torch.zeros(2, 2, 8), torch.zeros(2, 2, 8),
                                           torch.empty(9, 2, 8)))


def test_unsupported_lstm_is_named_once():
    reason = L.unsupported_reason(torch.nn.LSTM(4, 4, bidirectional=True))
    assert reason and "unidirectional" in reason
    assert L.unsupported_reason(torch.nn.LSTM(4, 4)) is None
    with pytest.raises(ValueError, match="unidirectional"):
        L.PackedLSTMWeights(torch.nn.LSTM(4, 4, batch_first=True))


def test_families_follow_the_conv_variable(monkeypatch):
    for k in list(__import__("os").environ):
        if k.startswith("FASTCODEC_") and k.endswith("BACKEND"):
            monkeypatch.delenv(k)
    assert set(_backend.FAMILIES) == {"rvq", "conv", "lstm", "streaming"}
    monkeypatch.setenv("FASTCODEC_CONV_BACKEND", "reference")
    assert [_backend.requested(f) for f in ("conv", "lstm", "streaming", "rvq")] == ["reference"] * 3 + ["auto"]
    assert _backend.deciding_var("lstm") == "FASTCODEC_CONV_BACKEND"
    monkeypatch.setenv("FASTCODEC_LSTM_BACKEND", "cpp")
    assert _backend.requested("lstm") == "cpp" and _backend.deciding_var("lstm") == "FASTCODEC_LSTM_BACKEND"
    assert _backend.requested("streaming") == "reference"
    monkeypatch.setenv("FASTCODEC_STREAMING_BACKEND", "triton")
    with pytest.raises(_backend.BackendUnavailableError, match="FASTCODEC_STREAMING_BACKEND=triton.*no 'triton'"):
        _backend.choose("streaming", "cpu")
