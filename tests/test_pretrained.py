"""from_pretrained from local files: Hugging Face folders (safetensors and .bin), encodec .th, audiocraft
compression checkpoints; the 24/32/48 kHz architectures against transformers' models built from the same
configs; the MusicGen pointer file and the other errors."""
from __future__ import annotations

import pytest
import torch

import fastcodec
from fastcodec import CheckpointError, EncodecModel, load_checkpoint
from fastcodec.checkpoint import convert_state_dict
from fastcodec.pretrained import EncodecConfig, build_model, config_for, config_from_audiocraft

from .utils import assert_close, max_abs_err

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # toy shapes

_TINY = dict(num_filters=4, hidden_size=8, codebook_size=16, upsampling_ratios=[2, 2], sampling_rate=400,
             target_bandwidths=[0.4, 0.8], num_lstm_layers=1)


def _shapes(sd: dict) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _assert_same_state(model: torch.nn.Module, expected: dict) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


# -- the real architectures ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["encodec_24khz", "encodec_32khz", "encodec_48khz"])
def test_real_configs_match_transformers_and_presets(name):
    transformers = pytest.importorskip("transformers")
    config = config_for("facebook/" + name)
    with torch.device("meta"):  # parameter names and shapes only: nothing is allocated or run
        theirs = transformers.EncodecModel(transformers.EncodecConfig(**config.to_dict()))
        ours = build_model(config, model_cls=fastcodec.reference.EncodecModel)
        preset = getattr(fastcodec.reference.EncodecModel, "encodec_model_" + name.split("_")[1])()
    assert config.num_quantizers == theirs.config.num_quantizers == ours.quantizer.total_codebooks
    assert _shapes(convert_state_dict(theirs.state_dict(), ours)) == _shapes(ours.state_dict())
    assert _shapes(preset.state_dict()) == _shapes(ours.state_dict())
    assert (preset.sample_rate, preset.channels, preset.normalize, preset.segment, preset.encoder.model[0].causal) == \
        (config.sampling_rate, config.audio_channels, config.normalize, config.chunk_length_s, config.use_causal_conv)


def test_musicgen_32khz_preset():
    with torch.device("meta"):
        m = EncodecModel.encodec_model_32khz()
    assert isinstance(m, EncodecModel)
    assert (m.sample_rate, m.channels, m.frame_rate, m.quantizer.bins, m.quantizer.total_codebooks) == \
        (32_000, 1, 50, 2048, 4)
    assert (m.encoder.n_filters, m.encoder.ratios, m.encoder.model[0].causal) == (64, [4, 4, 5, 8], False)
    assert m.target_bandwidths == [2.2] and m.bandwidth_per_codebook() == pytest.approx(0.55)


def test_pretrained_keyword():
    with torch.device("meta"):
        assert isinstance(EncodecModel.encodec_model_48khz(pretrained=False), EncodecModel)
        assert isinstance(fastcodec.reference.EncodecModel.encodec_model_24khz(False), fastcodec.reference.EncodecModel)
    for build in (EncodecModel.encodec_model_24khz, fastcodec.reference.EncodecModel.encodec_model_32khz):
        with pytest.raises(ValueError, match=r"never uses the network.*from_pretrained\(path\)"):
            build(pretrained=True)


# -- Hugging Face folders ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    hf = transformers.EncodecModel(transformers.EncodecConfig(**_TINY, use_causal_conv=False))
    with torch.no_grad():
        for layer in hf.quantizer.layers:
            layer.codebook.embed.normal_()
    st, bin_ = tmp_path_factory.mktemp("hf_st"), tmp_path_factory.mktemp("hf_bin")
    hf.save_pretrained(st)
    hf.save_pretrained(bin_, safe_serialization=False)
    return hf, st, bin_


