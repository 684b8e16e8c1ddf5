"""``fastcodec.patch`` / ``unpatch`` on an audiocraft EncodecModel (held by a MusicGen-like object) and on a
transformers ``EncodecModel``: the same tensor objects before and after (``state_dict`` keys, values, storage),
the same outputs (float32 tolerance: the fast SEANet against the float64 model, ``ERR_FACTOR`` times the float32
model's own error, see tests/test_compat_audiocraft.py; codes through the certified near-tie rule), training
reaches the shared parameters, ``unpatch`` restores the original modules and methods."""
from __future__ import annotations

import pytest
import torch

import fastcodec
from tests.test_compat_audiocraft import assert_within, build_audiocraft, float64_twin
from tests.utils import assert_codes_equivalent

pytestmark = [pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning"),
              pytest.mark.usefixtures("one_torch_thread")]  # tiny shapes, as in tests/test_compat_audiocraft.py


class MusicGenLike:
    """What MusicGen holds: ``.compression_model``."""

    def __init__(self, compression_model):
        self.compression_model = compression_model


def _tensors(model):
    return {k: (v, v.data_ptr()) for k, v in model.state_dict(keep_vars=True).items()}


def _same_tensors(before, model):
    after = model.state_dict(keep_vars=True)
    assert list(after) == list(before)
    for k, (t, ptr) in before.items():
        assert after[k] is t and after[k].data_ptr() == ptr, k


def _codebooks(q):
    return torch.stack([layer._codebook.embed for layer in q.vq.layers]).detach()


# ---------------------------------------------------------------------------------------------
# audiocraft
# ---------------------------------------------------------------------------------------------


def test_patch_audiocraft_inference_and_unpatch():
    ac = build_audiocraft()
    ac64 = float64_twin(ac)
    originals = (ac.encoder, ac.decoder, ac.quantizer)
    x = torch.randn(2, 1, 77) * 0.3
    with torch.no_grad():
        codes0, _ = ac.encode(x)
        audio0 = ac.decode(codes0)
        emb0 = ac.encoder(x)
    before = _tensors(ac)
    holder = MusicGenLike(ac)
    assert fastcodec.patch(holder) is holder and fastcodec.is_patched(holder)
    assert isinstance(ac.encoder, fastcodec.SEANetEncoder) and isinstance(ac.decoder, fastcodec.SEANetDecoder)
    assert isinstance(ac.quantizer, fastcodec.ResidualVectorQuantizer)
    _same_tensors(before, ac)
    with torch.no_grad():
        codes, scale = ac.encode(x)
        assert scale is None
        assert_codes_equivalent(codes, codes0, emb0, _codebooks(originals[2]))
        assert torch.equal(ac.decode_latent(codes0), originals[2].decode(codes0))  # bitwise
        assert_within(ac.decode(codes0), audio0, ac64.decode(codes0), "decode")
    fastcodec.patch(holder)  # a second patch does nothing
    assert ac.encoder is not originals[0] and isinstance(ac.encoder, fastcodec.SEANetEncoder)
    ac.set_num_codebooks(2)  # changed while patched: kept by unpatch
    fastcodec.unpatch(holder)
    assert (ac.encoder, ac.decoder, ac.quantizer) == originals and not fastcodec.is_patched(holder)
    assert ac.num_codebooks == 2
    _same_tensors(before, ac)
    with torch.no_grad():
        ac.set_num_codebooks(4)
        assert torch.equal(ac.encode(x)[0], codes0)  # the original modules again: bitwise


