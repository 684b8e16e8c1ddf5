"""Ragged batches (``fastcodec.ragged``): each clip of a batch of different lengths gets exactly the frames of
``model.encode(clip[None])``, for causal (24 kHz), non-causal (MusicGen 32 kHz) and segmented (48 kHz) models.

Exactness: the equality is bitwise (codes and scales with ``torch.equal``, latents too), not a tolerance: the
batched path computes every valid sample from the same numbers with the same arithmetic (see the module doc
of ``fastcodec.ragged``), so no near-tie rule is needed. The models are tiny (n_filters 4, dimension 16) with
the presets' layer structure; weight_g is perturbed so a wrong weight-norm fold cannot hide.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastcodec
from fastcodec import ragged
from fastcodec.model import EncodecModel

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning"),
    # the shared 2-core machine runs several suites at once: OpenMP barriers then wait on descheduled threads
    pytest.mark.usefixtures("one_torch_thread"),
]


def _model(sample_rate, channels, causal, norm, ratios, bins, n_q, normalize=False, segment=None,
           pad_mode="reflect", seed=0) -> EncodecModel:
    torch.manual_seed(seed)
    kw = dict(channels=channels, dimension=16, n_filters=4, n_residual_layers=1, ratios=ratios, norm=norm,
              causal=causal, pad_mode=pad_mode, true_skip=False, compress=2, lstm=2)
    enc, dec = fastcodec.SEANetEncoder(**kw), fastcodec.SEANetDecoder(**kw)
    quantizer = fastcodec.ResidualVectorQuantizer(dimension=16, n_q=n_q, bins=bins)
    per_codebook = math.log2(bins) * math.ceil(sample_rate / math.prod(ratios)) / 1000
    model = EncodecModel(enc, dec, quantizer, [per_codebook * n_q / 2, per_codebook * n_q], sample_rate,
                         channels, normalize=normalize, segment=segment).eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "weight_g"):
                m.weight_g.mul_(torch.empty_like(m.weight_g).uniform_(0.5, 1.5))
        sigma = model.encoder(torch.randn(1, channels, 4000)).std().item()
        for k, layer in enumerate(model.quantizer.vq.layers):
            layer._codebook.embed.copy_(torch.randn_like(layer._codebook.embed) * sigma * 0.6 ** k)
            layer._codebook.inited.fill_(1.0)
    return model


# name: (builder arguments, longest clip in samples)
MODELS = {
    # the 24 kHz preset's structure (causal, weight_norm, reflect), hop 320, and a hop-24 variant (more frames
    # per sample, so the tests reach long clips cheaply)
    "causal": (dict(sample_rate=24_000, channels=1, causal=True, norm="weight_norm", ratios=[8, 5, 4, 2],
                    bins=64, n_q=4), 8000),
    "causal-hop24": (dict(sample_rate=24_000, channels=1, causal=True, norm="weight_norm", ratios=[4, 3, 2],
                          bins=64, n_q=4), 2500),
    # MusicGen's 32 kHz: non-causal, reflect at both ends of every layer, ratios [8, 5, 4, 4], 2048 bins, 4 books
    "noncausal": (dict(sample_rate=32_000, channels=1, causal=False, norm="weight_norm", ratios=[8, 5, 4, 4],
                       bins=2048, n_q=4), 16000),
    "noncausal-constant": (dict(sample_rate=32_000, channels=1, causal=False, norm="weight_norm", ratios=[4, 3, 2],
                                bins=64, n_q=4, pad_mode="constant"), 2500),
    # the 48 kHz preset's structure (stereo, time_group_norm, normalised 1 s segments) at 960 Hz: 960-sample
    # segments every 950
    "segmented": (dict(sample_rate=960, channels=2, causal=False, norm="time_group_norm", ratios=[4, 2], bins=64,
                       n_q=4, normalize=True, segment=1.0), 3000),
}


@pytest.fixture(scope="module")
def models():
    return {name: _model(**kw) for name, (kw, _) in MODELS.items()}


def _assert_same(got, model, clips, name=""):
    assert len(got) == len(clips)
    for i, (frames, clip) in enumerate(zip(got, clips)):
        expected = model.encode(clip[None])
        assert len(frames) == len(expected), (name, i, clip.shape)
        for (codes, scale), (codes_e, scale_e) in zip(frames, expected):
            assert codes.shape == codes_e.shape and codes.dtype == codes_e.dtype, (name, i, codes.shape, codes_e.shape)
            assert torch.equal(codes, codes_e), (name, i, clip.shape, int((codes != codes_e).sum()))
            assert (scale is None) == (scale_e is None), (name, i)
            assert scale is None or torch.equal(scale, scale_e), (name, i)


def _clips(model, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(model.channels, n, generator=g) for n in lengths]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_batches_equal_one_at_a_time(models, data):
    """Property: any composition of lengths, any model type, either API: exactly the clips' own frames."""
    name = data.draw(st.sampled_from(sorted(MODELS)), label="model")
    model, longest = models[name], MODELS[name][1]
    lengths = data.draw(st.lists(st.integers(1, longest), min_size=1, max_size=5), label="lengths")
    clips = _clips(model, lengths, seed=len(lengths))
    if data.draw(st.booleans(), label="padded API"):
        x = torch.full((len(clips), model.channels, max(lengths) + 3), float("nan"))  # padding is never read
        for b, c in enumerate(clips):
            x[b, :, :c.shape[-1]] = c
        got = ragged.encode_padded(model, x, lengths)
    else:
        got = ragged.encode_batch(model, clips)
    _assert_same(got, model, clips, name)


