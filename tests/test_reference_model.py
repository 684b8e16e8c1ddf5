"""The reference EncodecModel against encodec 0.1.1's, built from the same random weights;
checkpoint loading (audiocraft/encodec keys, Hugging Face layout, weight-norm parametrizations)."""
from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch

from fastcodec.checkpoint import CheckpointError, convert_state_dict, load_checkpoint
from fastcodec.reference.model import EncodecModel
from tests.utils import assert_close


def _encodec_model_module(oracle):
    # encodec.utils imports torchaudio for audio file I/O (convert_audio/save_audio), which the model
    # code path never calls; stub the module object so encodec.model imports without torchaudio.
    sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
    return oracle("encodec.model")


def _randomize(model: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for layer in model.quantizer.vq.layers:
            cb = layer._codebook
            cb.embed.copy_(torch.randn(cb.embed.shape, generator=g) * 0.5)
            cb.embed_avg.copy_(cb.embed)
            cb.cluster_size.fill_(1.0)
            cb.inited.fill_(1.0)


def _pair(oracle, which: str):
    em = _encodec_model_module(oracle)
    if which == "24khz":
        theirs = em.EncodecModel._get_model([1.5, 3.0, 6.0, 12.0, 24.0], 24_000, 1, causal=True,
                                            model_norm="weight_norm", audio_normalize=False)
        ours = EncodecModel.encodec_model_24khz()
    else:
        theirs = em.EncodecModel._get_model([3.0, 6.0, 12.0, 24.0], 48_000, 2, causal=False,
                                            model_norm="time_group_norm", audio_normalize=True, segment=1.0)
        ours = EncodecModel.encodec_model_48khz()
    _randomize(theirs)
    theirs.eval()
    sd = theirs.state_dict()
    assert set(sd) == set(ours.state_dict()), "state_dict keys differ from encodec 0.1.1's"
    ours.load_state_dict(sd, strict=True)
    return ours.eval(), theirs


@pytest.mark.parametrize("bandwidth", [1.5, 6.0, 24.0])
def test_24khz_matches_encodec(oracle, bandwidth):
    ours, theirs = _pair(oracle, "24khz")
    assert ours.frame_rate == theirs.frame_rate == 75
    assert ours.quantizer.total_codebooks == 32
    wav = 0.1 * torch.randn(2, 1, 24_000 // 4 + 37)  # 0.25 s plus a length that is not a multiple of the hop
    ours.set_target_bandwidth(bandwidth)
    theirs.set_target_bandwidth(bandwidth)
    with torch.no_grad():
        f_ours, f_theirs = ours.encode(wav), theirs.encode(wav)
        assert len(f_ours) == len(f_theirs) == 1
        codes, scale = f_ours[0]
        assert codes.shape == (2, int(bandwidth / 0.75), 19)  # ceil(6037 / 320)
        assert scale is None and f_theirs[0][1] is None
        # same modules, same ops in the same order: the codes are identical
        assert torch.equal(codes, f_theirs[0][0])
        out_ours, out_theirs = ours.decode(f_ours), theirs.decode(f_theirs)
        # measured max abs error 0.0 (identical float32 ops); allow nothing
        assert torch.equal(out_ours, out_theirs)
        assert torch.equal(ours(wav), theirs(wav))


def test_48khz_matches_encodec_segments_and_scale(oracle):
    ours, theirs = _pair(oracle, "48khz")
    assert ours.frame_rate == theirs.frame_rate == 150
    wav = 0.1 * torch.randn(1, 2, 48_000 + 4_800)  # 1.1 s: two overlapping 1 s segments
    ours.set_target_bandwidth(6.0)
    theirs.set_target_bandwidth(6.0)
    with torch.no_grad():
        f_ours, f_theirs = ours.encode(wav), theirs.encode(wav)
        assert len(f_ours) == len(f_theirs) == 2
        for (c1, s1), (c2, s2) in zip(f_ours, f_theirs):
            assert c1.shape[1] == 4
            assert torch.equal(c1, c2)
            assert torch.equal(s1, s2)
        assert torch.equal(ours.decode(f_ours), theirs.decode(f_theirs))


def test_decode_continuous_layouts_and_scaling():
    model = EncodecModel.encodec_model_24khz()
    _randomize(model)
    z = torch.randn(2, 10, 128)
    mean, std = torch.randn(128), torch.rand(128) + 0.5
    with torch.no_grad():
        expected = model.decoder((z * std + mean).transpose(1, 2))
        assert torch.equal(model.decode_continuous(z, mean=mean, std=std), expected)
        assert torch.equal(model.decode_continuous(z.transpose(1, 2).contiguous(), mean=mean, std=std), expected)
        assert torch.equal(model.decode_continuous(z), model.decoder(z.transpose(1, 2)))
    with pytest.raises(ValueError, match="both axes"):
        model.decode_continuous(torch.randn(1, 128, 128))
    with pytest.raises(ValueError, match="axis of size 128"):
        model.decode_continuous(torch.randn(1, 10, 64))
    with pytest.raises(ValueError, match="B, T, D"):
        model.decode_continuous(torch.randn(10, 128))


@pytest.mark.parametrize("bad, err, match", [
    (torch.randn(1, 2, 100), ValueError, "1 channel"),
    (torch.randn(1, 100), ValueError, "batch, channels, samples"),
    (torch.randn(1, 1, 0), ValueError, "empty"),
    (torch.full((1, 1, 100), float("nan")), ValueError, "NaN"),
    (torch.ones(1, 1, 100, dtype=torch.long), TypeError, "floating"),
])
def test_bad_audio(bad, err, match):
    model = EncodecModel.encodec_model_24khz()
    with pytest.raises(err, match=match):
        model.encode(bad)


def test_bad_bandwidth():
    model = EncodecModel.encodec_model_24khz()
    with pytest.raises(ValueError, match="bandwidth 5.0"):
        model.set_target_bandwidth(5.0)


# ------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------


def _to_hf_layout(model: EncodecModel, sd: dict) -> dict:
    """Our (audiocraft) keys -> Hugging Face EncodecModel keys, with parametrized weight norm."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] in ("encoder", "decoder"):
            side, idx, rest = parts[0], parts[2], parts[3:]
            if rest[0] in ("conv", "convtr"):  # StreamableConv: conv.conv.X / convtr.convtr.X / conv.norm.X
                rest = ["conv" if rest[1] in ("conv", "convtr") else rest[1]] + rest[2:]
            elif rest[0] in ("block", "shortcut"):
                head = rest[:2] if rest[0] == "block" else rest[:1]
                rest = head + rest[len(head) + 1:]  # conv.conv.X -> conv.X, conv.norm.X -> norm.X
            k = ".".join([side, "layers", idx] + rest)
        elif parts[0] == "quantizer":
            k = f"quantizer.layers.{parts[3]}.codebook.{parts[5]}"
        k = k.replace(".weight_g", ".parametrizations.weight.original0")
        k = k.replace(".weight_v", ".parametrizations.weight.original1")
        out[k] = v
    return out


def test_checkpoint_roundtrip_file(tmp_path):
    src = EncodecModel.encodec_model_24khz()
    _randomize(src)
    path = tmp_path / "encodec_24khz.th"
    torch.save(src.state_dict(), path)
    dst = load_checkpoint(EncodecModel.encodec_model_24khz(), path)
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k
    # wrapped the way audiocraft saves compression models
    torch.save({"best_state": {"model": src.state_dict()}}, tmp_path / "wrapped.th")
    load_checkpoint(EncodecModel.encodec_model_24khz(), tmp_path / "wrapped.th")


def test_checkpoint_hugging_face_layout():
    src = EncodecModel.encodec_model_24khz()
    _randomize(src)
    hf = _to_hf_layout(src, src.state_dict())
    assert any(k.startswith("encoder.layers.") for k in hf)
    assert any(".parametrizations.weight.original0" in k for k in hf)
    converted = convert_state_dict(hf, src)
    assert set(converted) == set(src.state_dict())
    dst = load_checkpoint(EncodecModel.encodec_model_24khz(), hf)
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k


def test_checkpoint_errors(tmp_path):
    model = EncodecModel.encodec_model_24khz()
    sd = model.state_dict()
    missing = dict(sd)
    key = next(iter(missing))
    missing.pop(key)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_checkpoint(EncodecModel.encodec_model_24khz(), missing)
    misshapen = dict(sd)
    misshapen["quantizer.vq.layers.0._codebook.embed"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=r"quantizer\.vq\.layers\.0\._codebook\.embed: shape"):
        load_checkpoint(EncodecModel.encodec_model_24khz(), misshapen)
    corrupt = tmp_path / "corrupt.th"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(model, corrupt)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(model, tmp_path / "nope.th")

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    pickled = tmp_path / "evil.th"
    torch.save({"model": Evil()}, pickled)
    with pytest.raises(CheckpointError, match="refuses to unpickle"):
        load_checkpoint(model, pickled)


def test_decode_latent_is_a_deprecated_alias_of_decode_continuous():
    from fastcodec.reference import model as M
    from fastcodec.reference.quantization import ResidualVectorQuantizer
    from fastcodec.reference.seanet import SEANetDecoder, SEANetEncoder

    kw = dict(dimension=8, n_filters=2, n_residual_layers=1, ratios=[2], lstm=0)  # tiny: only the alias is tested
    model = EncodecModel(SEANetEncoder(**kw), SEANetDecoder(**kw), ResidualVectorQuantizer(dimension=8, n_q=1, bins=4),
                         target_bandwidths=[1.0], sample_rate=8, channels=1)
    z = torch.randn(1, 3, 8)
    M._warned_decode_latent = False
    with pytest.warns(DeprecationWarning, match="decode_continuous"):
        old = model.decode_latent(z, mean=0.5, std=2.0)
    assert torch.equal(old, model.decode_continuous(z, mean=0.5, std=2.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # once only
        model.decode_latent(z)
