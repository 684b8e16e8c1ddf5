"""``fastcodec.ResidualVectorQuantizer`` (the drop-in) against the reference and audiocraft, through
each fast backend: ``cpp`` at real shapes, ``triton`` under TRITON_INTERPRET=1 at tiny shapes."""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

import fastcodec
from fastcodec import _backend
from fastcodec.reference import functional as Fq
from fastcodec.reference.quantization import ResidualVectorQuantizer as RefRVQ
from tests.utils import (U32, assert_codes_equivalent, assert_no_near_ties, lloyd_mean_error, max_abs_err,
                         residual_rounding_bound)

# A float32 result of the fast path may be at most ERR_FACTOR times as far from the float64 reference
# as the float32 reference is (or u x the value's scale, where the reference happens to be exact):
# the EMA sums each code's rows in another order than the reference's one-hot GEMM, a few ulp either way
# (measured ratio <= 1.05 with cpp and triton on an AMD EPYC Zen 2).
ERR_FACTOR = 4.0

# (backend, D, bins, K, B, T): the triton interpreter costs ~4 ms per tl.dot tile, keep it tiny
CASES = [
    pytest.param("cpp", 128, 1024, 8, 2, 150, id="cpp-D128-bins1024-K8-B2-T150"),
    pytest.param("cpp", 32, 64, 4, 3, 37, id="cpp-D32-bins64-K4-B3-T37"),
    pytest.param("cpp", 128, 1024, 8, 8, 750, id="cpp-D128-bins1024-K8-B8-T750", marks=pytest.mark.slow),
    pytest.param("triton", 16, 32, 3, 2, 9, id="triton-D16-bins32-K3-B2-T9"),
]
# The training comparison needs data that cannot tie (see test_training_matches_reference), which the test
# certifies. B * T >= bins, so k-means draws its initial means without replacement: with 24 rows for 32
# bins it drew duplicate means, and the interpreter's numpy matmul broke those exact ties unlike torch
# (Zen 5). No bins-1024 case: at 1200 rows of D=128 every seed tried (8 of 8) has a decision within the
# float32 bound; the EMA at that shape is checked op by op in test_rvq_cpp.py and test_rvq_triton.py.
TRAIN_CASES = [
    pytest.param("cpp", 32, 64, 4, 4, 50, id="cpp-D32-bins64-K4-B4-T50"),
    pytest.param("cpp", 128, 256, 4, 2, 150, id="cpp-D128-bins256-K4-B2-T150"),
    pytest.param("triton", 16, 32, 2, 2, 24, id="triton-D16-bins32-K2-B2-T24"),
]


@pytest.fixture
def backend_env(monkeypatch):
    def use(backend: str):
        monkeypatch.setenv("FASTCODEC_RVQ_BACKEND", backend)

    return use


def _pair(D, bins, K, **kw):
    ref = RefRVQ(dimension=D, n_q=K, bins=bins, **kw)
    fast = fastcodec.ResidualVectorQuantizer(dimension=D, n_q=K, bins=bins, **kw)
    with torch.no_grad():
        for layer in ref.vq.layers:
            layer._codebook.embed.normal_()
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), fast.eval()


def _latent(B, D, T):
    return torch.randn(B, D, T) * 1.5


@contextlib.contextmanager
def _reference_decisions():
    """Records every nearest-codeword decision the reference makes while active, in order:
    ("lloyd", samples (N, D), means (bins, D)) per k-means iteration, ("codes", x (N, D), embed) per layer."""
    events = []
    lloyd, nearest = Fq.lloyd, Fq.nearest_codes

    def lloyd_steps(samples, means, num_iters):
        if num_iters == 0:
            return lloyd(samples, means, 0)
        for _ in range(num_iters):  # one iteration at a time: the same arithmetic as one call
            events.append(("lloyd", samples.detach().clone(), means.detach().clone()))
            means, counts = lloyd(samples, means, 1)
        return means, counts

    def nearest_codes(x, embed):
        events.append(("codes", x.detach().clone(), embed.detach().clone()))
        return nearest(x, embed)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Fq, "lloyd", lloyd_steps)
        mp.setattr(Fq, "nearest_codes", nearest_codes)
        yield events