def test_hf_folder_safetensors_and_bin(hf_folders):
    hf, st, bin_ = hf_folders
    assert (st / "model.safetensors").is_file() and (bin_ / "pytorch_model.bin").is_file()
    expected = convert_state_dict(hf.state_dict(), build_model(EncodecConfig(**_TINY)))
    for source in (st, bin_, st / "config.json", st / "model.safetensors", str(bin_)):
        m = EncodecModel.from_pretrained(source)
        assert isinstance(m, EncodecModel) and not m.encoder.model[0].causal and m.quantizer.total_codebooks == 2
        assert m.config.num_quantizers == 2 and m.config.extra.get("architectures") == ["EncodecModel"]
        _assert_same_state(m, expected)
    sharded = st.parent / (st.name + "_sharded")  # model.safetensors.index.json + shards
    hf.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    _assert_same_state(EncodecModel.from_pretrained(sharded), expected)
    ref = fastcodec.reference.EncodecModel.from_pretrained(st)
    assert type(ref) is fastcodec.reference.EncodecModel
    # load_checkpoint(model, folder): the folder save_pretrained writes
    _assert_same_state(load_checkpoint(build_model(m.config), st), expected)
    # the same weights as transformers: codes and audio
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        want = hf.encode(x, bandwidth=0.8)
        codes = m.encode(x)
        assert torch.equal(codes[0][0], want.audio_codes[0])  # one frame, same codebooks
        assert_close(m.decode(codes), hf.decode(want.audio_codes, want.audio_scales)[0], atol=1e-6, rtol=1e-5)


def test_hf_folder_errors(hf_folders, tmp_path):
    _, st, _ = hf_folders
    cfg_only = tmp_path / "cfg_only"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_text((st / "config.json").read_text())
    with pytest.raises(CheckpointError, match="config.json but no weights.*config without weights"):
        EncodecModel.from_pretrained(cfg_only)
    with pytest.raises(CheckpointError, match="config without weights"):
        load_checkpoint(build_model(EncodecConfig(**_TINY)), cfg_only)
    lfs = tmp_path / "lfs"
    lfs.mkdir()
    (lfs / "config.json").write_text((st / "config.json").read_text())
    (lfs / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    with pytest.raises(CheckpointError, match="Git LFS pointer file"):
        EncodecModel.from_pretrained(lfs)
    from safetensors.torch import load_file, save_file
    nan = tmp_path / "nan"
    nan.mkdir()
    (nan / "config.json").write_text((st / "config.json").read_text())
    sd = load_file(st / "model.safetensors")
    sd["decoder.layers.0.conv.bias"][1] = float("nan")
    save_file(sd, nan / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors \(a Hugging Face folder\).*decoder\.model\.0"
                                              r"\.conv\.conv\.bias: holds 1 NaN"):
        EncodecModel.from_pretrained(nan)
    with pytest.raises(CheckpointError, match="Hugging Face model id.*never downloads"):
        EncodecModel.from_pretrained("facebook/encodec_32khz")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "musicgen"}')
    with pytest.raises(CheckpointError, match="'musicgen' model, not an EnCodec"):
        EncodecModel.from_pretrained(tmp_path / "other")


# -- encodec .th ---------------------------------------------------------------------------------------------

def test_encodec_th_builds_its_preset(tmp_path, monkeypatch):
    src = fastcodec.reference.EncodecModel.encodec_model_24khz()
    path = tmp_path / "encodec_24khz-d7cc33bc.th"
    torch.save(src.state_dict(), path)
    m = EncodecModel.from_pretrained(path)
    assert m.encoder.model[0].causal and m.sample_rate == 24_000 and m.config.num_quantizers == 32
    _assert_same_state(m, src.state_dict())
    # encodec's own call, offline: the checkpoint file in a local folder (the load itself is the one above)
    seen = []
    monkeypatch.setattr(EncodecModel, "from_pretrained", classmethod(lambda cls, p, **kw: seen.append(p) or m))
    assert EncodecModel.encodec_model_24khz(pretrained=True, repository=tmp_path) is m and seen == [str(path)]
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="encodec_48khz-7e698e3e.th"):
        EncodecModel.encodec_model_48khz(pretrained=True, repository=tmp_path)


def test_state_dict_of_unknown_architecture(tmp_path):
    tiny = build_model(EncodecConfig(**_TINY))
    torch.save(tiny.state_dict(), tmp_path / "tiny.th")
    with pytest.raises(CheckpointError, match="fits none of the published EnCodec models.*pass config="):
        EncodecModel.from_pretrained(tmp_path / "tiny.th")
    m = EncodecModel.from_pretrained(tmp_path / "tiny.th", config=EncodecConfig(**_TINY))
    _assert_same_state(m, tiny.state_dict())


# -- audiocraft compression checkpoints and MusicGen's pointer --------------------------------------------------