# lengths around the hop, the short-input reflect rule, the fused resblock's 1024-sample threshold, duplicates
EDGES = {
    "causal": [1, 2, 319, 320, 321, 1023, 1024, 2239, 2240, 2241, 4801, 8000, 8000],
    "noncausal": [1, 639, 640, 641, 4479, 4480, 4481, 9999, 16000, 16000],
    "segmented": [1, 949, 950, 959, 960, 961, 1900, 1901, 3000, 3000],
}


@pytest.mark.parametrize("name", list(EDGES))
def test_edge_lengths(models, name):
    model = models[name]
    clips = _clips(model, EDGES[name], seed=3)
    _assert_same(ragged.encode_batch(model, clips), model, clips, name)


@pytest.mark.parametrize("name", ["causal-hop24", "noncausal"])
def test_padded_latents_are_bitwise_the_clips_own(models, name):
    """Stronger than codes: each clip's latents in the padded batch are bitwise its encoder output alone
    (a wrong padding value changes a few latents by ~1e-2 but often no code of a small codebook)."""
    model = models[name]
    plan, hop = model.encoder._fast_plan(), model.encoder.hop_length
    lengths = [n for n in (7 * hop + 1, 2 * hop - 1, 11 * hop, 1500, 9 * hop + hop // 2)
               if not ragged._needs_own_call(plan, n)]
    clips = _clips(model, lengths, seed=5)
    total = ragged._padded_length(plan, lengths, hop)
    x = torch.zeros(len(clips), model.channels, total)
    for b, c in enumerate(clips):
        x[b, :, :c.shape[-1]] = c
    with torch.no_grad():
        z, frames = ragged._run_padded(model.encoder, x, lengths)
        for b, c in enumerate(clips):
            alone = model.encoder(c[None])
            assert frames[b] == alone.shape[-1]
            assert torch.equal(z[b:b + 1, :, :frames[b]], alone), (name, lengths[b])


def test_strategies(models, monkeypatch):
    clip = torch.zeros(1, 100)
    assert ragged.strategy(models["causal"], clip) == "padded"
    assert ragged.strategy(models["noncausal"], clip) == "padded"
    assert ragged.strategy(models["segmented"], torch.zeros(2, 100)) == "segments"
    monkeypatch.setenv("FASTCODEC_BACKEND", "reference")
    assert ragged.strategy(models["causal"], clip) == "one-at-a-time"


def test_whole_signal_norm_groups_equal_lengths():
    """time_group_norm without segments normalises over the whole clip: only equal lengths batch."""
    model = _model(960, 2, False, "time_group_norm", [4, 2], 64, 4, normalize=True)
    clips = _clips(model, [300, 77, 300, 77, 5, 300])
    assert ragged.strategy(model, clips[0]) == "equal-length"
    _assert_same(ragged.encode_batch(model, clips), model, clips)


def test_reference_backend_runs_one_at_a_time(models, monkeypatch):
    model = models["causal-hop24"]
    clips = _clips(model, [100, 250, 37])
    monkeypatch.setenv("FASTCODEC_BACKEND", "reference")
    _assert_same(ragged.encode_batch(model, clips), model, clips)


def test_small_batch_budget_same_result(models, monkeypatch):
    model = models["causal-hop24"]
    clips = _clips(model, [2500, 30, 1200, 1200, 700, 1])
    full = ragged.encode_batch(model, clips)  # one batch of all
    assert ragged.MAX_BATCH_SAMPLES["cpu"] >= 6 * 2500
    monkeypatch.setitem(ragged.MAX_BATCH_SAMPLES, "cpu", 2600)  # batches of 1-2 clips
    _assert_same(ragged.encode_batch(model, clips), model, clips)
    for a, b in zip(full, ragged.encode_batch(model, clips)):
        assert torch.equal(a[0][0], b[0][0])


def test_bandwidth_and_mask(models):
    model = models["segmented"]
    low, high = model.target_bandwidths
    model.set_target_bandwidth(high)
    clips = _clips(model, [1200, 960, 3])
    x = torch.zeros(3, 2, 1200)
    mask = torch.zeros(3, 1200, dtype=torch.bool)
    for b, c in enumerate(clips):
        x[b, :, :c.shape[-1]] = c
        mask[b, :c.shape[-1]] = True
    got = ragged.encode_padded(model, x, mask, bandwidth=low)
    assert model.bandwidth == high and model.quantizer.n_q == 4  # restored
    assert got[0][0][0].shape[1] == 2
    model.set_target_bandwidth(low)
    try:
        _assert_same(got, model, clips)
        _assert_same(ragged.encode_padded(model, x, torch.tensor([1200, 960, 3])), model, clips)
    finally:
        model.set_target_bandwidth(high)


def test_bad_input_raises_clear_errors(models):
    model = models["causal-hop24"]
    ok = torch.zeros(1, 50)
    cases = [
        ([], ValueError, "empty"),
        (torch.zeros(2, 1, 50), TypeError, "sequence"),
        ([ok, torch.zeros(50)], ValueError, r"wavs\[1\] must be \(channels, samples\)"),
        ([torch.zeros(2, 50)], ValueError, r"wavs\[0\] has 2 channel"),
        ([ok, torch.zeros(1, 50, dtype=torch.int64)], TypeError, r"wavs\[1\] must be a floating"),
        ([torch.zeros(1, 0)], ValueError, r"wavs\[0\] is empty"),
        ([ok, torch.full((1, 5), float("nan"))], ValueError, r"wavs\[1\] contains NaN"),
        ([ok, ok.double()], ValueError, "share dtype and device"),
        ([ok, "audio"], TypeError, r"wavs\[1\] must be a torch.Tensor"),
    ]
    for wavs, exc, match in cases:
        with pytest.raises(exc, match=match):
            ragged.encode_batch(model, wavs)
    x = torch.zeros(2, 1, 10)
    bad_masks = [
        (torch.tensor([[True] * 5 + [False, True] + [False] * 3] * 2), ValueError, "prefix"),
        (torch.ones(2, 9, dtype=torch.bool), ValueError, r"padding_mask must be \(batch, samples\)"),
        (torch.zeros(2, 10, dtype=torch.bool), ValueError, "length of clip 0 is 0"),
        ([10, 11], ValueError, r"clip 1 is 11: must be in \[1, 10\]"),
        ([10], ValueError, "1 lengths for a batch of 2"),
        (torch.ones(2), TypeError, "integer lengths"),
        ("10", TypeError, "integer lengths"),
    ]
    for mask, exc, match in bad_masks:
        with pytest.raises(exc, match=match):
            ragged.encode_padded(model, x, mask)
    with pytest.raises(ValueError, match=r"x must be a \(batch, channels, samples\)"):
        ragged.encode_padded(model, torch.zeros(1, 10), [10])
    with pytest.raises(ValueError, match="bandwidth"):
        ragged.encode_batch(model, [ok], bandwidth=123.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["causal", "noncausal", "segmented"])
def test_cuda_edge_lengths(models, name):
    model = models[name].cuda()
    clips = [c.cuda() for c in _clips(model, EDGES[name], seed=3)]
    try:
        _assert_same(ragged.encode_batch(model, clips), model, clips, name)
    finally:
        models[name].cpu()
