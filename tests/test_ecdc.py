"""``.ecdc`` files against encodec 0.1.1's own ``compress``/``decompress``, with the same random weights."""
from __future__ import annotations

import io

import pytest
import torch

from fastcodec import ecdc
from fastcodec.reference.model import EncodecModel as RefModel
from tests.codec_fixtures import encodec_model_module, one_thread, randomize  # noqa: F401  (autouse)


def _tiny_pair(oracle, which: str):
    """encodec's and our reference model with the preset's scheme (24 kHz: mono causal; 48 kHz: stereo,
    non-causal, time_group_norm, volume-normalised 20 ms segments) and name, at a small size: 8 kHz, hop 8,
    4 codebooks of 64 entries (6 bits: the packing's bytes straddle codes), LSTM 1."""
    em = encodec_model_module(oracle)
    eq, eseanet = oracle("encodec.quantization"), oracle("encodec.modules")
    from fastcodec.reference.quantization import ResidualVectorQuantizer
    from fastcodec.reference.seanet import SEANetDecoder, SEANetEncoder
    stereo = which == "48khz"
    kw = dict(channels=2 if stereo else 1, dimension=16, n_filters=4, n_residual_layers=1, ratios=[4, 2],
              norm="time_group_norm" if stereo else "weight_norm", causal=not stereo, pad_mode="reflect",
              true_skip=False, compress=2, lstm=1)
    args = dict(target_bandwidths=[6.0, 12.0, 24.0], sample_rate=8_000, channels=kw["channels"],
                normalize=stereo, segment=0.02 if stereo else None, name=f"encodec_{which}")
    theirs = em.EncodecModel(eseanet.SEANetEncoder(**kw), eseanet.SEANetDecoder(**kw),
                             eq.ResidualVectorQuantizer(dimension=16, n_q=4, bins=64), **args)
    ours = RefModel(SEANetEncoder(**kw), SEANetDecoder(**kw), ResidualVectorQuantizer(dimension=16, n_q=4, bins=64),
                    **args)
    randomize(theirs)
    ours.load_state_dict(theirs.state_dict())
    return ours.eval(), theirs.eval()


def _pair(oracle, which: str):
    if which != "24khz":
        return _tiny_pair(oracle, which)
    em = encodec_model_module(oracle)
    if which == "24khz":
        theirs = em.EncodecModel._get_model([1.5, 3.0, 6.0, 12.0, 24.0], 24_000, 1, causal=True,
                                            model_norm="weight_norm", audio_normalize=False, name="encodec_24khz")
        ours = RefModel.encodec_model_24khz()
    else:
        theirs = em.EncodecModel._get_model([3.0, 6.0, 12.0, 24.0], 48_000, 2, causal=False,
                                            model_norm="time_group_norm", audio_normalize=True, segment=1.0,
                                            name="encodec_48khz")
        ours = RefModel.encodec_model_48khz()
    randomize(theirs)
    ours.load_state_dict(theirs.state_dict())
    return ours.eval(), theirs.eval()


def _their_compress(oracle, theirs):
    comp = oracle("encodec.compress")
    # encodec's decompress builds MODELS[name]() with pretrained=True (a download): give it our random model
    return comp, {"encodec_24khz": lambda: theirs, "encodec_48khz": lambda: theirs}


# the real 24 kHz preset (10-bit codes, 75 Hz frames), and the 48 kHz scheme at a small size
@pytest.mark.parametrize("which,bandwidth,seconds", [("24khz", 1.5, 0.11), ("48khz", 12.0, 0.05)])
def test_both_directions_match_encodec(oracle, monkeypatch, which, bandwidth, seconds):
    ours, theirs = _pair(oracle, which)
    comp, models = _their_compress(oracle, theirs)
    monkeypatch.setattr(comp, "MODELS", models)
    ours.set_target_bandwidth(bandwidth)
    theirs.set_target_bandwidth(bandwidth)
    wav = 0.1 * torch.randn(ours.channels, int(seconds * ours.sample_rate) + 7)
    mine = ecdc.compress(ours, wav)
    their_bytes = comp.compress(theirs, wav, use_lm=False)
    # the reference runs encodec's float32 ops in the same order: the same codes, hence the same bytes
    assert mine == their_bytes
    # fastcodec's file -> encodec's decompress, encodec's file -> ours: the same audio, exactly
    w_theirs, sr = comp.decompress(mine)
    w_ours, sr2 = ecdc.decompress(their_bytes, ours)
    assert sr == sr2 == ours.sample_rate
    assert w_ours.shape == w_theirs.shape == wav.shape
    assert torch.equal(w_ours, w_theirs)


