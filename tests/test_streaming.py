"""Exact streaming (``fastcodec.streaming``): ``cat(stream(c1), stream(c2), ..., stream_flush())`` against
the offline pass of ``cat(c1, c2, ...)``, for every split.

Tolerances. float64: the stream runs the same arithmetic as the offline pass in another summation order
(chunked GEMMs, LSTM steps), so the difference is float64 rounding: measured <= 7.1e-16 on outputs
of magnitude ~0.1; bound 1e-12, while any padding/overlap/state slip is >= 1e-3. float32: the bound is
relative to PyTorch's own float32 error, ``err32 = max|offline32 - offline64|``; over 60 random splits
(0.1-0.5 s, chunks 1..T samples) the stream's error ``max|stream32 - offline64|`` measured <= 1.41 * err32
(the small-frame GEMMs and the LSTM steps sum in another order), so the bound is 3 * err32.
"""
from __future__ import annotations

import contextlib
import copy
import io
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastcodec import _build, steps
from fastcodec import streaming as S
from fastcodec.ops import stream as stream_ops
from fastcodec.reference.conv import StreamableConv1d
from fastcodec.reference.model import EncodecModel
from fastcodec.reference.seanet import SEANetDecoder, SEANetEncoder
from tests.utils import assert_codes_equivalent, max_abs_err, requires_cuda

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning"),
    # the shared 2-core machine runs several suites at once: a 2-thread OpenMP barrier then waits on a
    # descheduled thread, measured 40x slower (0.3 s of audio through the encoder: 2.7 s vs 0.065 s)
    pytest.mark.usefixtures("one_torch_thread"),
]

F64_ATOL = 1e-12  # float64 rounding of a reordered sum: measured <= 7.1e-16 (see the module docstring)
F32_FACTOR = 3.0  # stream32 vs offline64 over offline32 vs offline64: measured <= 1.41
HOP = 320


def _perturb_weight_norm(model: torch.nn.Module) -> None:
    # weight_norm starts at g = ||v||, which would hide a wrong fold
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "weight_g"):
                m.weight_g.mul_(torch.empty_like(m.weight_g).uniform_(0.5, 1.5))


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model24():
    """The causal 24 kHz codec (random weights) at 6 kbps, codebooks set, and its float64 copy."""
    torch.manual_seed(1234)
    model = S.StreamingEncodecModel.encodec_model_24khz()
    _perturb_weight_norm(model)
    with torch.no_grad():
        z = model.encoder(torch.randn(1, 1, 4 * HOP))
        sigma = z.std().item()
        for k, layer in enumerate(model.quantizer.vq.layers):
            layer._codebook.embed.copy_(torch.randn_like(layer._codebook.embed) * sigma * 0.6 ** k)
            layer._codebook.inited.fill_(1.0)
    model.set_target_bandwidth(6.0)
    return model, copy.deepcopy(model).double()


def _run(module, x: torch.Tensor, sizes, state=None):
    """Stream ``x`` (B, C, T) in chunks of ``sizes``; returns (cat of outputs + flush, per-chunk lengths)."""
    state = S.stream_state(module, x.shape[0]) if state is None else state
    outs, i = [], 0
    for n in sizes:
        y, state = S.stream(module, x[..., i:i + n], state)
        outs.append(y)
        i += n
    assert i == x.shape[-1]
    outs.append(S.stream_flush(module, state))
    return torch.cat(outs, -1), [o.shape[-1] for o in outs]


