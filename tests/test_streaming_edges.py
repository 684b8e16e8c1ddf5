"""Streaming edge cases of the codec halves (``stream_encode`` / ``stream_encode_flush`` / ``stream_decode``):
zero-frame codes (what the first chunks of a stream yield) decode to empty audio, and the flush returns
exactly the frames the offline pass has beyond those the chunks emitted, for input lengths that are and
are not multiples of the hop. A tiny causal model (hop 4) keeps this fast; codes compare exactly (the stream
runs the same quantizer on the same latents up to float32 rounding of the reordered sums, and the latents
here are far from ties: checked through the certified near-tie rule)."""
from __future__ import annotations

import pytest
import torch

import fastcodec
from tests.utils import assert_codes_equivalent

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning"),
    # tiny shapes on a shared 2-core machine: a 2-thread OpenMP barrier waits on a descheduled thread
    pytest.mark.usefixtures("one_torch_thread"),
]

HOP = 4


def _tiny_model() -> fastcodec.EncodecModel:
    kw = dict(channels=1, dimension=8, n_filters=4, n_residual_layers=1, ratios=[2, 2], norm="weight_norm",
              causal=True, pad_mode="reflect", true_skip=False, compress=2, lstm=1)
    enc = fastcodec.SEANetEncoder(**kw)
    dec = fastcodec.SEANetDecoder(**kw, trim_right_ratio=1.0)
    q = fastcodec.ResidualVectorQuantizer(dimension=8, n_q=2, bins=16)
    with torch.no_grad():
        for layer in q.vq.layers:
            layer._codebook.embed.normal_()
            layer._codebook.inited.fill_(1)
    model = fastcodec.EncodecModel(enc, dec, q, target_bandwidths=[1.0], sample_rate=16, channels=1)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return _tiny_model()


@pytest.mark.parametrize("n,chunk", [(4, 4), (8, 4), (16, 4), (32, 4), (32, 32), (33, 4), (7, 3), (1, 1),
                                     (64, 5)])
def test_flush_completes_offline_codes(model, n, chunk):
    wav = torch.randn(2, 1, n)
    offline = model.encode(wav)[0][0]
    st = model.encode_state(2)
    parts = []
    for i in range(0, n, chunk):
        codes, st = model.stream_encode(wav[..., i:i + chunk], st)
        parts.append(codes)
    tail = model.stream_encode_flush(st)
    assert tail.dim() == 3 and tail.shape[:2] == offline.shape[:2] and tail.dtype == torch.long
    streamed = torch.cat(parts + [tail], -1)
    assert streamed.shape == offline.shape
    emb = model.encoder(wav)
    assert_codes_equivalent(streamed, offline, emb, model.quantizer.codebooks())
    # what the offline pass has beyond the chunks' frames: nothing more, nothing less
    emitted = sum(p.shape[-1] for p in parts)
    assert tail.shape[-1] == offline.shape[-1] - emitted


def test_stream_decode_accepts_zero_frames(model):
    enc_st, dec_st = model.encode_state(1), model.decode_state(1)
    codes, enc_st = model.stream_encode(torch.randn(1, 1, 1), enc_st)  # the first sample: no frame yet
    assert codes.shape == (1, model.quantizer.num_codebooks, 0)
    audio, dec_st = model.stream_decode(codes, dec_st)
    assert audio.shape == (1, 1, 0) and audio.dtype == torch.float32
    # the state is untouched: a later real frame decodes as in a fresh stream
    more, _ = model.stream_encode(torch.randn(1, 1, 64), enc_st)
    a1, _ = model.stream_decode(more, dec_st)
    a2, _ = model.stream_decode(more, model.decode_state(1))
    assert torch.equal(a1, a2)


def test_readme_streaming_loop_runs_literally(model):
    """The README's loop, chunk by chunk through encode and decode, then both flushes, for a length that is
    a multiple of the hop (the flush yields zero frames) and one that is not."""
    for n in (8 * HOP, 8 * HOP + 3):
        wav = torch.randn(1, 1, n)
        st, dst = model.encode_state(1), model.decode_state(1)
        out = []
        for i in range(0, n, HOP):
            codes, st = model.stream_encode(wav[..., i:i + HOP], st)
            audio, dst = model.stream_decode(codes, dst)
            out.append(audio)
        codes = model.stream_encode_flush(st)
        audio, dst = model.stream_decode(codes, dst)
        out += [audio, model.stream_decode_flush(dst)]
        offline = model.decode(model.encode(wav))
        streamed = torch.cat(out, -1)
        assert streamed.shape == offline.shape
        # float32 rounding of the reordered sums (tests/test_streaming.py measures it); a slip of a frame is O(1)
        assert torch.allclose(streamed, offline, atol=1e-5, rtol=0)


def test_zero_frame_codes_still_checked(model):
    dst = model.decode_state(1)
    with pytest.raises(TypeError, match="integer"):
        model.stream_decode(torch.zeros(1, 2, 0), dst)
    with pytest.raises(ValueError, match="batch"):
        model.stream_decode(torch.zeros(3, 2, 0, dtype=torch.long), dst)
    with pytest.raises(ValueError, match="codebooks"):
        model.stream_decode(torch.zeros(1, 5, 0, dtype=torch.long), dst)
    with pytest.raises(TypeError, match="StreamState"):
        model.stream_decode(torch.zeros(1, 2, 0, dtype=torch.long), object())
