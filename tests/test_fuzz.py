"""Property-based fuzz (hypothesis) of each op family against the reference, over random shapes and configurations.

Profiles (``FASTCODEC_FUZZ``): ``ci`` (default; a few dozen derandomized examples per family, seconds) and
``full`` (10 000 random examples per family; docs/reliability.md has the command and the last run's count and
duration). Every example also counts into ``STATS``; the full run prints the totals (run with ``-s``).

Tolerances are float32 rounding bounds computed per element from the example itself (gamma_n times the sum of
absolute products, against a float64 reference), not constants tuned to pass; codes compare through the
certified near-tie rule (``tests/utils.check_codes_equivalent``), and the number of certified flips is counted.
"""
from __future__ import annotations

import collections
import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastcodec.ops import conv as C  # noqa: E402
from fastcodec.ops import rvq as Q  # noqa: E402
from fastcodec.reference.conv import pad1d  # noqa: E402
from tests.test_rvq_cpp import _ema_float64  # noqa: E402
from tests.utils import check_codes_equivalent  # noqa: E402

PROFILE = os.environ.get("FASTCODEC_FUZZ", "ci")
if PROFILE not in ("ci", "full"):
    raise ValueError(f"FASTCODEC_FUZZ must be ci or full, got {PROFILE!r}")
