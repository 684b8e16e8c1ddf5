"""The ``cpp`` backend of the RVQ ops (csrc/rvq_cpu.cpp) against the reference implementations in
fastcodec.ops.rvq, and its encode against audiocraft 1.3.0's ResidualVectorQuantization.

Real shapes (B 1/8/32, T 750, K 8/32, bins 1024/2048, D 128/256) and odd ones (T 1 and 37, rows not a
multiple of the 48-row panel, bins not a multiple of the 8-code chunk, D 1/7/130).
"""
from __future__ import annotations

import pytest
import torch

import fastcodec.ops  # noqa: F401  (defines the fastcodec:: ops)
import fastcodec.ops.rvq_cpp as RC
from fastcodec import ResidualVectorQuantizer, _backend
from fastcodec._build import load_extension
from fastcodec.ops import rvq as R
from fastcodec.reference import functional as Fq
from fastcodec.reference.quantization import ResidualVectorQuantizer as RefRVQ
from tests.utils import assert_close, assert_codes_equivalent, max_abs_err

OPS = ("rvq_encode", "rvq_quantize", "rvq_decode", "ema_update", "kmeans")


@pytest.fixture(autouse=True)
def _force_cpp(monkeypatch):
    monkeypatch.setenv("FASTCODEC_RVQ_BACKEND", "cpp")


@pytest.fixture(scope="module")
def ext():
    return RC.extension()


