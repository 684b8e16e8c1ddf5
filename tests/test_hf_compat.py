"""fastcodec.hf.EncodecModel against transformers.EncodecModel (4.57.x, the version pinned in the test extra)
on the same weights: tiny 24 kHz-, 32 kHz- (MusicGen) and 48 kHz-shaped configs, padded batches with masks,
chunking, tuple/dict outputs, errors."""
from __future__ import annotations

import copy

import pytest
import torch

import fastcodec
from fastcodec.hf import EncodecConfig, EncodecModel

from .utils import assert_codes_equivalent, max_abs_err

transformers = pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.skipif(not transformers.__version__.startswith("4.57."),
                       reason=f"tested against transformers 4.57.x, found {transformers.__version__}"),
    # toy shapes: a second OpenMP thread only spins (a 26-step fp32 LSTM took 1.2 s with 2 threads on a loaded
    # 2-core machine, 0.4 ms with 1)
    pytest.mark.usefixtures("one_torch_thread"),
]

_BASE = dict(num_filters=4, hidden_size=8, codebook_size=16, upsampling_ratios=[2, 2], sampling_rate=400,
             target_bandwidths=[0.4, 0.8], num_lstm_layers=1)
# the published models' distinguishing settings (transformers' convert script), at toy sizes
CONFIGS = {
    "24khz": dict(),  # causal, weight_norm, conv shortcuts, no chunks
    "32khz": dict(use_causal_conv=False, use_conv_shortcut=False, codebook_size=32, upsampling_ratios=[2, 4],
                  num_filters=8, target_bandwidths=[0.5]),  # MusicGen's: non-causal, no shortcut, one bandwidth
    "48khz": dict(audio_channels=2, use_causal_conv=False, norm_type="time_group_norm", normalize=True,
                  chunk_length_s=0.1, overlap=0.05),  # 40-sample chunks, stride 38: the last one is short
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, fastcodec.hf model loaded from its save_pretrained folder)."""
    torch.manual_seed(1)
    cfg = transformers.EncodecConfig(**{**_BASE, **CONFIGS[request.param]})
    hf = transformers.EncodecModel(cfg).eval()
    with torch.no_grad():  # trained-like codebooks (transformers initialises them to zeros)
        for layer in hf.quantizer.layers:
            layer.codebook.embed.normal_()
    folder = tmp_path_factory.mktemp(f"hf{request.param}")
    hf.save_pretrained(folder)
    return hf, EncodecModel.from_pretrained(folder)


def _padded_batch(channels: int):
    x = torch.randn(2, channels, 101)
    mask = torch.ones(2, 101, dtype=torch.long)
    mask[1, 70:] = 0  # the second item is 70 samples; its tail holds garbage that the mask must zero
    return x, mask


def _capture_latents(hf):
    seen = []
    real = hf.quantizer.encode

    def encode(emb, bandwidth=None):
        seen.append(emb.detach().clone())
        return real(emb, bandwidth)
    hf.quantizer.encode = encode
    return seen


def test_config_and_api(pair):
    hf, fm = pair
    ours, theirs = fm.config.to_dict(), hf.config.to_dict()
    for k in ("target_bandwidths", "sampling_rate", "audio_channels", "normalize", "chunk_length_s", "overlap",
              "num_filters", "upsampling_ratios", "norm_type", "use_causal_conv", "codebook_size",
              "use_conv_shortcut", "num_lstm_layers"):
        assert ours[k] == theirs[k], k
    for k in ("chunk_length", "chunk_stride", "hop_length", "frame_rate", "num_quantizers", "codebook_nbits"):
        assert getattr(fm.config, k) == getattr(hf.config, k), k
    assert fm.main_input_name == "input_values" and isinstance(fastcodec.HFEncodecModel(fm.config), EncodecModel)


def test_encode_decode_equal_transformers_padded_batch(pair):
    hf, fm = pair
    x, mask = _padded_batch(hf.config.audio_channels)
    with torch.no_grad():
        for bw in hf.config.target_bandwidths:
            latents = _capture_latents(hf)
            want = hf.encode(x, mask, bandwidth=bw)
            del hf.quantizer.encode
            got = fm.encode(x, mask, bandwidth=bw)
            assert got.audio_codes.shape == want.audio_codes.shape
            assert got.last_frame_pad_length == want.last_frame_pad_length
            assert len(got.audio_scales) == len(want.audio_scales)
            for a, b in zip(got.audio_scales, want.audio_scales):
                assert (a is None and b is None) or torch.equal(a, b)  # same arithmetic as transformers
            codebooks = torch.stack([layer.codebook.embed for layer in hf.quantizer.layers])
            T = want.audio_codes.shape[-1]
            for i, z in enumerate(latents):  # per chunk; the padded tail of the last chunk is zeros in both
                n = z.shape[-1]
                assert torch.equal(got.audio_codes[i, ..., n:], want.audio_codes[i, ..., n:]) and n <= T
                assert_codes_equivalent(got.audio_codes[i, ..., :n], want.audio_codes[i, ..., :n], z, codebooks)

            # decode the same codes; tolerance from float32 vs float64: 4x transformers' own fp32 error (measured:
            # ours 4e-8..8e-7, theirs 4e-8..8e-7 against float64; ratio <= 1.8)
            args = (want.audio_codes, want.audio_scales, mask)
            kw = dict(last_frame_pad_length=want.last_frame_pad_length)
            ref64 = copy.deepcopy(hf).double().decode(
                want.audio_codes, [s if s is None else s.double() for s in want.audio_scales], mask, **kw)[0]
            theirs = hf.decode(*args, **kw)[0]
            ours = fm.decode(*args, **kw)[0]
            assert ours.shape == theirs.shape == (2, hf.config.audio_channels, 101)
            bound = 4 * max_abs_err(theirs, ref64) + 1e-7
            assert max_abs_err(ours, ref64) <= bound, (max_abs_err(ours, ref64), bound)


def test_forward_and_tuples(pair):
    hf, fm = pair
    x, mask = _padded_batch(hf.config.audio_channels)
    with torch.no_grad():
        want = hf(x, mask)
        got = fm(x, mask)
        assert torch.equal(got.audio_codes, want.audio_codes)  # no near-tie in this data (checked above)
        assert max_abs_err(got.audio_values, want.audio_values) < 1e-5 * (1 + want.audio_values.abs().max().item())
        codes, scales, pad = fm.encode(x, return_dict=False)
        assert (codes.dim(), len(scales)) == (4, codes.shape[0]) and isinstance(pad, int)
        (values,) = fm.decode(codes, scales, last_frame_pad_length=pad, return_dict=False)
        out = fm.encode(x)
        assert torch.equal(out[0], out.audio_codes) and torch.equal(out["audio_codes"], codes)
        c2, v2 = fm(x, return_dict=False)
        assert torch.equal(c2, codes) and values.shape[:2] == v2.shape[:2]


def test_mono_mask_without_channel_axis_and_3d_mask(pair):
    hf, fm = pair
    x, mask = _padded_batch(hf.config.audio_channels)
    with torch.no_grad():
        a = fm.encode(x, mask).audio_codes
        b = fm.encode(x, mask[:, None, :].expand(-1, hf.config.audio_channels, -1)).audio_codes
    assert torch.equal(a, b)


def test_errors():
    fm = EncodecModel(EncodecConfig(**_BASE))
    x = torch.randn(1, 1, 40)
    with pytest.raises(ValueError, match="bandwidth 3.0"):
        fm.encode(x, bandwidth=3.0)
    with pytest.raises(ValueError, match="channel"):
        fm.encode(torch.randn(1, 2, 40))
    with pytest.raises(ValueError, match="padding_mask"):
        fm.encode(x, torch.ones(1, 39))
    with pytest.raises(TypeError, match="input_values"):
        fm.encode(torch.ones(1, 1, 40, dtype=torch.long))
    codes = fm.encode(x).audio_codes
    with pytest.raises(ValueError, match="audio_scales"):
        fm.decode(codes, [])
    with pytest.raises(ValueError, match="audio_codes"):
        fm(x, audio_codes=codes)
    with pytest.raises(ValueError, match="codebook_dim"):
        EncodecConfig(hidden_size=8, codebook_dim=4)
    with pytest.raises(ValueError, match="overlap"):
        EncodecConfig(chunk_length_s=1.0)


def test_config_from_transformers_object():
    cfg = transformers.EncodecConfig(**_BASE)
    fm = EncodecModel(cfg)
    assert fm.config.num_quantizers == cfg.num_quantizers == fm.quantizer.total_codebooks == 2