def test_packing_matches_encodec_bitpacker(oracle):
    binary = oracle("encodec.binary")
    g = torch.Generator().manual_seed(3)
    for bits, K, T in ((10, 2, 7), (10, 3, 5), (7, 1, 9)):  # K*T*bits not a multiple of 8: padded last byte
        codes = torch.randint(0, 1 << bits, (K, T), generator=g)
        fo = io.BytesIO()
        p = binary.BitPacker(bits, fo)
        for t in range(T):
            for k in range(K):
                p.push(int(codes[k, t]))
        p.flush()
        assert ecdc.pack_codes(codes, bits) == fo.getvalue()
        assert torch.equal(ecdc.unpack_codes(fo.getvalue(), bits, K, T), codes)


def test_bad_streams_are_named():
    m = RefModel.encodec_model_24khz()
    m.set_target_bandwidth(1.5)
    good = ecdc.compress(m, 0.1 * torch.randn(1, 800))
    with pytest.raises(ecdc.EcdcError, match="not an ECDC stream"):
        ecdc.decompress(b"RIFF" + good[4:], m)
    with pytest.raises(ecdc.EcdcError, match="ended inside the codes"):
        ecdc.decompress(good[:-2], m)
    with pytest.raises(ecdc.EcdcError, match="ended inside the ECDC header"):
        ecdc.decompress(good[:5], m)
    lm = io.BytesIO()
    ecdc.write_header(lm, {"m": "encodec_24khz", "al": 800, "nc": 2, "lm": True})
    with pytest.raises(ecdc.EcdcError, match="language model"):
        ecdc.decompress(lm.getvalue(), m)
    other = RefModel.encodec_model_48khz()
    with pytest.raises(ecdc.EcdcError, match="encodec_24khz"):
        ecdc.decompress(good, other)
    with pytest.raises(ecdc.EcdcError, match="language model weights"):
        ecdc.compress(m, torch.zeros(1, 10), use_lm=True)


@pytest.mark.parametrize("which,bandwidth,seconds", [("24khz", 12.0, 0.012), ("48khz", 24.0, 0.025)])
def test_entropy_coded_mode_matches_encodec(oracle, monkeypatch, which, bandwidth, seconds):
    from fastcodec.ecdc_lm import lm_for
    ours, theirs = _tiny_pair(oracle, which)
    comp, models = _their_compress(oracle, theirs)
    monkeypatch.setattr(comp, "MODELS", models)
    em = encodec_model_module(oracle)
    torch.manual_seed(1234)  # encodec's get_lm_model seeds before building; the weights stay torch's random init
    their_lm = em.LMModel(theirs.quantizer.n_q, theirs.quantizer.bins, num_layers=5, dim=200,
                          past_context=int(3.5 * theirs.frame_rate)).eval()
    monkeypatch.setattr(theirs, "get_lm_model", lambda: their_lm)  # instead of a download
    lm = lm_for(ours)
    lm.load_state_dict(their_lm.state_dict())  # same keys as encodec's LMModel
    ours.set_target_bandwidth(bandwidth)
    theirs.set_target_bandwidth(bandwidth)
    wav = 0.1 * torch.randn(ours.channels, int(seconds * ours.sample_rate) + 7)  # 48 kHz: 2 segments
    mine = ecdc.compress(ours, wav, use_lm=True, lm=lm)
    their_bytes = comp.compress(theirs, wav, use_lm=True)
    assert mine == their_bytes and ecdc.read_header(io.BytesIO(mine))["lm"] is True
    w_theirs, _ = comp.decompress(mine)
    w_ours, _ = ecdc.decompress(their_bytes, ours, lm=lm)
    assert torch.equal(w_ours, w_theirs)
    assert torch.equal(w_ours, ecdc.decompress(ecdc.compress(ours, wav), ours)[0])  # the same codes as plain
