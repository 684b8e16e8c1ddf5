"""``fastcodec.SEANetEncoder`` / ``SEANetDecoder`` (fused conv ops) against the reference.

Tolerance, per case: the fast float32 output may be at most ``FACTOR`` times as far from the float64
reference as PyTorch's own float32 output is (plus 1e-7 of slack for outputs PyTorch gets exact).
Measured: fast/PyTorch error ratio 0.6-1.5 on the 24 kHz, 48 kHz and MusicGen configs.
"""
from __future__ import annotations

import pytest
import torch

import fastcodec
from fastcodec.reference.seanet import SEANetDecoder as RefDecoder
from fastcodec.reference.seanet import SEANetEncoder as RefEncoder

FACTOR = 4.0

CONFIGS = {
    "encodec24k": dict(channels=1, dimension=128, n_filters=32, n_residual_layers=1, ratios=[8, 5, 4, 2],
                       norm="weight_norm", causal=True, pad_mode="reflect", true_skip=False, compress=2, lstm=2),
    "musicgen32k": dict(channels=1, dimension=128, n_filters=64, n_residual_layers=1, ratios=[8, 5, 4, 4],
                        norm="weight_norm", causal=False, pad_mode="constant", true_skip=True, compress=2, lstm=2),
    "encodec48k": dict(channels=2, dimension=128, n_filters=32, n_residual_layers=1, ratios=[8, 5, 4, 2],
                       norm="time_group_norm", causal=False, pad_mode="reflect", true_skip=False, compress=2, lstm=2),
    "sweep-dil3-res2-nolstm": dict(channels=1, dimension=16, n_filters=4, n_residual_layers=2, ratios=[3, 2],
                                   dilation_base=3, norm="none", causal=True, pad_mode="constant", lstm=0,
                                   kernel_size=5, last_kernel_size=3, residual_kernel_size=5),
    "sweep-leaky-tanh-compress4": dict(channels=1, dimension=8, n_filters=8, n_residual_layers=1, ratios=[4],
                                       activation="LeakyReLU", activation_params={"negative_slope": 0.2},
                                       compress=4, causal=False, pad_mode="reflect", lstm=1,
                                       disable_norm_outer_blocks=1, norm="weight_norm"),
}


def _pair(cls_ref, cls_fast, cfg, **extra):
    torch.manual_seed(0)
    ref = cls_ref(**cfg, **extra)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fast = cls_fast(**cfg, **extra)
    fast.load_state_dict(ref.state_dict(), strict=True)
    ref64 = cls_ref(**cfg, **extra).double()
    ref64.load_state_dict(ref.state_dict())
    return ref, fast, ref64


def _check(ref, fast, ref64, x):
    with torch.no_grad():
        expected64 = ref64(x.double())
        e_torch = (ref(x).double() - expected64).abs().max().item()
        y = fast(x)
        e_fast = (y.double() - expected64).abs().max().item()
    assert y.shape == expected64.shape
    assert e_fast <= FACTOR * e_torch + 1e-7, f"fast error {e_fast:.3e} vs PyTorch float32's {e_torch:.3e}"
    return y


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("length", [1, 17, 4001])
def test_encoder_matches_reference(name, length):
    cfg = CONFIGS[name]
    ref, fast, ref64 = _pair(RefEncoder, fastcodec.SEANetEncoder, cfg)
    x = torch.randn(2, cfg["channels"], length)
    _check(ref, fast, ref64, x)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("frames", [1, 2, 13])
def test_decoder_matches_reference(name, frames):
    cfg = CONFIGS[name]
    extra = {"trim_right_ratio": 0.5} if cfg.get("causal") and name.startswith("sweep") else {}
    ref, fast, ref64 = _pair(RefDecoder, fastcodec.SEANetDecoder, cfg, **extra)
    z = torch.randn(2, cfg["dimension"], frames)
    _check(ref, fast, ref64, z)


