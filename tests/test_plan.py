"""One plan, two modes (``fastcodec.steps``): a fast SEANet's compiled steps are what both the offline forward and
the stream walk, and for causal models "offline forward == push everything + flush" holds for every split.

Tolerance: both sides are float32 runs of the same kernels in different summation orders (the offline conv kernel
vs the streaming micro-GEMM, the whole-sequence LSTM vs its chunks), so each is compared with the float64 reference
module: the stream's error may be at most ``F32_FACTOR`` times the offline plan's own (or u = 2^-24 times the
largest output where that is exact), the rule and factor of tests/test_streaming.py (measured <= 1.41 there).
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastcodec
from fastcodec import steps
from fastcodec import streaming as S

F32_FACTOR = 3.0
U = 2.0 ** -24

pytestmark = [pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning"),
              pytest.mark.filterwarnings("ignore:.*float32-only.*:RuntimeWarning")]  # the float64 oracle


def _perturb(m: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))


def test_stream_walks_the_offline_plan():
    enc = fastcodec.SEANetEncoder(channels=1, dimension=8, n_filters=4, ratios=[2, 3], causal=True, lstm=1)
    plan = enc._fast_plan()
    assert S.plan_of(enc).steps is plan  # compiled once, walked both ways
    kinds = {type(s) for s in plan}
    assert {steps.ConvStep, steps.ResStep, steps.LSTMStep} <= kinds
    for s in plan:
        assert isinstance(s, steps.Step)
        for name in ("forward", "new_slots", "push", "flush", "stream_check", "describe"):
            assert callable(getattr(s, name))
    # a non-causal SEANet compiles the same way and is refused only when streamed, naming the layer
    noncausal = fastcodec.SEANetEncoder(channels=1, dimension=8, n_filters=4, ratios=[2], causal=False, lstm=0)
    assert noncausal._fast_plan()
    with pytest.raises(S.NotStreamableError, match="model.0: non-causal"):
        S.stream_state(noncausal, 1)


@st.composite
def _case(draw):
    cfg = dict(channels=draw(st.sampled_from([1, 2])), dimension=draw(st.sampled_from([4, 8])), n_filters=4,
               ratios=draw(st.sampled_from([[2], [3, 2], [2, 2]])), norm=draw(st.sampled_from(["weight_norm", "none"])),
               causal=True, pad_mode=draw(st.sampled_from(["constant", "reflect"])),  # the fast convs' modes
               n_residual_layers=draw(st.integers(1, 2)), true_skip=draw(st.booleans()), lstm=draw(st.integers(0, 1)),
               kernel_size=draw(st.sampled_from([3, 5])), residual_kernel_size=draw(st.sampled_from([3, 5])))
    decoder = draw(st.booleans())
    length = draw(st.integers(1, 9 if decoder else 60))
    cuts = sorted(draw(st.lists(st.integers(1, max(1, length - 1)), max_size=4, unique=True)))
    cuts = [c for c in cuts if c < length]
    return cfg, decoder, length, [b - a for a, b in zip([0] + cuts, cuts + [length])], draw(st.integers(0, 2**16))


@settings(max_examples=5, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(_case())
def test_causal_offline_plan_equals_push_everything_and_flush(case):
    cfg, decoder, length, sizes, seed = case
    torch.manual_seed(seed)
    cls = fastcodec.SEANetDecoder if decoder else fastcodec.SEANetEncoder
    m = cls(**cfg).eval()
    _perturb(m)
    x = torch.randn(2, cfg["dimension"] if decoder else cfg["channels"], length)
    with torch.no_grad():
        offline = x
        for step in m._fast_plan():  # the plan's offline forward, step by step
            offline = step(offline)
        expected = copy.deepcopy(m).double()(x.double())
    state, outs, i = S.stream_state(m, 2), [], 0
    for n in sizes:
        y, state = S.stream(m, x[..., i:i + n], state)
        outs.append(y)
        i += n
    streamed = torch.cat(outs + [S.stream_flush(m, state)], -1)
    assert streamed.shape == offline.shape == expected.shape
    e_off = (offline.double() - expected).abs().max().item()
    e_stream = (streamed.double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert e_stream <= F32_FACTOR * max(e_off, U * scale), (cfg, decoder, sizes, e_stream, e_off)