def _split(total: int, kind: str, seed: int = 0, unit: int = HOP) -> list[int]:
    if kind == "huge":
        return [total]
    if kind == "single":
        return [1] * total
    if kind == "hop":
        step = unit
    elif kind == "odd":
        step = 97 if unit > 1 else 3
    else:
        rng, sizes = random.Random(seed), []
        while total > 0:
            sizes.append(min(total, rng.randint(1, 3 * unit)))
            total -= sizes[-1]
        return sizes
    return [step] * (total // step) + ([total % step] if total % step else [])


def _assert_f32(streamed: torch.Tensor, offline32: torch.Tensor, offline64: torch.Tensor, name: str) -> None:
    assert streamed.shape == offline32.shape, f"{name}: shape {tuple(streamed.shape)} != {tuple(offline32.shape)}"
    err32 = max_abs_err(offline32, offline64)
    err = max_abs_err(streamed, offline64)
    assert err <= F32_FACTOR * err32, (f"{name}: stream error {err:.3e} vs float64 exceeds {F32_FACTOR} x the "
                                       f"offline float32 error {err32:.3e}")


@pytest.mark.parametrize("kind,seconds", [("huge", 0.3), ("hop", 0.3), ("odd", 0.3), ("random", 0.5),
                                          ("single", 0.1)])
def test_encoder_stream_equals_offline(model24, kind, seconds):
    model, model64 = model24
    x = torch.randn(1, 1, int(seconds * 24000))
    with torch.no_grad():
        off32, off64 = model.encoder(x), model64.encoder(x.double())
    y, _ = _run(model.encoder, x, _split(x.shape[-1], kind, seed=3))
    _assert_f32(y, off32, off64, f"encoder/{kind}")


@pytest.mark.parametrize("kind", ["huge", "hop", "odd", "random"])
def test_decoder_stream_equals_offline(model24, kind):
    model, model64 = model24
    z = torch.randn(1, 128, 30) * 0.1  # 0.4 s of latents
    with torch.no_grad():
        off32, off64 = model.decoder(z), model64.decoder(z.double())
    y, _ = _run(model.decoder, z, _split(z.shape[-1], kind, seed=5, unit=1))
    _assert_f32(y, off32, off64, f"decoder/{kind}")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_splits_float64(model24, data):
    """Any split, float64: the stream is the offline pass up to float64 rounding (encoder and decoder)."""
    _, model64 = model24
    side = data.draw(st.sampled_from(["encoder", "decoder"]), label="side")
    if side == "encoder":
        total = data.draw(st.integers(1, 4800), label="samples")
        x = torch.randn(1, 1, total, dtype=torch.float64)
        max_chunk = data.draw(st.sampled_from([7, 320, 1000, 4800]), label="max_chunk")
    else:
        total = data.draw(st.integers(1, 24), label="frames")
        x = torch.randn(1, 128, total, dtype=torch.float64) * 0.1
        max_chunk = data.draw(st.sampled_from([1, 3, 24]), label="max_chunk")
    sizes, left = [], total
    while left:
        sizes.append(data.draw(st.integers(1, min(left, max_chunk))))
        left -= sizes[-1]
    module = getattr(model64, side)
    with torch.no_grad():
        expected = module(x)
    y, _ = _run(module, x, sizes)
    assert y.shape == expected.shape
    assert max_abs_err(y, expected) <= F64_ATOL


def test_startup_delay_is_the_reflect_padding(model24):
    """24 kHz, reflect: nothing before 7 frames of input (the last conv mirrors 6 frames), then 7 frames at
    once, then one per 320 samples; the last partial frame only at flush. Zero padding: no delay."""
    model, _ = model24
    x = torch.randn(1, 1, 10 * HOP + 5)
    _, lens = _run(model.encoder, x, _split(x.shape[-1], "hop"))
    assert lens == [0] * 6 + [7, 1, 1, 1, 0, 1]
    zero = S.StreamingSEANetEncoder(channels=1, dimension=128, n_filters=32, n_residual_layers=1,
                                    ratios=[8, 5, 4, 2], norm="weight_norm", causal=True, pad_mode="constant",
                                    true_skip=False, lstm=2)
    y, lens = _run(zero, x, _split(x.shape[-1], "hop"))
    assert lens == [1] * 10 + [0, 1]
    with torch.no_grad():
        _assert_f32(y, zero(x), copy.deepcopy(zero).double()(x.double()), "zero-padded encoder")
    _, lens = _run(model.decoder, torch.randn(1, 128, 9) * 0.1, [1] * 9)
    assert lens == [0] * 6 + [7 * HOP, HOP, HOP, 0]


def test_codec_stream_codes_and_audio(model24):
    model, model64 = model24
    x = torch.randn(2, 1, 7000)
    sizes = _split(x.shape[-1], "random", seed=11)
    with torch.no_grad():
        latent = model.encoder(x)
        codes_off = model.encode(x)[0][0]
        audio_off = model(x)
    state = model.encode_state(2)
    parts = []
    for i, n in zip([sum(sizes[:j]) for j in range(len(sizes))], sizes):
        codes, state = model.stream_encode(x[..., i:i + n], state)
        assert codes.dtype == torch.long and codes.shape[:2] == (2, 8)
        parts.append(codes)
    parts.append(model.stream_encode_flush(state))
    codes = torch.cat(parts, -1)
    assert_codes_equivalent(codes, codes_off, latent, model.quantizer.codebooks()[:8])

    dstate = model.decode_state(2)
    audio = [model.stream_decode(codes[..., t:t + 2], dstate)[0] for t in range(0, codes.shape[-1], 2)]
    audio = torch.cat(audio + [model.stream_decode_flush(dstate)], -1)
    with torch.no_grad():
        decoded_off, decoded64 = model.decode(codes), model64.decode(codes)
        # the float64 oracle of the round trip decodes the offline float32 codes (float64 codes could flip)
        audio64 = model64.decode(codes_off)[..., :x.shape[-1]]
    assert audio.shape == (2, 1, codes.shape[-1] * HOP)
    _assert_f32(audio, decoded_off, decoded64, "stream_decode")

    rt, _ = _run(model, x, sizes)
    assert rt.shape == x.shape  # forward's trim to the input length
    _assert_f32(rt, audio_off, audio64, "audio -> codes -> audio")


def test_non_causal_configs_are_refused():
    m48 = EncodecModel.encodec_model_48khz()
    with pytest.raises(S.NotStreamableError, match="non-causal"):
        S.stream_state(m48, 1)
    with pytest.raises(S.NotStreamableError, match="non-causal"):
        S.StreamingEncodecModel.encodec_model_48khz().encode_state(1)
    musicgen32 = dict(channels=1, dimension=128, n_filters=64, n_residual_layers=1, ratios=[8, 5, 4, 4],
                      norm="weight_norm", causal=False, pad_mode="constant", true_skip=True, compress=2, lstm=2)
    for cls in (SEANetEncoder, SEANetDecoder):
        with pytest.raises(S.NotStreamableError, match="non-causal.*future"):
            S.stream_state(cls(**musicgen32), 1)
    circular = SEANetEncoder(**{**SMALL, "pad_mode": "circular"})
    with pytest.raises(S.NotStreamableError, match="circular"):
        S.stream_state(circular, 1)


def test_state_copy_branches_independently(model24):
    model, _ = model24
    enc = model.encoder
    x = torch.randn(1, 1, 12 * HOP)
    state = enc.stream_state(1)
    for i in range(8):
        enc.stream(x[..., i * HOP:(i + 1) * HOP], state)
    fork = state.copy()
    a = enc.stream(x[..., 8 * HOP:12 * HOP], state)[0]
    b_other = enc.stream(torch.randn(1, 1, 4 * HOP), fork.copy())[0]
    b = enc.stream(x[..., 8 * HOP:12 * HOP], fork)[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, b_other)
    assert torch.equal(enc.stream_flush(state), enc.stream_flush(fork))


def test_state_dict_round_trip(model24):
    model, _ = model24
    x = torch.randn(1, 1, 9 * HOP + 17)
    state = model.stream_state(1)
    model.stream(x[..., :5 * HOP + 3], state)
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    buf.seek(0)
    loaded = model.stream_state(1).load_state_dict(torch.load(buf, weights_only=True))
    a = torch.cat([model.stream(x[..., 5 * HOP + 3:], state)[0], model.stream_flush(state)], -1)
    b = torch.cat([model.stream(x[..., 5 * HOP + 3:], loaded)[0], model.stream_flush(loaded)], -1)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="does not match"):
        model.encoder.stream_state(1).load_state_dict(model.decoder.stream_state(1).state_dict())