def _certify_no_near_ties(events, x: torch.Tensor, name: str) -> float:
    """``assert_no_near_ties`` on each decision of one reference forward (``events`` from
    ``_reference_decisions``), with the allowances another implementation may need: its layer input
    within 2 rho of the reference's (both within ``residual_rounding_bound`` of the exact one), its
    k-means means within twice a mean's own error (the initial ones are rows of that input; each later
    one sums the rows of a cluster: ``lloyd_mean_error``). Codebooks already initialised
    are loaded bitwise equal on every side. Returns the smallest margin / bound."""
    D = x.shape[1]
    abs_sum = x.detach().double().transpose(1, 2).reshape(-1, D).abs()
    layer, cb_err, fresh, worst = 0, 0.0, True, float("inf")
    for i, (kind, r, means) in enumerate(events):
        rho = residual_rounding_bound(abs_sum, layer)
        if kind == "lloyd" and fresh:
            cb_err = 2 * float(rho.max())
        worst = min(worst, assert_no_near_ties(r, means, 2 * rho, cb_err, name=f"{name} {kind} {i} (layer {layer})"))
        a = torch.cdist(r.double(), means.double()).argmin(1)  # the choice every side makes (certified)
        if kind == "lloyd":
            empty = bool((torch.bincount(a, minlength=means.shape[0]) == 0).any())
            cb_err = max(cb_err if empty else 0.0, 2 * lloyd_mean_error(r, a, means.shape[0], float(rho.max())))
            fresh = False
        else:
            abs_sum = abs_sum + means.double()[a].abs()
            layer, cb_err, fresh = layer + 1, 0.0, True
    return worst


def _assert_f32(name: str, fast: torch.Tensor, ref32: torch.Tensor, ref64: torch.Tensor) -> None:
    """fast's error against the float64 reference within ERR_FACTOR x the float32 reference's own
    error (or u times the largest value, where the float32 reference happens to be exact)."""
    e_fast, e_ref = max_abs_err(fast, ref64), max_abs_err(ref32, ref64)
    scale = ref64.detach().abs().max().item()
    tol = ERR_FACTOR * max(e_ref, U32 * scale)
    assert e_fast <= tol, (f"{name}: error vs float64 {e_fast:.3e} > {ERR_FACTOR:g} x max(the float32 reference's "
                           f"{e_ref:.3e}, u x {scale:.3g})")


@pytest.mark.parametrize("backend, D, bins, K, B, T", CASES)
def test_eval_matches_reference(backend_env, backend, D, bins, K, B, T):
    backend_env(backend)
    ref, fast = _pair(D, bins, K, kmeans_init=False)
    x = _latent(B, D, T)
    cb = ref.codebooks()
    codes = fast.encode(x)
    expected = ref.encode(x)
    flips = assert_codes_equivalent(codes, expected, x, cb)
    print(f"\n{flips} of {B * T} rows flipped at exact duplicates or certified near-ties")
    # decode of the same codes is a gather-sum in the same layer order: bit-identical
    assert torch.equal(fast.decode(expected), ref.decode(expected))
    res, res_ref = fast(x, frame_rate=75), ref(x, frame_rate=75)
    assert torch.equal(res.bandwidth, res_ref.bandwidth)
    assert torch.equal(res.penalty, res_ref.penalty)  # zero outside training
    assert_codes_equivalent(res.codes, expected, x, cb)
    # the quantized output is the decode of the codes it chose, whichever side of a near-tie they fell
    assert torch.equal(res.x, ref.decode(res.codes))
    # fewer codebooks, as set_num_codebooks / set_target_bandwidth do
    fast.set_num_codebooks(2)
    ref.set_num_codebooks(2)
    assert_codes_equivalent(fast.encode(x), ref.encode(x), x, cb[:2])


