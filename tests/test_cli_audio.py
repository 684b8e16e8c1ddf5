"""Audio I/O rules (encodec's convert_audio), ``fastcodec encode/decode`` and ``python -m fastcodec``."""
from __future__ import annotations

import io
import runpy
import sys
import types

import numpy as np
import pytest
import soundfile as sf
import torch

import fastcodec
from fastcodec import cli, ecdc
from fastcodec.audio import AudioError, audio_info, convert_audio, load_for_model, read_audio, write_audio
from fastcodec import codec_cli
from fastcodec.codec_cli import ModelError, resolve_model
from tests.codec_fixtures import one_thread, tiny_model, write_wav  # noqa: F401  (autouse)

Q16 = 1 / 32768  # one step of the 16-bit PCM the WAVs are written in


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture
def model_arg(tiny, monkeypatch):
    """``--model tiny`` resolves to the tiny model (a new 24 kHz model per command costs seconds of set-up);
    checkpoint loading itself is tested in test_model_resolution."""
    real = codec_cli.resolve_model
    monkeypatch.setattr(codec_cli, "resolve_model", lambda spec, rw=False: tiny if spec == "tiny" else real(spec, rw))
    return tiny


@pytest.mark.parametrize("c_in,c_out", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_channel_rules_match_encodec(oracle, monkeypatch, c_in, c_out):
    ta = types.ModuleType("torchaudio")  # encodec's resampler; identity at equal rates (all it is asked here)
    ta.transforms = types.SimpleNamespace(Resample=lambda a, b: (lambda w: w))
    monkeypatch.setitem(sys.modules, "torchaudio", ta)
    utils = oracle("encodec.utils")
    monkeypatch.setattr(utils, "torchaudio", ta)
    wav = torch.randn(c_in, 101)
    assert torch.equal(convert_audio(wav, 24_000, 24_000, c_out), utils.convert_audio(wav, 24_000, 24_000, c_out))


def test_resampling_and_more_channels():
    wav = torch.randn(3, 1600)
    assert torch.equal(convert_audio(wav, 16_000, 16_000, 1), wav.mean(0, keepdim=True))  # audiocraft's rule
    assert torch.equal(convert_audio(wav, 16_000, 16_000, 2), wav[:2])
    tone = torch.sin(2 * np.pi * 440 * torch.arange(16_000) / 16_000)[None]
    up = convert_audio(tone, 16_000, 24_000, 1)
    assert up.shape == (1, 24_000) and up.dtype == torch.float32
    ref = torch.sin(2 * np.pi * 440 * torch.arange(24_000) / 24_000)
    # soxr HQ: a 440 Hz tone away from the edges keeps its shape to ~1e-4 (measured 3e-5)
    assert (up[0, 1000:-1000] - ref[1000:-1000]).abs().max() < 1e-3


def test_audio_errors_name_the_file(tmp_path):
    with pytest.raises(AudioError, match="no such file"):
        read_audio(tmp_path / "missing.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF1234WAVEfmt garbage")
    with pytest.raises(AudioError, match="bad.wav: cannot read"):
        read_audio(bad)
    with pytest.raises(AudioError, match="bad.wav: cannot read the audio header"):
        audio_info(bad)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0, 1), np.float32), 8000)
    with pytest.raises(AudioError, match="no audio samples"):
        read_audio(empty)
    with pytest.raises(AudioError, match="write .wav or .flac"):
        write_audio(tmp_path / "x.mp4", torch.zeros(1, 10), 8000)
    write_audio(tmp_path / "clip.wav", torch.full((1, 10), 2.0), 8000)  # clipped to 0.99, as encodec saves
    back, sr = read_audio(tmp_path / "clip.wav")
    assert sr == 8000 and abs(back.max().item() - 0.99) < Q16


def test_model_resolution(tmp_path):
    with pytest.raises(ModelError, match="never uses the network"):
        resolve_model("24khz")
    with pytest.raises(ModelError, match="no such file"):
        resolve_model("/nonexistent/model.th")
    with pytest.raises(ModelError, match="preset name"):
        resolve_model(str(tmp_path), random_weights=True)
    saved = fastcodec.EncodecModel.encodec_model_24khz()  # torch's random init: no two models alike
    torch.save(saved.state_dict(), tmp_path / "encodec_24khz_random.th")
    m = resolve_model(str(tmp_path / "encodec_24khz_random.th"))
    key = "encoder.model.0.conv.conv.weight_v"
    assert m.name == "encodec_24khz" and torch.equal(m.state_dict()[key], saved.state_dict()[key])
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.th")
    with pytest.raises(ModelError, match="fits none of the published EnCodec models"):
        resolve_model(str(tmp_path / "other.th"))