def test_state_to_and_dtype(model24):
    _, model64 = model24
    enc = model64.encoder
    x = torch.randn(1, 1, 3 * HOP, dtype=torch.float64)
    state = enc.stream_state(1)
    enc.stream(x[..., :HOP], state)
    moved = state.to("cpu")
    assert moved is not state and moved.slots[0].buf is not state.slots[0].buf
    assert torch.equal(enc.stream(x[..., HOP:], moved)[0], enc.stream(x[..., HOP:], state)[0])
    with pytest.raises(TypeError, match="dtype"):
        enc.stream(x[..., :HOP].float(), state)


@requires_cuda
def test_stream_on_cuda(model24):
    model, model64 = model24
    enc = copy.deepcopy(model.encoder)
    x = torch.randn(1, 1, 6000)
    state = enc.stream_state(1)
    y0, state = enc.stream(x[..., :2000], state)
    enc.cuda()
    state = state.to("cuda")
    y1, state = enc.stream(x[..., 2000:].cuda(), state)
    y = torch.cat([y0, y1.cpu(), enc.stream_flush(state).cpu()], -1)
    with torch.no_grad():
        _assert_f32(y, model.encoder(x), model64.encoder(x.double()), "encoder/cuda")


def test_batched_streams_are_independent(model24):
    model, model64 = model24
    enc = model.encoder
    x = torch.randn(2, 1, 5000)
    sizes = _split(x.shape[-1], "random", seed=2)
    both, _ = _run(enc, x, sizes)
    for b in range(2):
        alone, _ = _run(enc, x[b:b + 1], sizes)
        with torch.no_grad():
            off64 = model64.encoder(x[b:b + 1].double())
            off32 = enc(x[b:b + 1])
        _assert_f32(both[b:b + 1], off32, off64, f"batch row {b}")
        assert max_abs_err(both[b:b + 1], alone) <= 2 * F32_FACTOR * max_abs_err(off32, off64)
    # streams started apart, batched mid-way (cat), picked apart again (select)
    s0, s1 = enc.stream_state(1), enc.stream_state(1)
    enc.stream(x[0:1, :, :2000], s0)
    enc.stream(x[1:2, :, :2000], s1)
    joint = S.StreamState.cat([s0, s1])
    rest = torch.cat([enc.stream(x[..., 2000:], joint)[0], enc.stream_flush(joint)], -1)
    assert max_abs_err(rest[1:2], torch.cat([enc.stream(x[1:2, :, 2000:], s1)[0], enc.stream_flush(s1)], -1)) \
        <= 2 * F32_FACTOR * max_abs_err(off32, off64)
    picked = joint.select(0)
    assert picked.batch_size == 1 and picked.slots[0].buf.shape[0] == 1