@pytest.mark.parametrize("backend, D, bins, K, B, T", TRAIN_CASES)
def test_training_matches_reference(backend_env, backend, D, bins, K, B, T):
    """Several EMA training steps from k-means init, with dead-code expiry and quantizer dropout, in
    lockstep with the float32 reference and a float64 one (same torch RNG draws).

    A flipped near-tie would send a row to another cluster and change the buffers by far more than
    rounding, so the data is certified first: no decision of the reference (k-means assignments,
    codes) is within the float32 bound of another choice. Then every side makes the same choices,
    codes are equal, and the buffers differ by rounding only. After each step the fast and float64
    sides restart from the float32 reference's state, so each step is measured on its own."""
    backend_env(backend)
    kw = dict(kmeans_init=True, kmeans_iters=2, threshold_ema_dead_code=2, q_dropout=True, decay=0.9)
    torch.manual_seed(0)
    ref = RefRVQ(dimension=D, n_q=K, bins=bins, **kw).train()
    fast = fastcodec.ResidualVectorQuantizer(dimension=D, n_q=K, bins=bins, **kw).train()
    ref64 = RefRVQ(dimension=D, n_q=K, bins=bins, **kw).double().train()
    xs = [_latent(B, D, T) for _ in range(3)]
    for step, x in enumerate(xs):
        if step:
            fast.load_state_dict(ref.state_dict())
            ref64.load_state_dict(ref.state_dict())
        ins = [x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()]
        outs = []
        for m, xi in zip((ref, fast, ref64), ins):
            torch.manual_seed(100 + step)
            with _reference_decisions() if m is ref else contextlib.nullcontext() as events:
                outs.append(m(xi, frame_rate=75))
            if m is ref:
                margin = _certify_no_near_ties(events, x, f"step {step}")
                print(f"\nstep {step}: smallest margin to a near-tie {margin:.2f} x the float32 bound")
        r_ref, r_fast, r64 = outs
        assert r_fast.codes.shape == r_ref.codes.shape == r64.codes.shape, "quantizer dropout drew a different n_q"
        n_q = r_ref.codes.shape[1]
        # certified above (smallest margin printed): every side chooses the same codes
        assert torch.equal(r_fast.codes, r_ref.codes) and torch.equal(r64.codes, r_ref.codes), f"margin {margin:.2f}"
        for r in outs:
            (r.x.square().mean() + r.penalty).backward()
        _assert_f32("penalty", r_fast.penalty, r_ref.penalty, r64.penalty)
        _assert_f32("x.grad", ins[1].grad, ins[0].grad, ins[2].grad)
        for k in range(n_q):
            a, b, c = (m.vq.layers[k]._codebook for m in (fast, ref, ref64))
            assert torch.equal(a.inited, b.inited)
            # counts are exact integers and the EMA step is one fma, as torch's add_(alpha=1-decay)
            assert torch.equal(a.cluster_size, b.cluster_size), f"L{k} cluster_size"
            _assert_f32(f"step {step} L{k} embed_avg", a.embed_avg, b.embed_avg, c.embed_avg)
            _assert_f32(f"step {step} L{k} embed", a.embed, b.embed, c.embed)


def test_training_is_deterministic(backend_env):
    backend_env("cpp")
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        m = fastcodec.ResidualVectorQuantizer(dimension=32, n_q=3, bins=64, kmeans_iters=2).train()
        for step in range(2):
            m(_latent(2, 32, 40), frame_rate=75)
        outs.append({k: v.clone() for k, v in m.state_dict().items()})
    for k in outs[0]:
        assert torch.equal(outs[0][k], outs[1][k]), k


def test_first_eval_call_runs_kmeans_like_audiocraft(backend_env):
    """audiocraft initialises a k-means codebook on its first forward, even in eval mode. The data
    is certified free of near-ties (as in the training test), so the k-means assignments and the
    codes are the reference's and the means differ from float64 by rounding only."""
    backend_env("cpp")
    models = [m(dimension=16, n_q=2, bins=32, kmeans_iters=3).eval()
              for m in (RefRVQ, fastcodec.ResidualVectorQuantizer, RefRVQ)]
    models[2].double()
    x = _latent(2, 16, 40)
    outs = []
    for m in models:
        torch.manual_seed(5)
        with _reference_decisions() if m is models[0] else contextlib.nullcontext() as events:
            outs.append(m(x.to(m.vq.layers[0]._codebook.embed.dtype), frame_rate=75))
        if m is models[0]:
            _certify_no_near_ties(events, x, "first call")
    assert torch.equal(outs[1].codes, outs[0].codes) and torch.equal(outs[2].codes, outs[0].codes)
    for k in range(2):
        ref, fast, ref64 = (m.vq.layers[k]._codebook for m in models)
        assert bool(fast.inited)
        assert torch.equal(fast.cluster_size, ref.cluster_size), f"L{k} k-means counts"
        _assert_f32(f"L{k} k-means means", fast.embed, ref.embed, ref64.embed)
        assert torch.equal(fast.embed_avg, fast.embed)