def test_encode_decode_files(model_arg, tmp_path, capsys):
    model, path = model_arg, "tiny"
    src = write_wav(tmp_path / "in.wav", 0.1, sr=16_000, channels=2, seed=5)  # converted: mono, 8 kHz
    assert cli.main(["encode", str(src), str(tmp_path / "x.ecdc"), "--model", path, "--bandwidth", "12"]) == 0
    data = (tmp_path / "x.ecdc").read_bytes()
    wav = load_for_model(src, 8_000, 1)
    model.set_target_bandwidth(12.0)
    assert data == ecdc.compress(model, wav) and ecdc.read_header(io.BytesIO(data))["nc"] == 2
    assert cli.main(["decode", str(tmp_path / "x.ecdc"), str(tmp_path / "out.wav"), "--model", path]) == 0
    out, sr = read_audio(tmp_path / "out.wav")
    expected, _ = ecdc.decompress(data, model)
    assert sr == 8_000 and out.shape == expected.shape == wav.shape
    # the WAV is 16-bit PCM clipped to 0.99: at most one quantization step (plus rounding) from the float audio
    assert (out - expected.clamp(-0.99, 0.99)).abs().max() <= Q16
    # entropy coded (--lm: the language model's weights): the same codes, so the same audio, in fewer bytes
    from fastcodec.ecdc_lm import lm_for
    torch.save(lm_for(model).state_dict(), tmp_path / "lm.th")
    short = write_wav(tmp_path / "short.wav", 0.01, sr=8_000, seed=6)  # 10 frames: one LM step each
    assert cli.main(["encode", str(short), str(tmp_path / "lm.ecdc"), "--model", path, "--bandwidth", "12",
                     "--lm", str(tmp_path / "lm.th")]) == 0
    assert ecdc.read_header(io.BytesIO((tmp_path / "lm.ecdc").read_bytes()))["lm"] is True
    assert cli.main(["decode", str(tmp_path / "lm.ecdc"), str(tmp_path / "lm.wav"), "--model", path]) == 2
    assert "--lm PATH" in capsys.readouterr().err
    assert cli.main(["decode", str(tmp_path / "lm.ecdc"), str(tmp_path / "lm.wav"), "--model", path,
                     "--lm", str(tmp_path / "lm.th")]) == 0
    plain = ecdc.decompress(ecdc.compress(model, load_for_model(short, 8_000, 1)), model)[0]
    write_audio(tmp_path / "plain.wav", plain, 8_000)
    assert torch.equal(read_audio(tmp_path / "lm.wav")[0], read_audio(tmp_path / "plain.wav")[0])
    # bad input: one line naming the file, exit status 2, no traceback
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    assert cli.main(["encode", str(tmp_path / "bad.wav"), str(tmp_path / "y.ecdc"), "--model", path]) == 2
    err = capsys.readouterr().err
    assert "bad.wav: cannot read" in err and "Traceback" not in err
    assert cli.main(["encode", str(src), str(tmp_path / "y.ecdc"), "--model", "24khz"]) == 2
    assert "--random-weights" in capsys.readouterr().err


def test_decode_codes_arrays_and_latents(model_arg, tmp_path):
    model, path = model_arg, "tiny"
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 64, (4, 90), generator=g)
    with torch.no_grad():
        expected = model.decode([(codes[None], None)])[0]
    np.save(tmp_path / "codes.npy", codes.numpy().astype(np.int16))
    torch.save(codes[None], tmp_path / "codes.pt")
    for name in ("codes.npy", "codes.pt"):
        assert cli.main(["decode", str(tmp_path / name), str(tmp_path / "o.wav"), "--model", path]) == 0
        out, _ = read_audio(tmp_path / "o.wav")
        assert (out - expected.clamp(-0.99, 0.99)).abs().max() <= Q16
    z = torch.randn(1, 90, 16, generator=g)  # JASCO's (B, T, D) normalised latents
    mean, std = torch.randn(16, generator=g), torch.rand(16, generator=g) + 0.5
    torch.save({"latents": z, "mean": mean, "std": std}, tmp_path / "lat.pt")
    decode = getattr(model, "decode_continuous", None) or model.decode_latent
    with torch.no_grad():
        expected = decode(z, mean, std)[0]
    assert cli.main(["decode", str(tmp_path / "lat.pt"), str(tmp_path / "l.wav"), "--model", path]) == 0
    out, _ = read_audio(tmp_path / "l.wav")
    assert (out - expected.clamp(-0.99, 0.99)).abs().max() <= Q16


def test_python_dash_m(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["fastcodec", "--version"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("fastcodec", run_name="__main__")
    assert e.value.code == 0 and f"fastcodec {fastcodec.__version__}" in capsys.readouterr().out
