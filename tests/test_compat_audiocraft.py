"""``fastcodec.AudiocraftEncodecModel`` against audiocraft 1.3.0's ``EncodecModel`` on the same weights.

Models are MusicGen-32 kHz-shaped (non-causal, weight norm, constant padding, true skip, 2-layer LSTM, RVQ of
4 codebooks) at tiny widths, so the whole file runs in about a second.

Tolerances: the fast SEANet sums in another order than ATen's convs, so its float32 output is compared with
audiocraft's float64 output: ``|fast32 - ac64| <= ERR_FACTOR * |ac32 - ac64|`` (+ a floor of a few ulp of the
output's scale). Measured ratio on these models: <= 1.3 (AMD EPYC Zen 2). Codes: the certified near-tie rule
(``tests/utils.py``); ``decode_latent`` (RVQ decode, a gather-sum) is bitwise audiocraft's.
"""
from __future__ import annotations

import pytest
import torch

import fastcodec
from fastcodec.compat import AudiocraftEncodecModel, seanet_kwargs
from tests.conftest import import_oracle
from tests.utils import assert_codes_equivalent, max_abs_err

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning"),
    # tiny shapes on a shared 2-core machine: a 2-thread OpenMP barrier waits on a descheduled thread
    # (measured 10x slower here under load)
    pytest.mark.usefixtures("one_torch_thread"),
]

ERR_FACTOR = 4.0
KW = dict(channels=1, dimension=16, n_filters=4, n_residual_layers=1, ratios=[4, 2], norm="weight_norm",
          causal=False, pad_mode="constant", true_skip=True, compress=2, lstm=2)


def build_audiocraft(renormalize: bool = False, causal: bool = False, seed: int = 0, **overrides):
    """A tiny audiocraft EncodecModel (random weights, codebooks drawn, k-means already done), eval mode."""
    E = import_oracle("audiocraft.models.encodec")
    S = import_oracle("audiocraft.modules.seanet")
    Q = import_oracle("audiocraft.quantization.vq")
    torch.manual_seed(seed)
    kw = {**KW, "causal": causal, **overrides}
    if causal:
        kw["pad_mode"] = "reflect"
    q = Q.ResidualVectorQuantizer(dimension=kw["dimension"], n_q=4, bins=64)
    with torch.no_grad():
        for layer in q.vq.layers:
            layer._codebook.embed.normal_()
            layer._codebook.inited.fill_(1)
    model = E.EncodecModel(S.SEANetEncoder(**kw), S.SEANetDecoder(**kw), q, frame_rate=4, sample_rate=32,
                           channels=kw["channels"], causal=causal, renormalize=renormalize)
    with torch.no_grad():  # weight norm starts at g = |v|, which would hide a wrong fold
        for name, p in model.named_parameters():
            if name.endswith("weight_g"):
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    return model.eval()


def float64_twin(model, **build_kw):
    twin = build_audiocraft(**build_kw)
    twin.load_state_dict(model.state_dict())
    return twin.double()


def assert_within(fast, ac32, ac64, name):
    err32 = max_abs_err(ac32, ac64)
    floor = 8 * torch.finfo(torch.float32).eps * ac64.abs().max().item()
    err = max_abs_err(fast, ac64)
    assert err <= ERR_FACTOR * err32 + floor, f"{name}: err {err:.3e} vs float32 audiocraft's {err32:.3e}"


@pytest.mark.parametrize("renormalize", [False, True])
def test_same_results_as_audiocraft(renormalize):
    ac = build_audiocraft(renormalize=renormalize)
    ac64 = float64_twin(ac, renormalize=renormalize)
    fm = AudiocraftEncodecModel.from_audiocraft(ac)
    assert isinstance(fm.encoder, fastcodec.SEANetEncoder)
    assert isinstance(fm.quantizer, fastcodec.ResidualVectorQuantizer)
    assert list(fm.state_dict()) == list(ac.state_dict())
    x = torch.randn(2, 1, 77) * 0.3
    with torch.no_grad():
        codes, scale = fm.encode(x)
        ac_codes, ac_scale = ac.encode(x)
        if renormalize:
            assert torch.equal(scale, ac_scale) and scale.shape == (2, 1)
        else:
            assert scale is None and ac_scale is None
        codebooks = torch.stack([layer._codebook.embed for layer in ac.quantizer.vq.layers])
        assert_codes_equivalent(codes, ac_codes, ac.encoder(ac.preprocess(x)[0]), codebooks)
        assert torch.equal(fm.decode_latent(ac_codes), ac.decode_latent(ac_codes))  # bitwise
        out = fm.decode(ac_codes, ac_scale)
        assert out.shape == ac.decode(ac_codes, ac_scale).shape
        assert_within(out, ac.decode(ac_codes, ac_scale),
                      ac64.decode(ac_codes, None if ac_scale is None else ac_scale.double()), "decode")
        res, ac_res = fm(x), ac(x)
        assert torch.equal(res.codes, ac_res.codes) and res.x.shape == x.shape
        assert_within(res.x, ac_res.x, ac64(x.double()).x, "forward")