@pytest.mark.parametrize("which", ["encoder", "decoder"])
def test_gradients_match_reference(which):
    cfg = CONFIGS["encodec24k"]
    cls_ref, cls_fast = (RefEncoder, fastcodec.SEANetEncoder) if which == "encoder" else (RefDecoder, fastcodec.SEANetDecoder)
    ref, fast, _ = _pair(cls_ref, cls_fast, cfg)
    x = torch.randn(1, 1, 3000) if which == "encoder" else torch.randn(1, 128, 9)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(xr).square().mean().backward()
    fast(xf).square().mean().backward()
    # the backward runs in ATen for both, on float32 forwards that differ by ~1e-7: measured max abs
    # input-grad error 2e-13 on values up to 2e-7 (encoder), weight grads within 1e-6 relative
    scale = xr.grad.abs().max().item()
    assert (xf.grad - xr.grad).abs().max().item() <= 1e-4 * scale
    for (n, pr), pf in zip(ref.named_parameters(), fast.parameters()):
        s = pr.grad.abs().max().item() + 1e-12
        assert (pf.grad - pr.grad).abs().max().item() <= 1e-3 * s, n


def test_torch_compile_fullgraph():
    cfg = CONFIGS["encodec24k"]
    _, fast, _ = _pair(RefEncoder, fastcodec.SEANetEncoder, cfg)
    x = torch.randn(1, 1, 2000)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.allclose(compiled(x), fast(x), atol=1e-6)


def test_forced_reference_backend(monkeypatch):
    monkeypatch.setenv("FASTCODEC_CONV_BACKEND", "reference")
    cfg = CONFIGS["encodec24k"]
    ref, fast, _ = _pair(RefEncoder, fastcodec.SEANetEncoder, cfg)
    monkeypatch.setattr(fastcodec.seanet.conv_ops, "conv1d", lambda *a, **k: pytest.fail("fast op used"))
    x = torch.randn(1, 1, 500)
    with torch.no_grad():
        assert torch.equal(fast(x), ref(x))


@pytest.mark.parametrize("bad, err, match", [
    (torch.randn(1, 2, 100), ValueError, "1 channels"),
    (torch.randn(1, 100), ValueError, "rank 2"),
    (torch.randn(1, 1, 0), ValueError, "empty"),
    (torch.ones(1, 1, 100, dtype=torch.long), TypeError, "floating"),
])
def test_bad_input(bad, err, match):
    enc = fastcodec.SEANetEncoder(**CONFIGS["encodec24k"])
    with pytest.raises(err, match=match):
        enc(bad)


@pytest.mark.parametrize("name", ["encodec24k", "musicgen32k", "sweep-dil3-res2-nolstm"])
@pytest.mark.parametrize("which", ["encoder", "decoder"])
def test_tiled_residual_blocks_are_bitwise_the_untiled_ones(monkeypatch, name, which):
    # inference on long signals runs residual blocks tile by tile (halo from the neighbours, padding only at
    # the signal's ends): every output sample comes from the same kernel arithmetic, so bitwise equal.
    # Small tiles here (the real one is 8192 samples) so short inputs cross many tile edges.
    from fastcodec import seanet as S

    cls = fastcodec.SEANetEncoder if which == "encoder" else fastcodec.SEANetDecoder
    torch.manual_seed(0)
    m = cls(**CONFIGS[name]).eval()
    x = torch.randn(2, CONFIGS[name]["channels"], 3001) if which == "encoder" else \
        torch.randn(2, CONFIGS[name]["dimension"], 41)
    tiled = []
    real = S._ResStep._tiled
    monkeypatch.setattr(S._ResStep, "_tiled", lambda self, h: tiled.append(h.shape[-1]) or real(self, h))
    monkeypatch.setattr(S, "_RES_TILE", 37)
    with torch.no_grad():
        y = m(x)
    assert tiled, "no residual block was tiled"
    monkeypatch.setattr(S, "_RES_TILE", 10 ** 9)
    with torch.no_grad():
        y_ref = m(x)
    assert torch.equal(y, y_ref)
    with torch.enable_grad():  # training keeps the autograd path
        monkeypatch.setattr(S, "_RES_TILE", 37)
        tiled.clear()
        m(x)
        assert not tiled
