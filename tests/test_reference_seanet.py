"""The reference SEANet (conv wrappers, LSTM, encoder, decoder) against audiocraft 1.3.0 and encodec 0.1.1.

Both sides get the same randomised weights (weight_norm's g = ||v|| at init would hide a wrong norm, so
g and v are perturbed independently) and must give bitwise equal outputs, input gradients and weight
gradients: the reference runs the same ATen ops in the same order. Measured max abs error: 0.0 everywhere.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from fastcodec.reference.conv import (
    StreamableConv1d, StreamableConvTranspose1d, WeightNormConv1d, WeightNormConvTranspose1d,
    get_extra_padding_for_conv1d, pad1d, unpad1d,
)
from fastcodec.reference.lstm import StreamableLSTM
from fastcodec.reference.seanet import SEANetDecoder, SEANetEncoder, SEANetResnetBlock
from tests.utils import max_abs_err

pytestmark = [
    # audiocraft/encodec build their weight_norm with the deprecated torch.nn.utils.weight_norm.
    pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning"),
    # Both sides run under the same setting, so equality does not depend on it; two OpenMP threads on these
    # small convs burnt 49 s of CPU for the file against 12 s with one.
    pytest.mark.usefixtures("one_torch_thread"),
]

# The published configurations. encodec 0.1.1 `EncodecModel._get_model`: SEANetEncoder(channels, norm,
# causal) with encodec's defaults (n_residual_layers 1, true_skip False, lstm 2, pad_mode reflect).
# MusicGen 32 kHz: audiocraft's config/model/encodec/default.yaml + encodec_large_nq4_s640.yaml
# (these yaml files are not shipped in the wheel; read from the audiocraft repository).
ENCODEC_24K = dict(channels=1, dimension=128, n_filters=32, n_residual_layers=1, ratios=[8, 5, 4, 2],
                   norm="weight_norm", causal=True, pad_mode="reflect", true_skip=False, lstm=2)
MUSICGEN_32K = dict(channels=1, dimension=128, n_filters=64, n_residual_layers=1, ratios=[8, 5, 4, 4],
                    norm="weight_norm", causal=False, pad_mode="constant", true_skip=True, compress=2, lstm=2)
ENCODEC_48K = dict(channels=2, dimension=128, n_filters=32, n_residual_layers=1, ratios=[8, 5, 4, 2],
                   norm="time_group_norm", causal=False, pad_mode="reflect", true_skip=False, lstm=2)
REAL = {"encodec24k": (ENCODEC_24K, 24_000), "musicgen32k": (MUSICGEN_32K, 32_000),
        "encodec48k": (ENCODEC_48K, 48_000)}

# Small models over the other arguments: (encoder+decoder kwargs, decoder-only kwargs).
SMALL = dict(channels=1, dimension=8, n_filters=4, n_residual_layers=1, ratios=[2, 3])
SWEEP = {
    "none-centred-reflect": (dict(), dict()),
    "wn-causal-reflect": (dict(norm="weight_norm", causal=True), dict()),
    "wn-causal-constant": (dict(norm="weight_norm", causal=True, pad_mode="constant"), dict()),
    "tgn-centred-constant-eps": (dict(norm="time_group_norm", pad_mode="constant",
                                      norm_params={"eps": 1e-3}), dict()),
    "tgn-stereo-shortcut": (dict(norm="time_group_norm", channels=2, true_skip=False), dict()),
    "wn-shortcut-compress1": (dict(norm="weight_norm", true_skip=False, compress=1), dict()),
    "lstm1-causal": (dict(lstm=1, causal=True), dict()),
    "lstm2-res2-dil3": (dict(norm="weight_norm", lstm=2, n_residual_layers=2, dilation_base=3), dict()),
    "kernels-5-3-5-odd-ratios": (dict(kernel_size=5, last_kernel_size=3, residual_kernel_size=5,
                                      ratios=[3, 5]), dict()),
    "odd-ratios-causal-replicate": (dict(ratios=[5, 3], causal=True, pad_mode="replicate"), dict()),
    "disable-outer-1": (dict(norm="weight_norm", disable_norm_outer_blocks=1), dict()),
    "disable-outer-2-tgn": (dict(norm="time_group_norm", disable_norm_outer_blocks=2), dict()),
    "disable-outer-all": (dict(norm="weight_norm", disable_norm_outer_blocks=4), dict()),
    "leakyrelu": (dict(activation="LeakyReLU", activation_params={"negative_slope": 0.3}), dict()),
    "elu-alpha-final-tanh": (dict(activation_params={"alpha": 0.5}), dict(final_activation="Tanh")),
    "final-elu-params": (dict(), dict(final_activation="ELU", final_activation_params={"alpha": 0.3})),
    "trim-0.5-causal": (dict(causal=True, norm="weight_norm"), dict(trim_right_ratio=0.5)),
    "trim-0-causal-odd": (dict(causal=True, ratios=[3, 2]), dict(trim_right_ratio=0.0)),
    "compress4-res3": (dict(n_filters=8, compress=4, n_residual_layers=3, true_skip=False), dict()),
}
# Audio lengths shorter than the first conv's pad of 6 (1, 5), not multiples of the hop (17, 61), a multiple (60).
SWEEP_LENGTHS = [1, 5, 17, 60, 61]
SWEEP_FRAMES = [1, 2, 5, 11]


def _randomize(model: nn.Module, seed: int) -> None:
    # Independent noise on every parameter (weight_g included, so g != ||v||) and biases away from 0.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g)).add_(0.05 * torch.randn(p.shape, generator=g))


def _assert_equal(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.equal(actual, expected), f"{name}: not bitwise equal, max abs err {max_abs_err(actual, expected):.3e}"


def _pair(ours_cls, theirs_cls, seed: int = 1, **kwargs):
    """Build ours and theirs, randomise ours, load it into theirs (strict); keys must be identical."""
    ours = ours_cls(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        theirs = theirs_cls(**kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict()), "state_dict keys (or their order) differ"
    _randomize(ours, seed)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def _forward_backward(model: nn.Module, x: torch.Tensor, cotangent: torch.Tensor | None):
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    y = model(x)
    if cotangent is None:
        cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
    y.backward(cotangent)
    grads = {n: p.grad for n, p in model.named_parameters()}
    return y.detach(), x.grad, grads, cotangent


def _assert_same_run(ours: nn.Module, theirs: nn.Module, x: torch.Tensor, what: str) -> torch.Tensor:
    """Outputs, input gradient and every weight gradient bitwise equal (measured max abs err 0.0)."""
    y, gx, gp, cot = _forward_backward(ours, x, None)
    y_ref, gx_ref, gp_ref, _ = _forward_backward(theirs, x, cot)
    _assert_equal(y, y_ref, f"{what} output")
    _assert_equal(gx, gx_ref, f"{what} input grad")
    assert gp.keys() == gp_ref.keys()
    for name in gp:
        _assert_equal(gp[name], gp_ref[name], f"{what} grad of {name}")
    return y


@pytest.mark.parametrize("config", ["encodec24k", pytest.param("musicgen32k", marks=pytest.mark.slow),
                                    "encodec48k"])
def test_real_config_matches_audiocraft(oracle, config):
    seanet = oracle("audiocraft.modules.seanet")
    kwargs, sr = REAL[config]
    enc, enc_ref = _pair(SEANetEncoder, seanet.SEANetEncoder, seed=1, **kwargs)
    dec, dec_ref = _pair(SEANetDecoder, seanet.SEANetDecoder, seed=2, **kwargs)
    for ours, ref in ((enc, enc_ref), (dec, dec_ref)):
        for attr in ("channels", "dimension", "n_filters", "n_residual_layers", "ratios", "hop_length",
                     "n_blocks", "disable_norm_outer_blocks"):
            assert getattr(ours, attr) == getattr(ref, attr), attr
    length = sr // 5 + 7  # 0.2 s plus 7 samples: not a multiple of the hop
    x = 0.1 * torch.randn(1, kwargs["channels"], length)
    z = _assert_same_run(enc, enc_ref, x, f"{config} encoder")
    frames = math.ceil(length / enc.hop_length)
    assert z.shape == (1, 128, frames)
    y = _assert_same_run(dec, dec_ref, torch.randn(1, 128, frames), f"{config} decoder")
    assert y.shape == (1, kwargs["channels"], frames * dec.hop_length)


@pytest.mark.parametrize("config", ["encodec24k", "encodec48k"])
def test_real_config_matches_encodec(oracle, config):
    # encodec's SConv1d/SLSTM have the same attribute names (conv.conv, convtr.convtr, norm, lstm), so the
    # keys are identical and no map is needed; its extra padding uses the undilated kernel size, which
    # gives the same padding for every SEANet conv (dilated convs have stride 1: extra padding is 0).
    seanet = oracle("encodec.modules.seanet")
    kwargs, sr = REAL[config]
    theirs = {"channels": kwargs["channels"], "norm": kwargs["norm"], "causal": kwargs["causal"]}
    ours_enc = SEANetEncoder(**kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        enc_ref, dec_ref = seanet.SEANetEncoder(**theirs), seanet.SEANetDecoder(**theirs)
    ours_dec = SEANetDecoder(**kwargs)
    for ours, ref, seed in ((ours_enc, enc_ref, 3), (ours_dec, dec_ref, 4)):
        assert list(ours.state_dict()) == list(ref.state_dict())
        _randomize(ours, seed)
        ref.load_state_dict(ours.state_dict(), strict=True)
    length = sr // 5 + 7
    x = 0.1 * torch.randn(1, kwargs["channels"], length)
    _assert_same_run(ours_enc, enc_ref, x, f"{config} encoder vs encodec")
    frames = math.ceil(length / ours_enc.hop_length)
    _assert_same_run(ours_dec, dec_ref, torch.randn(1, 128, frames), f"{config} decoder vs encodec")


@pytest.mark.parametrize("config", list(SWEEP))
def test_sweep_matches_audiocraft(oracle, config):
    seanet = oracle("audiocraft.modules.seanet")
    shared, decoder_only = SWEEP[config]
    enc_kwargs = {**SMALL, **shared}
    dec_kwargs = {**enc_kwargs, **decoder_only}
    enc, enc_ref = _pair(SEANetEncoder, seanet.SEANetEncoder, seed=5, **enc_kwargs)
    dec, dec_ref = _pair(SEANetDecoder, seanet.SEANetDecoder, seed=6, **dec_kwargs)
    channels, dimension = enc_kwargs["channels"], enc_kwargs["dimension"]
    for length in SWEEP_LENGTHS:
        z = _assert_same_run(enc, enc_ref, torch.randn(2, channels, length), f"{config} encoder T={length}")
        assert z.shape == (2, dimension, math.ceil(length / enc.hop_length))
    for frames in SWEEP_FRAMES:
        y = _assert_same_run(dec, dec_ref, torch.randn(2, dimension, frames), f"{config} decoder T'={frames}")
        assert y.shape == (2, channels, frames * dec.hop_length)


def test_float64_matches_audiocraft(oracle):
    seanet = oracle("audiocraft.modules.seanet")
    kwargs = {**SMALL, "norm": "weight_norm", "lstm": 1, "causal": True}
    enc, enc_ref = _pair(SEANetEncoder, seanet.SEANetEncoder, seed=8, **kwargs)
    enc.double(), enc_ref.double()
    _assert_same_run(enc, enc_ref, torch.randn(2, 1, 37, dtype=torch.float64), "float64 encoder")


@pytest.mark.parametrize("norm", ["weight_norm", "time_group_norm"])
def test_audiocraft_state_dict_loads_into_ours(oracle, norm):
    seanet = oracle("audiocraft.modules.seanet")
    kwargs = {**SMALL, "norm": norm, "lstm": 2, "true_skip": False}
    for ours_cls, theirs_cls in ((SEANetEncoder, seanet.SEANetEncoder), (SEANetDecoder, seanet.SEANetDecoder)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            theirs = theirs_cls(**kwargs)
        _randomize(theirs, 9)
        ours = ours_cls(**kwargs)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        x = torch.randn(2, 1 if ours_cls is SEANetEncoder else 8, 23)
        _assert_same_run(ours, theirs, x, f"{ours_cls.__name__} loaded from audiocraft")


def _to_parametrization_layout(state_dict: dict) -> dict:
    out = {}
    for key, value in state_dict.items():
        for old, new in (("weight_g", "parametrizations.weight.original0"),
                         ("weight_v", "parametrizations.weight.original1")):
            if key.endswith("." + old):
                key = key[: -len(old)] + new
        out[key] = value
    return out


def test_parametrization_layout_loads():
    for cls in (SEANetEncoder, SEANetDecoder):
        ours = cls(**SMALL, norm="weight_norm", true_skip=False)
        _randomize(ours, 10)
        sd = _to_parametrization_layout(ours.state_dict())
        assert any(k.endswith("parametrizations.weight.original0") for k in sd)
        assert not any(k.endswith("weight_g") or k.endswith("weight_v") for k in sd)
        fresh = cls(**SMALL, norm="weight_norm", true_skip=False)
        fresh.load_state_dict(sd, strict=True)
        for key, value in ours.state_dict().items():
            _assert_equal(fresh.state_dict()[key], value, f"{cls.__name__} {key}")


@pytest.mark.parametrize("conv_cls, ours_cls", [(nn.Conv1d, WeightNormConv1d),
                                                (nn.ConvTranspose1d, WeightNormConvTranspose1d)])
def test_weight_norm_matches_torch_parametrization(conv_cls, ours_cls):
    theirs = torch.nn.utils.parametrizations.weight_norm(conv_cls(6, 10, 4, stride=2), dim=0)
    _randomize(theirs, 11)
    ours = ours_cls(6, 10, 4, stride=2)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert ours.weight_g.shape == (ours.weight_v.shape[0], 1, 1)
    x = torch.randn(2, 6, 19)
    # Measured 0.0: the parametrization calls the same torch._weight_norm.
    _assert_equal(ours.weight, theirs.weight, "effective weight")
    _assert_equal(ours(x), theirs(x), "output")


def test_weight_norm_init_keeps_the_conv_init():
    conv = WeightNormConv1d(16, 32, 3)
    # g = ||v|| at init, so weight = v up to the roundings of the norm, divide and multiply: measured
    # 1.6e-7 relative (1.3 float32 eps) over 20 seeds; bound 4 eps.
    err = ((conv.weight - conv.weight_v).abs() / conv.weight_v.abs().clamp_min(1e-30)).max().item()
    assert err < 4 * torch.finfo(torch.float32).eps, f"weight differs from weight_v at init by {err:.3e} (relative)"
    assert [n for n, _ in conv.named_parameters()] == ["bias", "weight_g", "weight_v"]


@pytest.mark.parametrize("mode", ["reflect", "constant", "replicate"])
def test_pad_helpers_match_audiocraft(oracle, mode):
    conv = oracle("audiocraft.modules.conv")
    for length in range(1, 10):
        x = torch.randn(2, 3, length)
        for left in range(0, 9):
            for right in range(0, 9):
                _assert_equal(pad1d(x, (left, right), mode), conv.pad1d(x, (left, right), mode),
                              f"pad1d {mode} T={length} pads=({left},{right})")
    for length in range(1, 40):
        x = torch.zeros(1, 1, length)
        for kernel, stride in ((7, 1), (4, 2), (10, 5), (16, 8), (6, 3)):
            pad = kernel - stride
            assert get_extra_padding_for_conv1d(x, kernel, stride, pad) == \
                conv.get_extra_padding_for_conv1d(x, kernel, stride, pad)
    x = torch.randn(1, 2, 10)
    _assert_equal(unpad1d(x, (3, 2)), conv.unpad1d(x, (3, 2)), "unpad1d")


def test_resnet_block_and_lstm_match_audiocraft(oracle):
    seanet, lstm = oracle("audiocraft.modules.seanet"), oracle("audiocraft.modules.lstm")
    block, block_ref = _pair(SEANetResnetBlock, seanet.SEANetResnetBlock, seed=12, dim=8,
                             kernel_sizes=[3, 1], dilations=[3, 1], norm="weight_norm", causal=True,
                             true_skip=False)
    _assert_same_run(block, block_ref, torch.randn(2, 8, 13), "resnet block")
    for skip in (True, False):
        mod, mod_ref = _pair(StreamableLSTM, lstm.StreamableLSTM, seed=13, dimension=8, num_layers=2, skip=skip)
        _assert_same_run(mod, mod_ref, torch.randn(2, 8, 9), f"lstm skip={skip}")


def test_dilated_strided_conv_matches_audiocraft(oracle):
    conv = oracle("audiocraft.modules.conv")
    for causal in (True, False):
        with pytest.warns(UserWarning, match="stride > 1 and dilation > 1"):
            ours = StreamableConv1d(3, 4, 3, stride=2, dilation=2, causal=causal, norm="weight_norm")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = conv.StreamableConv1d(3, 4, 3, stride=2, dilation=2, causal=causal, norm="weight_norm")
        _randomize(ours, 14)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        for length in (1, 4, 9, 10):
            _assert_same_run(ours, theirs, torch.randn(1, 3, length), f"dilated strided causal={causal} T={length}")


@pytest.mark.parametrize("cls", [SEANetEncoder, SEANetDecoder])
def test_bad_input(cls):
    model = cls(**SMALL, norm="weight_norm")
    c = 1 if cls is SEANetEncoder else SMALL["dimension"]
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[0.0] * 10] * c)
    with pytest.raises(ValueError, match="rank 2"):
        model(torch.randn(c, 10))
    with pytest.raises(ValueError, match="rank 4"):
        model(torch.randn(1, c, 10, 1))
    with pytest.raises(ValueError, match=f"expects {c} channels"):
        model(torch.randn(1, c + 1, 10))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.ones(1, c, 10, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.float64 but the weights are torch.float32"):
        model(torch.randn(1, c, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty batch or time axis"):
        model(torch.randn(1, c, 0))
    with pytest.raises(ValueError, match="empty batch or time axis"):
        model(torch.randn(0, c, 10))
    model.double()
    assert model(torch.randn(1, c, 10, dtype=torch.float64)).dtype == torch.float64


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="norm must be one of"):
        SEANetEncoder(**SMALL, norm="spectral_norm")
    with pytest.raises(ValueError, match="causal"):
        SEANetEncoder(**SMALL, norm="time_group_norm", causal=True)
    with pytest.raises(ValueError, match="trim_right_ratio != 1.0"):
        SEANetDecoder(**SMALL, trim_right_ratio=0.5)
    with pytest.raises(ValueError, match=r"trim_right_ratio must be in \[0, 1\]"):
        SEANetDecoder(**SMALL, causal=True, trim_right_ratio=1.5)
    with pytest.raises(ValueError, match=r"disable_norm_outer_blocks must be in \[0, 4\]"):
        SEANetEncoder(**SMALL, disable_norm_outer_blocks=5)
    with pytest.raises(ValueError, match=r"disable_norm_outer_blocks must be in \[0, 4\]"):
        SEANetDecoder(**SMALL, disable_norm_outer_blocks=-1)
    with pytest.raises(ValueError, match="activation must name a torch.nn module"):
        SEANetEncoder(**SMALL, activation="Swoosh")
    with pytest.raises(ValueError, match="activation must name a torch.nn module"):
        SEANetDecoder(**SMALL, final_activation="functional")
    with pytest.raises(ValueError, match="pad_mode must be one of"):
        SEANetEncoder(**SMALL, pad_mode="zero")
    with pytest.raises(ValueError, match="compress must be in"):
        SEANetEncoder(**SMALL, compress=0)
    with pytest.raises(ValueError, match="kernel sizes but 1 dilations"):
        SEANetResnetBlock(8, kernel_sizes=[3, 1], dilations=[1])
    with pytest.raises(ValueError, match="paddings must be non-negative"):
        pad1d(torch.zeros(1, 1, 4), (-1, 0))
    with pytest.raises(ValueError, match="cannot remove paddings"):
        unpad1d(torch.zeros(1, 1, 4), (3, 2))
    with pytest.raises(ValueError, match="trim_right_ratio != 1.0"):
        StreamableConvTranspose1d(2, 2, 4, 2, trim_right_ratio=0.0)