def test_patch_audiocraft_training_step():
    """One training step (EMA codebook update + backward) on the patched model against the unpatched twin."""
    ac, twin = build_audiocraft(), build_audiocraft()
    twin.load_state_dict(ac.state_dict())
    ac.train()
    twin.train()
    before = _tensors(ac)
    fastcodec.patch(ac)
    x = torch.randn(2, 1, 64) * 0.3
    torch.manual_seed(1)
    res = ac(x)
    (res.x.pow(2).mean() + res.penalty).backward()
    torch.manual_seed(1)
    ref = twin(x)
    (ref.x.pow(2).mean() + ref.penalty).backward()
    _same_tensors(before, ac)  # EMA wrote the same buffers in place
    assert torch.equal(res.codes, ref.codes)
    # float32 reorderings only: the fast convs and EMA sums differ from ATen's by a few ulp (measured <= 4e-7
    # on outputs ~1 and <= 5e-9 on gradients ~1e-2 on an AMD EPYC Zen 2); 1e-5 relative is 50x that
    assert torch.allclose(res.x, ref.x, rtol=0, atol=1e-5 * ref.x.abs().max().item())
    grads = 0
    for (name, p), (_, q) in zip(ac.named_parameters(), twin.named_parameters()):
        assert p.grad is not None, f"{name}: no gradient reached the shared parameter"
        assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-5 * q.grad.abs().max().item() + 1e-12), name
        grads += 1
    assert grads == len(list(twin.parameters()))
    for k, v in twin.state_dict().items():
        if "_codebook" in k:  # EMA buffers: float32 sums in another order
            assert torch.allclose(ac.state_dict()[k], v, rtol=1e-5, atol=1e-6), k
    fastcodec.unpatch(ac)
    _same_tensors(before, ac)