def test_memory_is_flat_in_stream_length(model24):
    model, _ = model24
    state = model.stream_state(1)
    shapes = None
    for i in range(60):
        model.stream(torch.randn(1, 1, HOP), state)
        if i == 15:  # past the start-up bursts
            shapes = [(k, tuple(v.shape)) for s in (state.encoder, state.decoder) for slot in s.slots
                      for k, v in vars(slot).items() if isinstance(v, torch.Tensor)]
            nbytes = state.nbytes()
    assert [(k, tuple(v.shape)) for s in (state.encoder, state.decoder) for slot in s.slots
            for k, v in vars(slot).items() if isinstance(v, torch.Tensor)] == shapes
    assert state.nbytes() == nbytes


def test_bad_input_raises_clear_errors(model24):
    model, _ = model24
    enc = model.encoder
    state = enc.stream_state(2)
    with pytest.raises(ValueError, match="1 channels"):
        enc.stream(torch.randn(2, 2, 10), state)
    with pytest.raises(ValueError, match="empty chunk"):
        enc.stream(torch.randn(2, 1, 0), state)
    with pytest.raises(ValueError, match="batch 1 but the state holds 2"):
        enc.stream(torch.randn(1, 1, 10), state)
    with pytest.raises(ValueError, match="shape"):
        enc.stream(torch.randn(2, 10), state)
    with pytest.raises(TypeError, match="torch.Tensor"):
        enc.stream([0.0] * 10, state)
    with pytest.raises(TypeError, match="dtype"):
        enc.stream(torch.zeros(2, 1, 10, dtype=torch.int64), state)
    with pytest.raises(ValueError, match="another module"):
        model.decoder.stream(torch.randn(2, 128, 1), state)
    with pytest.raises(TypeError, match="StreamState"):
        enc.stream(torch.randn(2, 1, 10), {"not": "a state"})
    with pytest.raises(ValueError, match="batch_size"):
        enc.stream_state(0)
    enc.stream_flush(state)
    with pytest.raises(ValueError, match="flushed"):
        enc.stream(torch.randn(2, 1, 10), state)
    with pytest.raises(ValueError, match="NaN"):
        model.stream_encode(torch.full((1, 1, 10), float("nan")), model.encode_state(1))
    with pytest.raises(ValueError, match="out of range"):
        model.stream_decode(torch.full((1, 8, 1), 1024), model.decode_state(1))


SMALL = dict(channels=1, dimension=8, n_filters=4, n_residual_layers=1, ratios=[2, 3], norm="weight_norm",
             causal=True, lstm=1)