def _problem(B, D, T, K, bins, seed=0):
    """x (B, D, T) and codebooks (K, bins, D) that quantize like trained ones on Gaussian data: layer k's
    codewords are Gaussian at 0.25x the std of layer k's residual, so each layer removes ~4-8% of the
    residual's energy (a trained 1024-entry codebook can remove ~10% at D=128) and the residual never
    collapses (a collapsing one would leave float64 certification of near-ties meaningless)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, T, generator=g)
    r = x.transpose(1, 2).reshape(B * T, D)
    cbs = []
    for _ in range(K):
        cb = torch.randn(bins, D, generator=g) * (0.25 * float(r.std()) if r.numel() > 1 else 0.25)
        r = r - cb[Fq.nearest_codes(r, cb)]
        cbs.append(cb)
    codebooks = torch.stack(cbs).contiguous()
    return x, codebooks, codebooks.pow(2).sum(-1)


def _check_quantize(x, codebooks, ours, ref):
    """Codes equal except certified near-ties; quantized/residuals bitwise equal wherever codes agree.
    ours, ref: (codes (B, K, T), quantized (B, D, T), residuals (K, B, D, T))."""
    (codes, q, res), (codes_r, q_r, res_r) = ours, ref
    flips = assert_codes_equivalent(codes, codes_r, x, codebooks)
    if flips == 0:
        assert torch.equal(q, q_r), "quantized differs with equal codes"
        assert torch.equal(res, res_r), "residuals differ with equal codes"
        return 0
    same = codes == codes_r  # (B, K, T)
    rows = same.all(1)  # (B, T)
    assert torch.equal(q.transpose(1, 2)[rows], q_r.transpose(1, 2)[rows]), "quantized differs where codes agree"
    # the input of layer k depends on the codes of layers < k only
    prefix = torch.cat([torch.ones_like(same[:, :1]), same.cumprod(1)[:, :-1].bool()], 1)  # (B, K, T)
    m = prefix.permute(1, 0, 2)  # (K, B, T)
    assert torch.equal(res.permute(0, 1, 3, 2)[m], res_r.permute(0, 1, 3, 2)[m]), "residuals differ where codes agree"
    return flips


def test_backend_is_cpp(ext):
    assert _backend.choose("rvq", "cpu") == "cpp"
    assert _backend.availability("rvq", "cpp", "cpu").ok
    for op in OPS:
        assert R.IMPLS[(op, "cpp")].__module__ == RC.__name__, op
    assert ext.simd() == _backend.kernel_path(_backend.simd_level())  # avx512, avx2 or portable



HAS_BF16 = "avx512_bf16" in open("/proc/cpuinfo").read()


@pytest.fixture
def fp32_search(ext):
    """Runs the test body with the bf16 candidate search off, restoring the previous setting."""
    def run(fn):
        if not ext.bf16_search_available():
            return fn()
        old = ext.set_bf16_search(False)
        try:
            return fn()
        finally:
            ext.set_bf16_search(old)
    return run


def _adversarial(D=128, bins=1024, K=4, T=300, seed=3):
    """Codebooks with exact duplicates (ties: the first index must win), codes 1e-7 apart (closer than bf16
    can resolve), and inputs sitting 1e-4 from codewords."""
    g = torch.Generator().manual_seed(seed)
    cb = torch.randn(K, bins, D, generator=g)
    cb[:, bins // 2:] = cb[:, : bins - bins // 2]
    cb[:, bins // 3 + 1] = cb[:, bins // 3] * (1 + 1e-7)
    x = cb[0, torch.randint(0, bins, (T,), generator=g)].T.unsqueeze(0).contiguous()
    x = x + 1e-4 * torch.randn(x.shape, generator=g)
    return x, cb, (cb * cb).sum(-1)


@pytest.mark.skipif(not HAS_BF16, reason="CPU without avx512_bf16: encode has only the float32 search")
@pytest.mark.parametrize("case", ["trained-like", "D256-bins2048", "odd-D", "tiny-scale", "huge-scale",
                                  "adversarial", "degenerate", "non-finite"])
def test_bf16_search_gives_the_float32_codes(ext, fp32_search, case):
    # the bf16 pass only chooses candidates (bound E on its error, every code within 2E of the best is
    # re-ranked with the float32 kernel's exact arithmetic): codes, quantized and residuals are bitwise equal
    assert ext.bf16_search_available()
    if case == "trained-like":
        x, cb, cn = _problem(3, 128, 200, 8, 1024)
    elif case == "D256-bins2048":
        x, cb, cn = _problem(1, 256, 150, 3, 2048)
    elif case == "odd-D":
        x, cb, cn = _problem(2, 7, 37, 3, 13)
    elif case in ("tiny-scale", "huge-scale"):
        x, cb, _ = _problem(1, 64, 100, 4, 256)
        s = 1e-18 if case == "tiny-scale" else 1e17
        x, cb = x * s, cb * s
        cn = (cb * cb).sum(-1)
    elif case == "adversarial":
        x, cb, cn = _adversarial()
    elif case == "degenerate":  # every code a candidate: the float32 search takes over these layers
        x, cb, _ = _problem(2, 64, 100, 3, 256)
        cb[0] = 0.0  # kmeans_init codebooks before their first training batch
        cb[2] = cb[2, :1]
        cn = (cb * cb).sum(-1)
    else:  # the op rejects these; the kernel itself must still give the float32 answer, never a wild index
        x, cb, cn = _problem(1, 32, 60, 2, 64)
        x[0, 3, 5], x[0, 4, 6], cb[1, 7, 0] = float("nan"), float("inf"), float("inf")
        cn = (cb * cb).sum(-1)
    fast = ext.encode(x, cb, cn, True, True)
    slow = fp32_search(lambda: ext.encode(x, cb, cn, True, True))
    for a, b, name in zip(fast, slow, ("codes", "quantized", "residuals")):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"{case}: {name} differ between the bf16 and float32 searches: {m}")
    assert int(fast[0].min()) >= 0 and int(fast[0].max()) < cb.shape[1]



@pytest.mark.parametrize("case", ["B1-T1-K8", "B3-T2-K4", "odd-D-bins13", "ties", "non-finite", "B1-T7-bins1000",
                                  "B5-T1-D130-bins40"])
def test_few_rows_path_matches_the_panel_path(ext, case):
    # up to 8 rows take encode_few (codes read in place, or from pack_few's copy); rows are independent, so the
    # first columns of a long input must give bitwise the same outputs through the panel path
    if case == "B1-T7-bins1000":  # 7 rows: 2 chunks in flight, 63 chunks = 31 pairs + 1 single, last one partial
        (B, D, Tf, K, bins), x, cb, cn = (1, 48, 7, 3, 1000), *_problem(1, 48, 60, 3, 1000)
    elif case == "B5-T1-D130-bins40":
        (B, D, Tf, K, bins), x, cb, cn = (5, 130, 1, 2, 40), *_problem(5, 130, 60, 2, 40)
    elif case == "B1-T1-K8":
        (B, D, Tf, K, bins), x, cb, cn = (1, 128, 1, 8, 1024), *_problem(1, 128, 60, 8, 1024)
    elif case == "B3-T2-K4":
        (B, D, Tf, K, bins), x, cb, cn = (3, 64, 2, 4, 256), *_problem(3, 64, 60, 4, 256)
    elif case == "odd-D-bins13":
        (B, D, Tf, K, bins), x, cb, cn = (2, 7, 3, 3, 13), *_problem(2, 7, 60, 3, 13)
    elif case == "ties":
        x, cb, cn = _adversarial(D=32, bins=64, K=3, T=60)
        B, D, Tf, K, bins = 1, 32, 8, 3, 64
    else:
        x, cb, cn = _problem(1, 32, 60, 2, 64)
        x[0, 3, 1], x[0, 4, 2], cb[1, 7, 0] = float("nan"), float("inf"), float("inf")
        cn = (cb * cb).sum(-1)
        B, D, Tf, K, bins = 1, 32, 4, 2, 64
    few = ext.encode(x[:, :, :Tf].contiguous(), cb, cn, True, True)
    packed = ext.encode(x[:, :, :Tf].contiguous(), cb, cn, True, True, ext.pack_few(cb))
    full = ext.encode(x, cb, cn, True, True)
    assert B * Tf <= ext.few_rows() == 8 < B * x.shape[-1]
    for path, out in (("in place", few), ("pack_few", packed)):
        for a, b, name in zip(out, (full[0][..., :Tf], full[1][..., :Tf], full[2][..., :Tf]),
                              ("codes", "quantized", "residuals")):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m: f"{case}, {path}: {name}: {m}")


def test_pack_few_layout_and_checks(ext):
    x, cb, cn = _problem(1, 5, 3, 2, 20)
    few = ext.pack_few(cb)
    assert few.shape == (2, 2, 5, 16)
    assert torch.equal(few[1, 1, :, :4], cb[1, 16:].t()) and not few[:, 1, :, 4:].any()
    with pytest.raises(ValueError, match="pack_few"):
        ext.encode(x, cb, cn, False, False, few[:1].contiguous())
    with pytest.raises(ValueError, match="pack_few"):
        ext.encode(x, cb, cn, False, False, few.transpose(2, 3).contiguous())
    with pytest.raises(TypeError, match="float32"):
        ext.encode(x, cb, cn, False, False, few.double())
    with pytest.raises(ValueError, match="contiguous"):
        ext.pack_few(cb.transpose(0, 1))


def test_quantizer_packs_its_own_codebooks_once_and_no_others(ext):
    # the quantizer's stacked codebooks are private (rebuilt when an embed changes), so a streamed frame reuses
    # their packed copy; a caller's own tensor is read in place, so an in-place write to it is never stale
    torch.manual_seed(0)
    q = ResidualVectorQuantizer(dimension=16, n_q=3, bins=64, kmeans_init=False).eval()
    x = torch.randn(1, 16, 1)
    with torch.no_grad():
        q.encode(x)
        cb, _ = q._codebooks(3)
        packed = RC._FEW.get(cb)
        assert packed is not None and torch.equal(packed, ext.pack_few(cb))
        q.encode(x)
        assert RC._FEW.get(cb) is packed
        q.vq.layers[1]._codebook.embed.mul_(-1.0)  # a new stacked copy, packed again on its first frame
        assert torch.equal(q.encode(x), RefRVQ.encode(q, x))
        own, norms = cb.clone(), (cb * cb).sum(-1)
        first = fastcodec.ops.rvq_encode(x, own, norms)
        own[1:].mul_(-1.0)
        after = fastcodec.ops.rvq_encode(x, own, norms)
        assert torch.equal(after, fastcodec.ops.rvq_encode(x, own.clone(), norms)) and not torch.equal(after, first)
        assert own not in RC._FEW

def test_bf16_search_switch(ext):
    if ext.bf16_search_available():
        assert ext.set_bf16_search(True) is True  # on by default
        assert ext.set_bf16_search(False) is True
        assert ext.set_bf16_search(True) is False
    else:
        with pytest.raises(ValueError, match="avx512_bf16"):
            ext.set_bf16_search(True)

REAL = {
    "B1-T750-K8-bins1024-D128": (1, 128, 750, 8, 1024),
    "B8-T750-K8-bins1024-D128": (8, 128, 750, 8, 1024),
    "B1-T750-K32-bins2048-D256": pytest.param((1, 256, 750, 32, 2048), marks=pytest.mark.slow),
    "B8-T750-K32-bins1024-D128": pytest.param((8, 128, 750, 32, 1024), marks=pytest.mark.slow),
    "B32-T750-K8-bins1024-D128": pytest.param((32, 128, 750, 8, 1024), marks=pytest.mark.slow),
    "B8-T750-K8-bins2048-D256": pytest.param((8, 256, 750, 8, 2048), marks=pytest.mark.slow),
}
ODD = {
    "B1-T1-K1-bins17-D7": (1, 7, 1, 1, 17),
    "B1-T1-K8-bins1024-D128": (1, 128, 1, 8, 1024),
    "B2-T37-K3-bins1000-D130": (2, 130, 37, 3, 1000),
    "B3-T37-K4-bins17-D7": (3, 7, 37, 4, 17),
    "B2-T5-K3-bins13-D1": (2, 1, 5, 3, 13),
    "B4-T33-K2-bins1-D5": (4, 5, 33, 2, 1),
    "B3-T250-K2-bins64-D8": (3, 8, 250, 2, 64),  # 750 rows: 16 panels of 48, the last ragged
    "B5-T601-K2-bins100-D16": (5, 16, 601, 2, 100),  # tiles of 768 rows straddle batch elements
}


@pytest.mark.parametrize("shape", list(REAL.values()) + list(ODD.values()), ids=list(REAL) + list(ODD))
def test_quantize_matches_reference(shape):
    B, D, T, K, bins = shape
    x, cb, cn = _problem(B, D, T, K, bins)
    codes, q, res = R.rvq_quantize(x, cb, cn, True)
    assert codes.shape == (B, K, T) and q.shape == (B, D, T) and res.shape == (K, B, D, T)
    ref = R._quantize_ref(x, cb, cn, True)
    flips = _check_quantize(x, cb, (codes, q, res), ref)
    print(f"\nnear-tie flips {flips} of {B * T} rows")
    assert torch.equal(R.rvq_encode(x, cb, cn), codes)
    _, q2, res2 = R.rvq_quantize(x, cb, cn, False)
    assert torch.equal(q2, q) and res2.numel() == 0
    # decode of the reference's codes: same additions in the same order
    codes_r = ref[0]
    assert torch.equal(R.rvq_decode(codes_r, cb), R._decode_ref(codes_r, cb))


def test_encode_matches_audiocraft(oracle):
    core_vq = oracle("audiocraft.quantization.core_vq")
    B, D, T, K, bins = 8, 128, 750, 8, 1024
    x, cb, cn = _problem(B, D, T, K, bins, seed=1)
    rvq = core_vq.ResidualVectorQuantization(dim=D, codebook_size=bins, num_quantizers=K, kmeans_init=False)
    for layer, e in zip(rvq.layers, cb):
        layer._codebook.embed.copy_(e)
    rvq.eval()
    theirs = rvq.encode(x).transpose(0, 1)  # audiocraft: (K, B, T)
    flips = assert_codes_equivalent(R.rvq_encode(x, cb, cn), theirs, x, cb)
    print(f"\nnear-tie flips vs audiocraft {flips} of {B * T} rows")
    assert torch.equal(R.rvq_decode(theirs.contiguous(), cb), rvq.decode(theirs.transpose(0, 1)))


def test_quantize_deterministic_and_thread_independent(ext):
    x, cb, cn = _problem(2, 64, 300, 4, 256)
    a = ext.encode(x, cb, cn, True, True)
    b = ext.encode(x, cb, cn, True, True)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        c = ext.encode(x, cb, cn, True, True)
    finally:
        torch.set_num_threads(n)
    for u, v, w in zip(a, b, c):
        assert torch.equal(u, v) and torch.equal(u, w)


def test_ties_take_the_first_index():
    # every codeword duplicated: the distances tie exactly, audiocraft's argmax keeps the lower index
    x, cb, _ = _problem(2, 16, 50, 2, 20)
    cb = torch.cat([cb, cb], 1).contiguous()
    cn = cb.pow(2).sum(-1)
    codes = R.rvq_encode(x, cb, cn)
    assert int(codes.max()) < 20
    assert torch.equal(codes, R._encode_ref(x, cb, cn))


def test_nan_codebook_gives_codes_in_range(ext):
    # NaN distances never win the strict `<`: codes stay in [0, bins) (x itself is checked for NaN)
    x, cb, cn = _problem(1, 8, 40, 2, 30)
    cb[0, :7] = float("nan")
    cn = cb.pow(2).sum(-1)
    codes = R.rvq_encode(x, cb, cn)
    assert int(codes.min()) >= 0 and int(codes.max()) < 30
    assert not bool((codes[:, 0] < 7).any())
    cb[:] = float("nan")
    codes, q, _ = ext.encode(torch.full_like(x, float("nan")), cb, cb.pow(2).sum(-1), True, False)
    assert int(codes.min()) == 0 and int(codes.max()) == 0


@pytest.mark.parametrize(
    "shape",
    [(1, 128, 750, 32, 1024), (3, 7, 37, 4, 17), (2, 130, 1, 3, 1000)],
    ids=["B1-T750-K32-bins1024-D128", "B3-T37-K4-bins17-D7", "B2-T1-K3-bins1000-D130"],
)
def test_decode_bitexact(shape):
    B, D, T, K, bins = shape
    cb = torch.randn(K, bins, D)
    codes = torch.randint(0, bins, (B, K, T))
    out = R.rvq_decode(codes, cb)
    assert torch.equal(out, R._decode_ref(codes, cb))
    assert torch.equal(out, R.rvq_decode(codes, cb))


def _ema_buffers(K, bins, D, g):
    cs = torch.rand(K, bins, generator=g) * 4
    avg = torch.randn(K, bins, D, generator=g)
    return cs, avg, avg / (cs.unsqueeze(-1) + 1)


def _ema_float64(residuals, codes, cs, avg, decay, eps):
    """The EMA update in float64 from the same float32 inputs, and the float32 error bound of each
    element: recursive summation of ``count`` rows plus the EMA's and the division's roundings,
    ``(count + 4) u (decay |avg| + (1 - decay) sum |x|)`` for embed_avg, that over ``smoothed`` plus
    ``8 u |embed|`` for embed (u = 2^-24)."""
    K, B, D, T = residuals.shape
    bins = cs.shape[1]
    u = 2.0**-24
    cs, avg = cs.double().clone(), avg.double().clone()
    avg_bound, emb, emb_bound = torch.empty_like(avg), torch.empty_like(avg), torch.empty_like(avg)
    for k in range(K):
        x = residuals[k].double().transpose(1, 2).reshape(B * T, D)
        onehot = torch.nn.functional.one_hot(codes[:, k].reshape(-1), bins).double()
        count = onehot.sum(0)
        scale = decay * avg[k].abs() + (1 - decay) * (onehot.t() @ x.abs())
        cs[k] = cs[k] * decay + count * (1 - decay)
        avg[k] = avg[k] * decay + (onehot.t() @ x) * (1 - decay)
        n = cs[k].sum()
        smoothed = ((cs[k] + eps) / (n + bins * eps) * n).unsqueeze(1)
        emb[k] = avg[k] / smoothed
        avg_bound[k] = (count.unsqueeze(1) + 4) * u * scale
        emb_bound[k] = avg_bound[k] / smoothed + 8 * u * emb[k].abs()
    return cs, avg, emb, avg_bound, emb_bound


@pytest.mark.parametrize(
    "shape",
    [(8, 128, 750, 8, 1024), (2, 130, 37, 3, 1000), (3, 7, 37, 2, 17)],
    ids=["B8-T750-K8-bins1024-D128", "B2-T37-K3-bins1000-D130", "B3-T37-K2-bins17-D7"],
)
def test_ema_update_matches_reference(shape):
    B, D, T, K, bins = shape
    g = torch.Generator().manual_seed(3)
    x, cb, cn = _problem(B, D, T, K, bins)
    codes, _, res = R._quantize_ref(x, cb, cn, True)
    cs, avg, emb = _ema_buffers(K, bins, D, g)
    ours = [t.clone() for t in (cs, avg, emb)]
    ref = [t.clone() for t in (cs, avg, emb)]
    R.ema_update(res, codes, *ours, 0.8, 1e-5)
    R._ema_ref(res, codes, *ref, 0.8, 1e-5)
    _, avg64, emb64, avg_bound, emb_bound = _ema_float64(res, codes, cs, avg, 0.8, 1e-5)
    # cluster_size: the same fma(count, 1-decay, cs*decay) as torch's add_(alpha=) -> bitwise equal
    assert torch.equal(ours[0], ref[0])
    for name, o, r, t, bound in zip(("embed_avg", "embed"), ours[1:], ref[1:], (avg64, emb64), (avg_bound, emb_bound)):
        # summation order differs from the reference's GEMM (here: each code's rows in ascending order);
        # both must sit within the float32 rounding bound of the float64 result, hence within 2x of each other.
        # Measured max err / bound: ours 0.44 (embed_avg) and 0.32 (embed) at B8-T750-K8, the reference the
        # same; ours vs reference max abs diff 3.8e-6 (embed_avg, |values| <= 20) and 1.9e-6 (embed)
        err_o, err_r = (o.double() - t).abs(), (r.double() - t).abs()
        print(f"\n{name}: max err / bound ours {(err_o / bound).max().item():.3f}, "
              f"reference {(err_r / bound).max().item():.3f}; ours vs reference {max_abs_err(o, r):.2e}")
        assert bool((err_o <= bound).all()), f"{name}: float32 error above the summation bound"
        assert bool(((o.double() - r.double()).abs() <= 2 * bound).all()), f"{name}: ours vs reference above 2x bound"


def test_ema_update_deterministic_and_thread_independent():
    B, D, T, K, bins = 4, 64, 300, 3, 256
    g = torch.Generator().manual_seed(4)
    res = torch.randn(K, B, D, T, generator=g)
    codes = torch.randint(0, bins, (B, K, T), generator=g)
    bufs = _ema_buffers(K, bins, D, g)
    outs = []
    n = torch.get_num_threads()
    try:
        for threads in (n, n, 1):
            torch.set_num_threads(threads)
            b = [t.clone() for t in bufs]
            R.ema_update(res, codes, *b, 0.99, 1e-5)
            outs.append(b)
    finally:
        torch.set_num_threads(n)
    for a, b in zip(outs[0], outs[1]):
        assert torch.equal(a, b)
    for a, b in zip(outs[0], outs[2]):
        assert torch.equal(a, b)


def test_ema_update_empty_batch():
    # no rows: every buffer only decays, as in the reference
    K, bins, D = 2, 16, 4
    g = torch.Generator().manual_seed(5)
    bufs = _ema_buffers(K, bins, D, g)
    ours = [t.clone() for t in bufs]
    ref = [t.clone() for t in bufs]
    res, codes = torch.empty(K, 0, D, 3), torch.empty(0, K, 3, dtype=torch.long)
    R.ema_update(res, codes, *ours, 0.8, 1e-5)
    R._ema_ref(res, codes, *ref, 0.8, 1e-5)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    # n = sum(cs) is summed in float64 here, in float32 by torch: (bins + 8) u relative covers that sum and
    # the smoothing's roundings (measured: bitwise equal at this size)
    assert_close(ours[2], ref[2], atol=0, rtol=(bins + 8) * 2.0**-24, name="embed")


def test_kmeans_bitexact_on_separated_clusters():
    # 40 well-separated clusters, 50 initial means: 3 duplicates (exact ties: the lower index wins, so
    # they start empty) and 4 far away (never chosen: empty clusters keep their mean). No near-ties,
    # so the Lloyd iterations must reproduce audiocraft's bit for bit.
    g = torch.Generator().manual_seed(6)
    D, C = 24, 40
    centers = torch.randn(C, D, generator=g) * 10
    samples = (centers[torch.randint(0, C, (3000,), generator=g)] + torch.randn(3000, D, generator=g)).contiguous()
    means = torch.cat([samples[:43], samples[:3], 1e3 + torch.randn(4, D, generator=g)]).contiguous()
    for iters in (1, 10):
        m, counts = R.kmeans(samples, means, iters)
        m_r, counts_r = R._kmeans_ref(samples, means, iters)
        assert torch.equal(counts, counts_r)
        assert torch.equal(m, m_r)
        assert int(counts[46:].sum()) == 0 and torch.equal(m[46:], means[46:])
        if iters == 1:
            assert int(counts[43:46].sum()) == 0 and torch.equal(m[43:46], means[43:46])
    m0, c0 = R.kmeans(samples, means, 0)
    assert torch.equal(m0, means) and int(c0.abs().sum()) == 0


def test_kmeans_one_iteration_random(ext):
    # random data has near-ties: the assignment may differ from the direct-difference distances only
    # there; the mean update from our assignment must be audiocraft's arithmetic exactly
    g = torch.Generator().manual_seed(7)
    N, D, C = 3000, 32, 256
    samples = torch.randn(N, D, generator=g)
    means = samples[torch.randperm(N, generator=g)[:C]].contiguous()
    m, counts, assign = ext.kmeans(samples, means, 1)
    dists = -((samples.unsqueeze(1) - means.unsqueeze(0)) ** 2).sum(-1)
    ref_assign = dists.max(-1).indices
    flips = assert_codes_equivalent(assign.view(1, 1, N), ref_assign.view(1, 1, N), samples.t().unsqueeze(0),
                                    means.unsqueeze(0), first_layer_exact=False)
    print(f"\nkmeans near-tie flips {flips} of {N}")
    assert torch.equal(counts, torch.bincount(assign, minlength=C))
    new = torch.zeros(C, D).scatter_add_(0, assign.unsqueeze(1).expand(-1, D), samples)
    new = new / counts.masked_fill(counts == 0, 1)[:, None]
    assert torch.equal(m, torch.where((counts == 0)[:, None], means, new))


def test_kmeans_strided_input():
    g = torch.Generator().manual_seed(8)
    big = torch.randn(600, 20, generator=g)
    samples = big[::2, ::2]
    means = samples[:10].clone()
    m, c = R.kmeans(samples, means, 3)
    m2, c2 = R.kmeans(samples.contiguous(), means, 3)
    assert torch.equal(m, m2) and torch.equal(c, c2)


def test_opcheck_every_op():
    x, cb, cn = _problem(2, 16, 20, 2, 30)
    codes, _, res = R._quantize_ref(x, cb, cn, True)
    cs, avg, emb = _ema_buffers(2, 30, 16, torch.Generator().manual_seed(9))
    samples = torch.randn(100, 16)
    cases = [
        (R.rvq_encode, (x, cb, cn)),
        (R.rvq_quantize, (x, cb, cn, True)),
        (R.rvq_quantize, (x, cb, cn, False)),
        (R.rvq_decode, (codes, cb)),
        (R.ema_update, (res, codes, cs, avg, emb, 0.8, 1e-5)),
        (R.kmeans, (samples, samples[:8].clone(), 3)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_compile_fullgraph():
    x, cb, cn = _problem(1, 8, 30, 2, 20)

    @torch.compile(fullgraph=True, backend="eager")
    def roundtrip(x):
        return R.rvq_decode(R.rvq_encode(x, cb, cn), cb)

    assert torch.equal(roundtrip(x), R._decode_ref(R._encode_ref(x, cb, cn), cb))


def test_bad_input_through_the_ops():
    x, cb, cn = _problem(1, 8, 10, 2, 20)
    codes = R.rvq_encode(x, cb, cn)
    xn = x.clone()
    xn[0, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        R.rvq_encode(xn, cb, cn)
    with pytest.raises(TypeError, match="float32"):
        R.rvq_encode(x.double(), cb, cn)
    with pytest.raises(ValueError, match="channels"):
        R.rvq_encode(x[:, :7].contiguous(), cb, cn)
    with pytest.raises(ValueError, match="contiguous"):
        R.rvq_encode(x.transpose(0, 2).contiguous().transpose(0, 2), cb, cn)
    with pytest.raises(ValueError, match="empty"):
        R.rvq_encode(x[:, :, :0], cb, cn)
    bad = codes.clone()
    bad[0, 1, 3] = 20
    with pytest.raises(ValueError, match="out of range"):
        R.rvq_decode(bad, cb)
    bad[0, 1, 3] = -1
    with pytest.raises(ValueError, match="out of range"):
        R.rvq_decode(bad, cb)
    with pytest.raises(TypeError, match="int64"):
        R.rvq_decode(codes.int(), cb)


def test_bad_input_direct_to_the_extension(ext):
    # called without the Python checks, the C++ still refuses instead of reading out of bounds
    x, cb, cn = _problem(1, 8, 10, 2, 20)
    codes = ext.encode(x, cb, cn, False, False)[0]
    with pytest.raises(TypeError, match="float32"):
        ext.encode(x.double(), cb, cn, False, False)
    with pytest.raises(ValueError, match="channels"):
        ext.encode(x[:, :7].contiguous(), cb, cn, False, False)
    with pytest.raises(ValueError, match="code_norms"):
        ext.encode(x, cb, cn[:, :5].contiguous(), False, False)
    with pytest.raises(ValueError, match="contiguous"):
        ext.encode(x.transpose(0, 2).contiguous().transpose(0, 2), cb, cn, False, False)
    with pytest.raises(ValueError, match="non-empty"):
        ext.encode(x, cb[:, :0].contiguous(), cn[:, :0].contiguous(), False, False)
    assert ext.encode(x[:, :, :0], cb, cn, True, True)[0].shape == (1, 2, 0)
    for v in (20, -1, 2**40):
        bad = codes.clone()
        bad[0, 1, 3] = v
        with pytest.raises(ValueError, match="out of range"):
            ext.decode(bad, cb)
    with pytest.raises(TypeError, match="int64"):
        ext.decode(codes.int(), cb)
    with pytest.raises(ValueError, match="codebooks"):
        ext.decode(codes, cb[:1].contiguous())
    res = torch.randn(2, 1, 8, 10)
    cs, avg, emb = torch.ones(2, 20), torch.randn(2, 20, 8), torch.randn(2, 20, 8)
    bad = codes.clone()
    bad[0, 0, 0] = 20
    with pytest.raises(ValueError, match="out of range"):
        ext.ema_update(res, bad, cs, avg, emb, 0.8, 1e-5)
    with pytest.raises(ValueError, match="codes must be"):
        ext.ema_update(res, codes[:, :, :5].contiguous(), cs, avg, emb, 0.8, 1e-5)
    with pytest.raises(ValueError, match="cluster_size"):
        ext.ema_update(res, codes, cs[:, :3].contiguous(), avg, emb, 0.8, 1e-5)
    with pytest.raises(ValueError, match="decay"):
        ext.ema_update(res, codes, cs, avg, emb, 1.5, 1e-5)
    with pytest.raises(ValueError, match="non-empty"):
        ext.kmeans(torch.randn(5, 8), torch.randn(0, 8), 2)
    with pytest.raises(ValueError, match="dim"):
        ext.kmeans(torch.randn(5, 8), torch.randn(3, 4), 2)
    with pytest.raises(ValueError, match="num_iters"):
        ext.kmeans(torch.randn(5, 8), torch.randn(3, 8), -1)


@pytest.mark.slow
def test_portable_build_matches_avx512(ext):
    # the fallback path (no AVX-512) does the same fma arithmetic in the same order: bitwise equal
    port = load_extension("rvq_cpu_portable", ["rvq_cpu.cpp"], ["-mno-avx2"])  # -mno-avx2 drops AVX-512 too
    assert port.simd() == "portable"
    for B, D, T, K, bins in ((2, 130, 37, 3, 1000), (3, 7, 37, 4, 17), (1, 64, 300, 2, 256)):
        x, cb, cn = _problem(B, D, T, K, bins)
        for a, b in zip(ext.encode(x, cb, cn, True, True), port.encode(x, cb, cn, True, True)):
            assert torch.equal(a, b)
        xf, few = x[:1, :, :5].contiguous(), ext.pack_few(cb)
        for a, b in zip(ext.encode(xf, cb, cn, True, True, few), port.encode(xf, cb, cn, True, True, few)):
            assert torch.equal(a, b)
        codes = torch.randint(0, bins, (B, K, T))
        assert torch.equal(ext.decode(codes, cb), port.decode(codes, cb))
        samples = x.transpose(1, 2).reshape(-1, D).contiguous()
        means = samples[: min(bins, samples.shape[0])].clone()
        for a, b in zip(ext.kmeans(samples, means, 3), port.kmeans(samples, means, 3)):
            assert torch.equal(a, b)
        codes, _, res = ext.encode(x, cb, cn, False, True)
        bufs = _ema_buffers(K, bins, D, torch.Generator().manual_seed(10))
        ours, theirs = [t.clone() for t in bufs], [t.clone() for t in bufs]
        ext.ema_update(res, codes, *ours, 0.8, 1e-5)
        port.ema_update(res, codes, *theirs, 0.8, 1e-5)
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)