def test_patch_rejects_unknown_objects():
    with pytest.raises(TypeError, match="not a codec"):
        fastcodec.patch(torch.nn.Linear(2, 2))
    assert not fastcodec.is_patched(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------


def build_transformers(seed: int = 0, dtype=torch.float32):
    """A tiny transformers EncodecModel with MusicGen-32 kHz's layout (non-causal, weight norm, constant pad)."""
    from transformers import EncodecConfig, EncodecModel

    torch.manual_seed(seed)
    cfg = EncodecConfig(target_bandwidths=[0.048, 0.096], sampling_rate=32, audio_channels=1, normalize=False,
                        chunk_length_s=None, overlap=None, hidden_size=16, num_filters=4, num_residual_layers=1,
                        upsampling_ratios=[4, 2], norm_type="weight_norm", kernel_size=7, last_kernel_size=7,
                        residual_kernel_size=3, dilation_growth_rate=2, use_causal_conv=False, pad_mode="constant",
                        compress=2, num_lstm_layers=2, trim_right_ratio=1.0, codebook_size=64, codebook_dim=16,
                        use_conv_shortcut=False)
    model = EncodecModel(cfg)
    with torch.no_grad():
        for layer in model.quantizer.layers:
            layer.codebook.embed.normal_()
        for name, p in model.named_parameters():
            if name.endswith("original0"):  # weight norm's g
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    return model.to(dtype).eval()


def _hf_codebooks(hf):
    return torch.stack([layer.codebook.embed for layer in hf.quantizer.layers]).detach()


def test_patch_transformers_inference_and_unpatch():
    hf = build_transformers()
    hf64 = build_transformers(dtype=torch.float64)
    hf64.load_state_dict(hf.state_dict())
    assert hf.quantizer.num_quantizers == 4
    x = torch.randn(2, 1, 77) * 0.3
    with torch.no_grad():
        enc0 = hf.encode(x, bandwidth=0.096)
        audio0 = hf.decode(enc0.audio_codes, enc0.audio_scales).audio_values
        audio64 = hf64.decode(enc0.audio_codes, enc0.audio_scales).audio_values
        emb0 = hf.encoder(x)
        codes_k2 = hf.encode(x, bandwidth=0.048).audio_codes
    before = _tensors(hf)
    holder = MusicGenLike(type("HFEncodecCompressionModel", (), {"model": hf})())  # audiocraft's HF wrapper
    fastcodec.patch(holder)
    assert fastcodec.is_patched(hf)
    _same_tensors(before, hf)
    with torch.no_grad():
        enc = hf.encode(x, bandwidth=0.096)
        codes = enc.audio_codes[0]
        assert codes.shape == enc0.audio_codes[0].shape == (2, 4, 10)
        assert_codes_equivalent(codes, enc0.audio_codes[0], emb0, _hf_codebooks(hf))
        assert torch.equal(hf.encode(x, bandwidth=0.048).audio_codes, codes_k2)  # 2 codebooks at 0.048 kbps
        assert torch.equal(hf.quantizer.decode(codes.transpose(0, 1)), hf.quantizer.layers[0].decode(codes[:, 0])
                           + hf.quantizer.layers[1].decode(codes[:, 1]) + hf.quantizer.layers[2].decode(codes[:, 2])
                           + hf.quantizer.layers[3].decode(codes[:, 3]))
        audio = hf.decode(enc0.audio_codes, enc0.audio_scales).audio_values
        assert_within(audio, audio0, audio64, "decode")
    fastcodec.unpatch(holder)
    assert not fastcodec.is_patched(hf) and "forward" not in vars(hf.encoder) and "encode" not in vars(hf.quantizer)
    _same_tensors(before, hf)
    with torch.no_grad():
        assert torch.equal(hf.decode(enc0.audio_codes, enc0.audio_scales).audio_values, audio0)


def test_patch_transformers_follows_replaced_tensors_and_trains():
    hf, twin = build_transformers(), build_transformers()
    twin.load_state_dict(hf.state_dict())
    fastcodec.patch(hf)
    # a new codebook object (load_state_dict(assign=True)) is used at the next call
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    state["quantizer.layers.0.codebook.embed"] = torch.randn_like(state["quantizer.layers.0.codebook.embed"])
    hf.load_state_dict(state, assign=True)
    twin.load_state_dict(state)
    x = torch.randn(1, 1, 48) * 0.3
    with torch.no_grad():
        emb = twin.encoder(x)
        assert_codes_equivalent(hf.quantizer.encode(emb).transpose(0, 1), twin.quantizer.encode(emb).transpose(0, 1),
                                emb, _hf_codebooks(twin))
    # gradients reach the model's own parameters (weight-norm parametrizations included) through the fast SEANet
    hf.train()
    twin.train()
    hf.decoder(hf.encoder(x)).pow(2).mean().backward()
    twin.decoder(twin.encoder(x)).pow(2).mean().backward()
    n = 0
    for (name, p), (_, q) in zip(hf.named_parameters(), twin.named_parameters()):
        assert p.grad is not None, f"{name}: no gradient"
        # float32 reorderings only (see test_patch_audiocraft_training_step)
        assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-5 * q.grad.abs().max().item() + 1e-12), name
        n += 1
    assert n > 20


def test_patched_benchmark_runs_and_writes_json(tmp_path, monkeypatch):
    """``python -m fastcodec.bench.patched`` end to end, on tiny widths (the timing is not the point here)."""
    import json

    from fastcodec.bench import patched

    monkeypatch.setattr(patched, "MUSICGEN_SEANET", {**patched.MUSICGEN_SEANET, "n_filters": 2, "dimension": 8})
    monkeypatch.setattr(patched, "MUSICGEN_BINS", 16)
    monkeypatch.setattr(patched, "HF_32KHZ", {**patched.HF_32KHZ, "num_filters": 2, "hidden_size": 8,
                                              "codebook_dim": 8, "codebook_size": 16})
    out = tmp_path / "patched.json"
    assert patched.main(["--seconds", "0.05", "--batch", "1", "--repeats", "1", "--threads", "1",
                         "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["batch"]) for r in rows] == [("audiocraft", 1), ("transformers", 1)]
    assert all(r["patched_ms"] > 0 and r["unpatched_ms"] > 0 and "codes equal" in r["check"] for r in rows)