def test_state_dict_and_codes_vs_audiocraft(oracle, backend_env):
    backend_env("cpp")
    vq = oracle("audiocraft.quantization.vq")
    theirs = vq.ResidualVectorQuantizer(dimension=64, n_q=4, bins=128, kmeans_init=False).eval()
    ours = fastcodec.ResidualVectorQuantizer(dimension=64, n_q=4, bins=128, kmeans_init=False).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = _latent(3, 64, 50)
    codes = ours.encode(x)
    assert_codes_equivalent(codes, theirs.encode(x), x, ours.codebooks())
    assert torch.equal(ours.decode(codes), theirs.decode(codes))


def test_forced_reference_uses_reference_code(backend_env, monkeypatch):
    backend_env("reference")
    ref, fast = _pair(16, 32, 2, kmeans_init=False)
    monkeypatch.setattr(fastcodec.ops, "rvq_encode", lambda *a: pytest.fail("op called"))
    x = _latent(1, 16, 5)
    assert torch.equal(fast.encode(x), ref.encode(x))


def test_forced_unavailable_backend_raises(backend_env):
    backend_env("cuda")
    _, fast = _pair(16, 32, 2, kmeans_init=False)
    with pytest.raises(fastcodec.BackendUnavailableError, match="no 'cuda' implementation"):
        fast.encode(_latent(1, 16, 5))


def test_auto_fallback_warns_once(monkeypatch):
    monkeypatch.delenv("FASTCODEC_RVQ_BACKEND", raising=False)
    monkeypatch.delenv("FASTCODEC_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_probes", {("rvq", "cpp"): lambda: _backend.Availability(False, "build failed: test")})
    monkeypatch.setattr(_backend, "_probe_cache", {})
    monkeypatch.setattr(_backend, "_warned", set())
    ref, fast = _pair(16, 32, 2, kmeans_init=False)
    x = _latent(1, 16, 5)
    with pytest.warns(RuntimeWarning, match="build failed: test"):
        assert torch.equal(fast.encode(x), ref.encode(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast.encode(x)  # warned once only


def test_torch_compile_fullgraph(backend_env):
    backend_env("cpp")
    ref, fast = _pair(32, 64, 3, kmeans_init=False)
    x = _latent(2, 32, 20)
    enc = torch.compile(fast.encode, fullgraph=True, backend="aot_eager")
    assert torch.equal(enc(x), fast.encode(x))
    dec = torch.compile(fast.decode, fullgraph=True, backend="aot_eager")
    codes = fast.encode(x)
    assert torch.equal(dec(codes), fast.decode(codes))


@pytest.mark.parametrize("bad, err, match", [
    (torch.full((1, 16, 4), float("nan")), ValueError, "NaN"),
    (torch.randn(1, 8, 4), ValueError, "channels"),
    (torch.randn(1, 16, 0), ValueError, "empty"),
    (torch.randn(16, 4), ValueError, "batch"),
    (torch.randn(1, 16, 4).double(), TypeError, "float64"),
])
def test_bad_input(backend_env, bad, err, match):
    backend_env("cpp")
    _, fast = _pair(16, 32, 2, kmeans_init=False)
    with pytest.raises(err, match=match):
        fast.encode(bad)
    with pytest.raises(err, match=match):
        fast(bad, frame_rate=75)


def test_bad_codes(backend_env):
    backend_env("cpp")
    _, fast = _pair(16, 32, 2, kmeans_init=False)
    with pytest.raises(ValueError, match="out of range"):
        fast.decode(torch.full((1, 2, 3), 32, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        fast.decode(torch.full((1, 2, 3), -1, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        fast.decode(torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="codebooks"):
        fast.decode(torch.zeros(1, 3, 3, dtype=torch.long))