# an exported audiocraft config (OmegaConf.to_yaml keeps the ${...} references), trimmed to what the model uses
_AUDIOCRAFT_YAML = """
sample_rate: 400
channels: 1
compression_model: encodec
encodec:
  autoencoder: seanet
  quantizer: rvq
  sample_rate: ${sample_rate}
  channels: ${channels}
  causal: false
  renormalize: true
seanet:
  dimension: 8
  channels: ${channels}
  causal: ${encodec.causal}
  n_filters: 4
  n_residual_layers: 1
  ratios: [2, 2]
  activation: ELU
  activation_params: {"alpha": 1.}
  norm: weight_norm
  norm_params: {}
  kernel_size: 7
  residual_kernel_size: 3
  last_kernel_size: 7
  dilation_base: 2
  pad_mode: constant
  true_skip: true
  compress: 2
  lstm: 1
  disable_norm_outer_blocks: 0
  decoder:
    trim_right_ratio: 1.0
    final_activation: null
    final_activation_params: null
  encoder: {}
rvq:
  n_q: 3
  q_dropout: false
  bins: 16
  decay: 0.99
  kmeans_init: true
  kmeans_iters: 50
  threshold_ema_dead_code: 2
  orthogonal_reg_weight: 0.0
"""


def test_audiocraft_compression_checkpoint(oracle, tmp_path):
    seanet, vq = oracle("audiocraft.modules.seanet"), oracle("audiocraft.quantization.vq")
    kw = dict(channels=1, dimension=8, n_filters=4, n_residual_layers=1, ratios=[2, 2], norm="weight_norm",
              causal=False, pad_mode="constant", true_skip=True, compress=2, lstm=1)
    torch.manual_seed(3)
    enc, dec = seanet.SEANetEncoder(**kw), seanet.SEANetDecoder(**kw)
    rvq = vq.ResidualVectorQuantizer(dimension=8, n_q=3, bins=16).eval()
    with torch.no_grad():
        for layer in rvq.vq.layers:
            layer._codebook.embed.normal_()
            layer._codebook.inited.fill_(1)
    state = {**{f"encoder.{k}": v for k, v in enc.state_dict().items()},
             **{f"decoder.{k}": v for k, v in dec.state_dict().items()},
             **{f"quantizer.{k}": v for k, v in rvq.state_dict().items()}}
    # the layout of audiocraft.utils.export.export_encodec
    torch.save({"best_state": state, "xp.cfg": _AUDIOCRAFT_YAML, "version": "1.3.0", "exported": True},
               tmp_path / "compression_state_dict.bin")
    for source in (tmp_path / "compression_state_dict.bin", tmp_path):
        m = EncodecModel.from_pretrained(source)
        assert m.normalize and not m.encoder.model[0].causal and m.quantizer.total_codebooks == 3
        assert m.config.num_quantizers == 3
    x = torch.randn(2, 1, 48)
    with torch.no_grad():
        z = enc(x)
        # fp32 SEANet vs audiocraft: rounding only (measured ~1e-7 on outputs of magnitude ~1)
        assert max_abs_err(m.encoder(x), z) < 1e-5
        assert torch.equal(m.quantizer.encode(z), rvq.encode(z))
        assert max_abs_err(m.decoder(z), dec(z)) < 1e-5
    cfg = config_from_audiocraft(_AUDIOCRAFT_YAML)
    assert (cfg.pad_mode, cfg.use_conv_shortcut, cfg.normalize, cfg.sampling_rate) == ("constant", False, True, 400)
    with pytest.raises(CheckpointError, match="cannot express.*disable_norm_outer_blocks"):
        config_from_audiocraft(_AUDIOCRAFT_YAML.replace("disable_norm_outer_blocks: 0", "disable_norm_outer_blocks: 1"))


def test_musicgen_pointer_file(tmp_path):
    # what MusicGen's compression_state_dict.bin holds (audiocraft.utils.export.export_pretrained_compression_model)
    torch.save({"pretrained": "facebook/encodec_32khz", "exported": True, "version": "1.0.0"},
               tmp_path / "compression_state_dict.bin")
    msg = r"pointer file, not weights.*'facebook/encodec_32khz'.*from_pretrained\(DIR\)"
    for source in (tmp_path / "compression_state_dict.bin", tmp_path):
        with pytest.raises(CheckpointError, match=msg):
            EncodecModel.from_pretrained(source)
    with pytest.raises(CheckpointError, match=msg):
        load_checkpoint(build_model(EncodecConfig(**_TINY)), tmp_path / "compression_state_dict.bin")