CONFIGS = {
    "reflect": dict(),
    "constant": dict(pad_mode="constant"),
    "replicate": dict(pad_mode="replicate"),
    "true-skip-res2-dil3": dict(true_skip=True, n_residual_layers=2, dilation_base=3),
    "odd-ratios-k5": dict(ratios=[5, 3], kernel_size=5, last_kernel_size=3, residual_kernel_size=5),
    "no-lstm-compress1-leakyrelu": dict(lstm=0, compress=1, activation="LeakyReLU",
                                        activation_params={"negative_slope": 0.3}),
    "stereo-lstm2-norm-none": dict(channels=2, lstm=2, norm="none"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_small_configs_float64(name, nan_poison):
    torch.manual_seed(7)
    kw = {**SMALL, **CONFIGS[name]}
    enc = S.StreamingSEANetEncoder(**kw).double()
    dec_kw = dict(trim_right_ratio=0.5, final_activation="Tanh") if name == "reflect" else {}
    dec = S.StreamingSEANetDecoder(**kw, **dec_kw).double()
    _perturb_weight_norm(enc)
    _perturb_weight_norm(dec)
    hop = enc.hop_length
    for total, kind, seed in [(1, "huge", 0), (2, "single", 0), (hop * 3 + 2, "single", 0),
                              (50, "random", 1), (173, "random", 2), (173, "odd", 0)]:
        x = torch.randn(2, kw["channels"], total, dtype=torch.float64)
        with torch.no_grad():
            expected = enc(x)
        y, _ = _run(enc, x, _split(total, kind, seed, unit=hop))
        assert y.shape == expected.shape, (name, total, kind)
        assert max_abs_err(y, expected) <= F64_ATOL, (name, total, kind)
    for frames, kind in [(1, "huge"), (5, "single"), (11, "random"), (11, "odd")]:
        z = torch.randn(2, kw["dimension"], frames, dtype=torch.float64)
        with torch.no_grad():
            expected = dec(z)
        y, _ = _run(dec, z, _split(frames, kind, 4, unit=1))
        assert y.shape == expected.shape, (name, frames, kind)
        assert max_abs_err(y, expected) <= F64_ATOL, (name, frames, kind)


def test_plain_functions_on_reference_modules_and_weight_updates():
    torch.manual_seed(3)
    enc = SEANetEncoder(**SMALL).double()
    x = torch.randn(1, 1, 100, dtype=torch.float64)
    with torch.no_grad():
        expected = enc(x)
    assert max_abs_err(_run(enc, x, _split(100, "random", 9, unit=6))[0], expected) <= F64_ATOL
    other = SEANetEncoder(**SMALL).double()
    _perturb_weight_norm(other)
    enc.load_state_dict(other.state_dict())  # in place: the folded weights must follow
    with torch.no_grad():
        expected = other(x)
    assert max_abs_err(_run(enc, x, _split(100, "random", 9, unit=6))[0], expected) <= F64_ATOL


def test_streaming_context_audiocraft_convention():
    torch.manual_seed(4)
    enc = S.StreamingSEANetEncoder(**SMALL).double()
    x = torch.randn(1, 1, 61, dtype=torch.float64)
    with torch.no_grad(), enc.streaming():
        y = torch.cat([enc(c) for c in x.split(7, -1)] + [enc.flush()], -1)
        expected_shape = (1, 8, 11)
    assert y.shape == expected_shape
    with torch.no_grad():
        assert max_abs_err(y, enc(x)) <= F64_ATOL


def test_registered_step_builder_and_conv_seam():
    """A module class the planner does not know is taught with register_step_builder; the conv seam
    (``step.conv_step``) is where a fast conv plugs in."""
    class CountedConv(StreamableConv1d):
        pass

    calls = []

    def counted(*args):
        calls.append(args[0].shape[-1])
        return S.conv1d_step(*args)

    def build(module, path, act):
        step = steps.ConvStep(module, act, path)
        step.conv_step = counted
        return [step]

    S.register_step_builder(CountedConv, build)
    torch.manual_seed(5)
    net = torch.nn.Sequential(CountedConv(2, 3, 5, stride=2, causal=True, norm="weight_norm"), torch.nn.Tanh()).double()
    x = torch.randn(1, 2, 23, dtype=torch.float64)
    with torch.no_grad():
        expected = net(x)
    y, _ = _run(net, x, [4, 1, 9, 9])
    assert calls and max_abs_err(y, expected) <= F64_ATOL


def test_fast_codec_streams_like_the_reference(model24):
    """``fastcodec.EncodecModel`` (fast SEANet + fast RVQ) gets the same streaming through its mixins."""
    import fastcodec.model

    model, model64 = model24
    fast = fastcodec.model.EncodecModel.encodec_model_24khz()
    fast.load_state_dict(model.state_dict())
    fast.set_target_bandwidth(6.0)
    x = torch.randn(1, 1, 4000)
    sizes = _split(x.shape[-1], "random", seed=21)
    state = fast.encode_state(1)
    codes = [fast.stream_encode(x[..., i:i + n], state)[0] for i, n in zip(
        [sum(sizes[:j]) for j in range(len(sizes))], sizes)]
    codes = torch.cat(codes + [fast.stream_encode_flush(state)], -1)
    with torch.no_grad():
        latent, codes_off = model.encoder(x), model.encode(x)[0][0]
    assert_codes_equivalent(codes, codes_off, latent, model.quantizer.codebooks()[:8])
    rt, _ = _run(fast, x, sizes)
    with torch.no_grad():
        _assert_f32(rt, model(x), model64.decode(codes_off)[..., :x.shape[-1]], "fast audio -> audio")


# ---- the streaming kernels (csrc/stream_cpu.cpp) ----

# Worst-case float32 error of the kernels' reduction, in units of 2^-24 * (|bias| + sum |w| |act(x)|): each
# output sums chunks of 64 terms (<= 64 roundings each), then adds the ceil(K / 64) chunk sums and the bias,
# plus <= 4 roundings of the ELU on each input. Measured max error / this bound: 0.044 (conv) and 0.036
# (transposed); a wrong tap, offset or overlap is off by O(|w x|), hundreds of times the bound.
def _kernel_bound(K: int, magnitude: torch.Tensor) -> torch.Tensor:
    return (64 + -(-K // 64) + 6) * 2.0 ** -24 * magnitude


@pytest.fixture(scope="module")
def kernels():
    return _build.load_named("stream_cpu")


def _panels(kernels, w2d: torch.Tensor) -> torch.Tensor:
    return kernels.pack_panels(w2d, stream_ops.panel_width(w2d.shape[1]))


@pytest.mark.parametrize("c_in,c_out,k,s,d,frames,batch", [
    (1, 32, 7, 1, 1, 320, 1), (32, 16, 3, 1, 1, 13, 1), (64, 128, 8, 4, 1, 40, 1), (128, 256, 10, 5, 1, 8, 1),
    (256, 512, 16, 8, 1, 1, 1), (5, 3, 3, 2, 3, 17, 2), (7, 70, 5, 1, 2, 25, 3), (130, 1, 7, 1, 1, 29, 1),
    (3, 50, 1, 1, 1, 7, 2)], ids=lambda v: str(v))
def test_conv_push_matches_float64(kernels, c_in, c_out, k, s, d, frames, batch):
    """conv_push: the chunk goes through the ELU into the time-major buffer after the ``n`` samples held
    (moved to the front when they would not fit), then ``frames`` outputs; x strided, not contiguous."""
    span = (k - 1) * d + 1
    total = (frames - 1) * s + span
    n = min(total - 1, span - 1 + s)  # samples held: the rest of the input arrives as the chunk
    T = total - n
    cap = total + 3
    w, b = torch.randn(c_out, c_in, k), torch.randn(c_out)
    x = torch.randn(batch, c_in, total)
    xe = F.elu(x)
    buf = torch.full((batch, cap, c_in), float("nan")).transpose(1, 2)
    start = cap - n  # forces the move to the front
    buf[:, :, start:].copy_(xe[:, :, :n])
    chunk = torch.randn(batch, T, c_in).transpose(1, 2)
    chunk.copy_(x[:, :, n:])
    out = torch.full((batch, frames, c_out), float("nan")).transpose(1, 2)
    packed = _panels(kernels, S.pack_conv1d(w).t())
    got = kernels.conv_push(buf, chunk, start, n, 1.0, frames, k, s, d, packed, b, out)
    assert got == 0
    assert torch.equal(buf[:, :, :total], torch.cat([xe[:, :, :n], kernels.elu(x[:, :, n:].contiguous(), 1.0)], -1))
    expected = F.conv1d(xe.double(), w.double(), b.double(), s, 0, d)
    bound = _kernel_bound(c_in * k, F.conv1d(xe.double().abs(), w.double().abs(), b.double().abs(), s, 0, d))
    err = (out.double() - expected).abs()
    assert not out.isnan().any() and (err <= bound).all(), f"max err {err.max():.3e}, bound {bound.min():.3e}"


@pytest.mark.parametrize("c_in,c_out,k,s,T,batch", [
    (512, 256, 16, 8, 1, 1), (256, 128, 10, 5, 8, 1), (64, 32, 4, 2, 160, 1), (7, 3, 5, 2, 3, 2), (9, 20, 3, 3, 4, 2),
    (33, 1, 7, 1, 5, 1)], ids=lambda v: str(v))
def test_convtr_push_matches_float64(kernels, c_in, c_out, k, s, T, batch):
    """convtr_push over two chunks: overlap carried in ``pending`` equals the offline transposed conv."""
    w, b = torch.randn(c_in, c_out, k), torch.randn(c_out)
    x = torch.randn(batch, c_in, 2 * T)
    ov = k - s
    pending = torch.zeros(batch, ov, c_out).transpose(1, 2)
    packed = _panels(kernels, S.pack_conv_transpose1d(w))
    outs = []
    for part in (x[:, :, :T], x[:, :, T:]):
        out = torch.full((batch, T * s, c_out), float("nan")).transpose(1, 2)
        kernels.convtr_push(part, 1.0, k, s, packed, b, pending, 0, out)
        outs.append(out)
    got = torch.cat(outs + [pending + b[:, None]], -1).double()
    xe = F.elu(x).double()
    expected = F.conv_transpose1d(xe, w.double(), b.double(), s)
    bound = _kernel_bound(c_in, F.conv_transpose1d(xe.abs(), w.double().abs(), b.double().abs(), s))
    err = (got - expected).abs()
    assert (err <= bound).all(), f"max err {err.max():.3e}, bound {bound.min():.3e}"


@pytest.mark.parametrize("c_in,c_out,k,s,frames", [
    (32, 16, 3, 1, 320), (64, 128, 8, 4, 40), (256, 512, 16, 8, 1), (16, 32, 1, 1, 321), (128, 64, 3, 1, 7)],
    ids=lambda v: str(v))
def test_conv_push_is_bitwise_across_threads_and_splits(kernels, c_in, c_out, k, s, frames):
    """The threads split a conv along panels or along frames (the shallow layers); each output is summed in
    one fixed order, so 1 and 2 threads, and frames emitted over several calls, agree bit for bit."""
    torch.manual_seed(0)
    w, b = torch.randn(c_out, c_in, k), torch.randn(c_out)
    total = (frames - 1) * s + k
    x = torch.randn(1, c_in, total)
    packed = _panels(kernels, S.pack_conv1d(w).t())
    assert frames * k * c_in * c_out >= 2 ** 17  # above the kernel's threshold for going parallel

    def run(threads, pieces):
        buf = torch.zeros(1, total + 1, c_in).transpose(1, 2)
        out = torch.empty(1, frames, c_out).transpose(1, 2)
        start, n, done, outs = 0, 0, 0, []
        bounds = [round(i * total / pieces) for i in range(pieces + 1)]
        with _threads(threads):
            for a, e in zip(bounds, bounds[1:]):
                f = (n + e - a - k) // s + 1 if n + e - a >= k else 0
                view = out[:, :, done:done + f] if f else None
                start = kernels.conv_push(buf, x[:, :, a:e], start, n, None, f, k, s, 1, packed, b, view)
                start, n, done = start + f * s, n + e - a - f * s, done + f
        assert done == frames
        return out

    one = run(1, 1)
    assert torch.equal(run(2, 1), one)
    assert torch.equal(run(2, 3), one)
    assert torch.equal(run(1, 3), one)


def test_stream_kernels_elu_error(kernels):
    """The kernels' vectorised ELU against float64: measured <= 1.27 ulp of the result (bound 4 ulp)."""
    x = torch.cat([torch.linspace(-100, 5, 200001), torch.tensor([0.0, -0.0, -1e-30, -1e-7, 1e-7])])
    got = kernels.elu(x, 1.0).double()
    expected = F.elu(x.double())
    err = (got - expected).abs()
    assert (err <= 4 * 2.0 ** -24 * expected.abs()).all(), f"max err {(err / expected.abs()).max() * 2 ** 24:.2f} ulp"
    special = torch.tensor([float("inf"), -float("inf"), float("nan")])
    assert torch.equal(kernels.elu(special, 1.0)[:2], torch.tensor([float("inf"), -1.0]))
    assert kernels.elu(special, 1.0)[2].isnan()


def test_stream_kernels_refuse_bad_input(kernels):
    buf = torch.zeros(1, 8, 4).transpose(1, 2)
    packed = _panels(kernels, torch.randn(12, 5))
    out = torch.empty(1, 1, 5).transpose(1, 2)
    args = dict(start=0, n=2, alpha=None, frames=1, kernel=3, stride=1, dilation=1)

    def push(buf=buf, x=torch.zeros(1, 4, 3), packed=packed, out=out, **kw):
        a = {**args, **kw}
        return kernels.conv_push(buf, x, a["start"], a["n"], a["alpha"], a["frames"], a["kernel"], a["stride"],
                                 a["dilation"], packed, None, out)

    push()  # the good call
    with pytest.raises(RuntimeError, match="do not fit"):
        push(x=torch.zeros(1, 4, 7))
    with pytest.raises(RuntimeError, match="time-major"):
        push(buf=torch.zeros(1, 4, 8))
    with pytest.raises(RuntimeError, match="frames need more"):
        push(frames=4)
    with pytest.raises(RuntimeError, match="packed weight"):
        push(packed=_panels(kernels, torch.randn(11, 5)))
    with pytest.raises(RuntimeError, match="float32"):
        push(x=torch.zeros(1, 4, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="channel stride 1"):
        push(frames=2, out=torch.empty(1, 5, 2))  # (B, N, frames) stored channel-major
    with pytest.raises(RuntimeError, match="output tensor"):
        push(out=None)
    with pytest.raises(RuntimeError, match="drop"):
        kernels.convtr_push(torch.zeros(1, 3, 1), None, 4, 2, _panels(kernels, torch.randn(3, 20)), None,
                            torch.zeros(1, 2, 5).transpose(1, 2), 2, torch.empty(1, 5, 1))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_small_configs_float32_kernels(name, nan_poison):
    """The float32 path (streaming kernels where a step allows them) on the small configs, against float64,
    with output buffers NaN-poisoned: any read of an unwritten sample shows."""
    torch.manual_seed(8)
    kw = {**SMALL, **CONFIGS[name]}
    dec_kw = dict(trim_right_ratio=0.5, final_activation="Tanh") if name == "reflect" else {}
    for module, total, unit in [(S.StreamingSEANetEncoder(**kw), 173, 6),
                                (S.StreamingSEANetDecoder(**kw, **dec_kw), 11, 1)]:
        _perturb_weight_norm(module)
        x = torch.randn(2, module.channels if unit > 1 else module.dimension, total)
        with torch.no_grad():
            off32, off64 = module(x), copy.deepcopy(module).double()(x.double())
        state = S.stream_state(module, 2)
        y, _ = _run(module, x, _split(total, "random", 3, unit=unit), state)
        assert state.slots.outs, "the streaming kernels did not run"
        _assert_f32(y, off32, off64, f"{name}/{type(module).__name__}")


def _allocations(fn, chunks: int) -> list[int]:
    """Bytes of each tensor allocation made by ``chunks`` calls of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(chunks):
            fn()
    return [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]


def test_no_allocation_per_chunk_after_warmup():
    """After warm-up a chunk allocates nothing but the output it returns (the conv path writes into the
    state's buffers and the steps' reused outputs, which keep their storage); no LSTM here (its own op)."""
    torch.manual_seed(9)
    kw = dict(channels=1, dimension=128, n_filters=32, ratios=[8, 5, 4, 2], causal=True, lstm=0)
    for module, chunk in [(S.StreamingSEANetEncoder(**kw), torch.randn(1, 1, HOP)),
                          (S.StreamingSEANetDecoder(**kw), torch.randn(1, 128, 1) * 0.1)]:
        state = module.stream_state(1)
        for _ in range(10):
            y, _ = module.stream(chunk, state)
        ptrs = [t.data_ptr() for slot in state.slots for t in vars(slot).values() if isinstance(t, torch.Tensor)]
        outs = [e[2].data_ptr() for e in state.slots.outs.values()]
        assert len(outs) >= 10
        allocs = _allocations(lambda: module.stream(chunk, state), 5)
        assert allocs == [y.numel() * 4] * 5, f"{type(module).__name__}: allocations per 5 chunks {allocs}"
        assert [t.data_ptr() for slot in state.slots for t in vars(slot).values() if isinstance(t, torch.Tensor)] \
            == ptrs
        assert [e[2].data_ptr() for e in state.slots.outs.values()] == outs


def test_reference_backend_streams_through_aten(model24, monkeypatch):
    """FASTCODEC_CONV_BACKEND=reference: no streaming kernels; the same outputs within the float32 bound."""
    model, model64 = model24
    x = torch.randn(1, 1, 3000)
    sizes = _split(x.shape[-1], "random", seed=4)
    fast_state = model.encoder.stream_state(1)
    fast, _ = _run(model.encoder, x, sizes, fast_state)
    monkeypatch.setenv("FASTCODEC_CONV_BACKEND", "reference")
    state = model.encoder.stream_state(1)
    slow, _ = _run(model.encoder, x, sizes, state)
    assert fast_state.slots.outs and not state.slots.outs
    with torch.no_grad():
        off32, off64 = model.encoder(x), model64.encoder(x.double())
    _assert_f32(fast, off32, off64, "encoder/kernels")
    _assert_f32(slow, off32, off64, "encoder/aten")


def test_unbuildable_fused_lstm_warns_or_raises(model24, monkeypatch):
    """The fused LSTM cannot build: auto warns once and streams the LSTM through ATen (same outputs within
    the float32 bound); a forced cpp backend raises BackendUnavailableError naming the reason."""
    from fastcodec import _backend

    model, model64 = model24
    x = torch.randn(1, 1, 1600)
    for var in ("FASTCODEC_BACKEND", "FASTCODEC_CONV_BACKEND", "FASTCODEC_LSTM_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setitem(_backend._probes, ("lstm", "cpp"),
                        lambda: _backend.Availability(False, "no compiler (simulated)"))
    monkeypatch.setattr(_backend, "_probe_cache", {})
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setattr(S, "_CHOICE", {})
    with pytest.warns(RuntimeWarning, match="'reference' backend for the lstm ops.*simulated"):
        state = S.stream_state(model.encoder, 1)
        out, _ = _run(model.encoder, x, [700, 900], state)
    assert state.slots.kernels and not state.slots.fused_lstm  # the convs still run the streaming kernels
    with torch.no_grad():
        _assert_f32(out, model.encoder(x), model64.encoder(x.double()), "encoder/aten-lstm")
    monkeypatch.setenv("FASTCODEC_CONV_BACKEND", "cpp")
    with pytest.raises(_backend.BackendUnavailableError, match="FASTCODEC_CONV_BACKEND=cpp.*lstm.*simulated"):
        _run(model.encoder, x, [1600])