_common = dict(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
settings.register_profile("fastcodec-ci", max_examples=12, derandomize=True, **_common)
# FASTCODEC_FUZZ_EXAMPLES overrides the full profile's count (e.g. to measure the rate with a shorter run)
settings.register_profile("fastcodec-full", max_examples=int(os.environ.get("FASTCODEC_FUZZ_EXAMPLES", 10_000)),
                          **_common)
FUZZ = settings.get_profile(f"fastcodec-{PROFILE}")

U = 2.0**-24
STATS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


def _gamma(n: int) -> float:
    return n * U / (1 - n * U)


def _tensor(shape, seed, strided=False):
    t = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    if strided:  # the same values in a buffer twice as long on the last axis
        big = torch.zeros(*shape[:-1], 2 * shape[-1])
        big[..., ::2] = t
        t = big[..., ::2]
    return t


@pytest.fixture(scope="module", autouse=True)
def _report():
    # ci: one thread (tiny shapes; thread-pool wake-ups cost more than the work on a loaded 2-core host);
    # full: torch's default threads, so the parallel tilings are fuzzed too
    n = torch.get_num_threads()
    if PROFILE == "ci":
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    yield
    torch.set_num_threads(n)
    if PROFILE == "full":
        print(f"\nfuzz ({PROFILE}) {time.perf_counter() - t0:.0f} s: "
              + "; ".join(f"{k}: {dict(v)}" for k, v in sorted(STATS.items())))


@st.composite
def conv_cases(draw):
    k = draw(st.integers(1, 7))
    stride = draw(st.integers(1, 5))
    dilation = draw(st.integers(1, 4))
    span = (k - 1) * dilation + 1
    pad_mode = draw(st.sampled_from(["constant", "reflect"]))
    pad_left, pad_right = draw(st.integers(0, span)), draw(st.integers(0, span))
    t = draw(st.integers(max(1, span - pad_left - pad_right), 40))
    return dict(B=draw(st.integers(1, 3)), c_in=draw(st.integers(1, 9)), c_out=draw(st.integers(1, 13)), T=t, K=k,
                stride=stride, dilation=dilation, pad_left=pad_left, pad_right=pad_right, pad_mode=pad_mode,
                elu=draw(st.sampled_from([None, 1.0, 0.5])), bias=draw(st.booleans()), skip=draw(st.booleans()),
                strided=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


@FUZZ
@given(conv_cases())
def test_fuzz_conv1d(c):
    x = _tensor((c["B"], c["c_in"], c["T"]), c["seed"], c["strided"])
    w = _tensor((c["c_out"], c["c_in"], c["K"]), c["seed"] + 1)
    b = _tensor((c["c_out"],), c["seed"] + 2) if c["bias"] else None
    args = dict(stride=c["stride"], dilation=c["dilation"], pad_left=c["pad_left"], pad_right=c["pad_right"],
                pad_mode=c["pad_mode"], elu_alpha=c["elu"])
    t_out = C.conv1d_output_length(c["T"], c["K"], c["stride"], c["dilation"], c["pad_left"], c["pad_right"])
    skip = _tensor((c["B"], c["c_out"], t_out), c["seed"] + 3) if c["skip"] else None
    out = C.conv1d(x, w, b, skip, **args)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref = C.conv1d_reference(d(x), d(w), d(b), d(skip), **args)
    # |terms|: the same conv of |act(x)| with |w|, plus |bias| and |skip|
    xa = F.elu(x.double(), c["elu"]) if c["elu"] is not None else x.double()
    mag = F.conv1d(pad1d(xa, (c["pad_left"], c["pad_right"]), c["pad_mode"]).abs(), w.double().abs(), None,
                   c["stride"], 0, c["dilation"])
    mag = mag + (b.double().abs()[:, None] if b is not None else 0) + (skip.double().abs() if skip is not None else 0)
    # a dot of c_in*K products plus bias and skip, and the ELU's few-ulp error on each input
    bound = (_gamma(c["c_in"] * c["K"] + 2) + 4 * U) * mag + U * ref.abs()
    err = (out.double() - ref).abs()
    assert out.shape == ref.shape and bool((err <= bound).all()), f"max err/bound {(err / bound).max():.3f}"
    STATS["conv1d"]["examples"] += 1


@st.composite
def convtr_cases(draw):
    k = draw(st.integers(1, 9))
    stride = draw(st.integers(1, 5))
    t = draw(st.integers(1, 30))
    full = (t - 1) * stride + k
    trim_left = draw(st.integers(0, full - 1))
    trim_right = draw(st.integers(0, full - 1 - trim_left))
    return dict(B=draw(st.integers(1, 3)), c_in=draw(st.integers(1, 9)), c_out=draw(st.integers(1, 13)), T=t, K=k,
                stride=stride, trim_left=trim_left, trim_right=trim_right, elu=draw(st.sampled_from([None, 1.0])),
                bias=draw(st.booleans()), strided=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


@FUZZ
@given(convtr_cases())
def test_fuzz_conv_transpose1d(c):
    x = _tensor((c["B"], c["c_in"], c["T"]), c["seed"], c["strided"])
    w = _tensor((c["c_in"], c["c_out"], c["K"]), c["seed"] + 1)
    b = _tensor((c["c_out"],), c["seed"] + 2) if c["bias"] else None
    args = dict(stride=c["stride"], trim_left=c["trim_left"], trim_right=c["trim_right"], elu_alpha=c["elu"])
    out = C.conv_transpose1d(x, w, b, **args)
    ref = C.conv_transpose1d_reference(x.double(), w.double(), None if b is None else b.double(), **args)
    xa = F.elu(x.double(), c["elu"]) if c["elu"] is not None else x.double()
    mag = C.conv_transpose1d_reference(xa.abs(), w.double().abs(), None if b is None else b.double().abs(),
                                       c["stride"], c["trim_left"], c["trim_right"])
    n = c["c_in"] * math.ceil(c["K"] / c["stride"]) + 1
    bound = (_gamma(n) + 4 * U) * mag + U * ref.abs()
    err = (out.double() - ref).abs()
    assert out.shape == ref.shape and bool((err <= bound).all()), f"max err/bound {(err / bound).max():.3f}"
    STATS["conv_transpose1d"]["examples"] += 1


@st.composite
def rvq_cases(draw):
    return dict(B=draw(st.integers(1, 3)), D=draw(st.integers(1, 40)), T=draw(st.integers(1, 50)),
                K=draw(st.integers(1, 4)), bins=draw(st.integers(1, 300)), dup=draw(st.booleans()),
                scale=draw(st.sampled_from([1e-3, 1.0, 1e3])), seed=draw(st.integers(0, 2**31 - 1)))


def _rvq_problem(c):
    x = _tensor((c["B"], c["D"], c["T"]), c["seed"]) * c["scale"]
    cb = _tensor((c["K"], c["bins"], c["D"]), c["seed"] + 1) * c["scale"]
    if c["dup"] and c["bins"] > 1:  # exact duplicate codewords: ties the lowest index must win
        cb[:, -1] = cb[:, 0]
    return x, cb.contiguous(), (cb * cb).sum(-1)


@FUZZ
@given(rvq_cases())
def test_fuzz_rvq_encode_quantize(c):
    x, cb, norms = _rvq_problem(c)
    expected = Q._encode_ref(x, cb, norms)
    codes = torch.ops.fastcodec.rvq_encode(x, cb, norms)
    ok, flips, detail = check_codes_equivalent(codes, expected, x, cb)
    assert ok, detail
    qcodes, quantized, residuals = torch.ops.fastcodec.rvq_quantize(x, cb, norms, True)
    ok, qflips, detail = check_codes_equivalent(qcodes, expected, x, cb)
    assert ok, detail
    assert residuals.shape == (c["K"], c["B"], c["D"], c["T"]) and quantized.shape == x.shape
    # the quantized sum is the decode of its own codes (same layer order)
    torch.testing.assert_close(quantized, Q._decode_ref(qcodes, cb), atol=0, rtol=0)
    STATS["rvq_encode"]["examples"] += 1
    STATS["rvq_encode"]["rows"] += c["B"] * c["T"]
    STATS["rvq_encode"]["certified_flips"] += flips + qflips


@FUZZ
@given(rvq_cases())
def test_fuzz_rvq_decode(c):
    _, cb, _ = _rvq_problem(c)
    codes = torch.randint(0, c["bins"], (c["B"], c["K"], c["T"]), generator=torch.Generator().manual_seed(c["seed"]))
    # the same float32 sum in the same layer order: bitwise equal
    assert torch.equal(torch.ops.fastcodec.rvq_decode(codes, cb), Q._decode_ref(codes, cb))
    STATS["rvq_decode"]["examples"] += 1


@FUZZ
@given(rvq_cases(), st.sampled_from([0.0, 0.5, 0.99, 1.0]))
def test_fuzz_ema_update(c, decay):
    x, cb, norms = _rvq_problem(c)
    codes, _, res = Q._quantize_ref(x, cb, norms, True)
    g = torch.Generator().manual_seed(c["seed"] + 7)
    cs = torch.rand(c["K"], c["bins"], generator=g) * 4
    avg = torch.randn(c["K"], c["bins"], c["D"], generator=g) * c["scale"]
    emb = avg / (cs.unsqueeze(-1) + 1)
    ours = [t.clone() for t in (cs, avg, emb)]
    torch.ops.fastcodec.ema_update(res, codes, *ours, decay, 1e-5)
    _, avg64, emb64, avg_bound, emb_bound = _ema_float64(res, codes, cs, avg, decay, 1e-5)
    ref = [t.clone() for t in (cs, avg, emb)]
    Q._ema_ref(res, codes, *ref, decay, 1e-5)
    assert torch.equal(ours[0], ref[0])  # the same fma per count (test_rvq_cpp: bitwise equal)
    for name, o, t, bound in (("embed_avg", ours[1], avg64, avg_bound), ("embed", ours[2], emb64, emb_bound)):
        err = (o.double() - t).abs()
        assert bool((err <= bound).all()), f"{name}: max err/bound {(err / bound).max():.3f}"
    STATS["ema_update"]["examples"] += 1