def test_codebook_api_and_attributes():
    ac = build_audiocraft()
    fm = AudiocraftEncodecModel.from_audiocraft(ac)
    for attr in ("num_codebooks", "total_codebooks", "cardinality", "frame_rate", "sample_rate", "channels",
                 "causal", "renormalize"):
        assert getattr(fm, attr) == getattr(ac, attr), attr
    fm.set_num_codebooks(2)
    ac.set_num_codebooks(2)
    x = torch.randn(1, 1, 40)
    with torch.no_grad():
        codes, _ = fm.encode(x)
        assert codes.shape == ac.encode(x)[0].shape == (1, 2, 5)
        assert fm.decode(codes).shape == (1, 1, 40)
    with pytest.raises(ValueError, match="codebooks"):
        fm.set_num_codebooks(5)
    with pytest.raises(ValueError, match="channel"):
        fm.encode(torch.randn(1, 2, 40))
    with pytest.raises(ValueError, match="renormalize"):
        AudiocraftEncodecModel(fm.encoder, fm.decoder, fm.quantizer, 4, 32, 1, causal=True, renormalize=True)


def test_share_links_the_same_tensors():
    ac = build_audiocraft()
    fm = AudiocraftEncodecModel.from_audiocraft(ac, share=True)
    mine, theirs = fm.state_dict(keep_vars=True), ac.state_dict(keep_vars=True)
    assert list(mine) == list(theirs) and all(mine[k] is theirs[k] for k in mine)
    copied = AudiocraftEncodecModel.from_audiocraft(ac)
    assert all(copied.state_dict()[k].data_ptr() != theirs[k].data_ptr() for k in theirs)


@pytest.mark.parametrize("overrides", [
    dict(causal=True, n_residual_layers=2, dilation_base=3, lstm=0, kernel_size=5, last_kernel_size=3),
    dict(norm="time_group_norm", disable_norm_outer_blocks=1, residual_kernel_size=5, true_skip=False),
    dict(activation="LeakyReLU", activation_params={"negative_slope": 0.3}, compress=1, channels=2),
])
def test_constructor_arguments_read_back(overrides):
    S = import_oracle("audiocraft.modules.seanet")
    kw = {**KW, **overrides}
    for cls, extra in ((S.SEANetEncoder, {}), (S.SEANetDecoder, dict(final_activation="Tanh", trim_right_ratio=1.0))):
        m = cls(**kw, **extra)
        got = seanet_kwargs(m)
        for k, v in {**kw, **extra}.items():
            assert got[k] == v, (cls.__name__, k, got[k], v)
        fast = (fastcodec.SEANetDecoder if extra else fastcodec.SEANetEncoder)(**got)
        assert {k: v.shape for k, v in fast.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}


def test_musicgen_preset_and_get_pretrained(tmp_path):
    model = AudiocraftEncodecModel.musicgen_32khz()
    assert (model.frame_rate, model.sample_rate, model.channels) == (50, 32000, 1)
    assert (model.cardinality, model.total_codebooks, model.num_codebooks) == (2048, 4, 4)
    assert model.encoder.hop_length == 640 and not model.causal
    # an exported audiocraft checkpoint (audiocraft.utils.export.export_encodec's layout), tiny
    import yaml

    cfg = dict(compression_model="encodec", encodec=dict(autoencoder="seanet", quantizer="rvq", sample_rate=32,
                                                         channels=1, causal=False, renormalize=False),
               seanet={**KW, "encoder": {}, "decoder": {"trim_right_ratio": 1.0}},
               rvq=dict(n_q=4, bins=64, q_dropout=False))
    ac = build_audiocraft()
    path = tmp_path / "compression.th"
    torch.save({"best_state": ac.state_dict(), "xp.cfg": yaml.safe_dump(cfg), "version": "1.3.0",
                "exported": True}, path)
    loaded = AudiocraftEncodecModel.get_pretrained(str(path))
    assert not loaded.training and loaded.frame_rate == 4
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ac.state_dict().items())
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x)[0], AudiocraftEncodecModel.from_audiocraft(ac).encode(x)[0])
    with pytest.raises(FileNotFoundError, match="does not download"):
        AudiocraftEncodecModel.get_pretrained("facebook/encodec_32khz")
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.th")
    with pytest.raises(ValueError, match="best_state"):
        AudiocraftEncodecModel.get_pretrained(tmp_path / "other.th")


def test_from_audiocraft_rejects_other_objects():
    with pytest.raises(TypeError, match="encoder"):
        AudiocraftEncodecModel.from_audiocraft(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="SEANet"):
        fastcodec.compat.fast_seanet_like(torch.nn.Linear(2, 2))
