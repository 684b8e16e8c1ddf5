"""The ``triton`` backend of the RVQ ops against the reference implementations in fastcodec.ops.rvq.

Without CUDA the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by conftest.py before any
kernel is imported) at tiny shapes: the interpreter costs ~0.7 ms per program and ~4 ms per tl.dot
tile. The real shapes run only on a CUDA device.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastcodec.ops  # noqa: F401  (defines the fastcodec:: ops)
from fastcodec import _backend
from fastcodec.ops import rvq as R
from fastcodec.ops import rvq_triton as RT
from tests.utils import (U32, assert_close, assert_codes_equivalent, assert_lloyd_has_no_near_ties, max_abs_err,
                         requires_cuda)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError(
        "tests/test_rvq_triton.py needs TRITON_INTERPRET=1 without CUDA (tests/conftest.py sets it before "
        f"fastcodec.kernels is imported); got TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}"
    )

OPS = ("rvq_encode", "rvq_quantize", "rvq_decode", "ema_update", "kmeans")


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("FASTCODEC_RVQ_BACKEND", "triton")
    # the reference's r @ e.t() must be plain float32 on GPUs too
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = tf32


def _problem(B, D, T, K, bins, device=DEV):
    """x (B, D, T) and per-layer codebooks shrinking like the residual (0.6**k), with |e|^2."""
    x = torch.randn(B, D, T, device=device)
    scale = (0.6 ** torch.arange(K, device=device, dtype=torch.float32)).view(K, 1, 1)
    codebooks = (torch.randn(K, bins, D, device=device) * scale).contiguous()
    return x, codebooks, (codebooks * codebooks).sum(-1)


def _check_quantize(x, codebooks, code_norms, codes, q, res):
    """Codes equal except certified near-ties; quantized/residuals bitwise equal wherever codes agree."""
    codes_r, q_r, res_r = R._quantize_ref(x, codebooks, code_norms, True)
    flips = assert_codes_equivalent(codes, codes_r, x, codebooks)
    B, K, T = codes.shape
    same = codes == codes_r  # (B, K, T)
    rows = same.all(1)  # (B, T): every layer agrees
    assert torch.equal(q.transpose(1, 2)[rows], q_r.transpose(1, 2)[rows]), "quantized differs where codes agree"
    # the input of layer k depends on the codes of layers < k only
    prefix = torch.cat([torch.ones_like(same[:, :1]), same.cumprod(1)[:, :-1].bool()], 1)  # (B, K, T)
    m = prefix.permute(1, 0, 2)  # (K, B, T)
    assert torch.equal(res.permute(0, 1, 3, 2)[m], res_r.permute(0, 1, 3, 2)[m]), "residuals differ where codes agree"
    return flips


def _assert_err_vs_float64(name, got, ref32, ref64, factor=4.0):
    """got's error against float64 within ``factor`` x torch float32's own error on the same op (or u x
    the largest value, where torch happens to be exact): the kernels sum in another order than torch
    (measured ratios up to 1.45 here; 4 leaves room for another CPU's BLAS under the interpreter)."""
    err, err_ref = max_abs_err(got, ref64), max_abs_err(ref32, ref64)
    scale = ref64.abs().max().item()
    assert err <= factor * max(err_ref, U32 * scale), \
        f"{name}: error vs float64 {err:.3e} > {factor:g} x max(torch float32's {err_ref:.3e}, u x {scale:.3g})"


def test_backend_is_triton():
    assert _backend.choose("rvq", DEV) == "triton"
    for op in OPS:
        assert R.IMPLS[(op, "triton")].__module__ == RT.__name__, op
    if DEV == "cpu":
        from fastcodec.kernels import ema, rvq

        for k in (rvq._rvq_encode_kernel, rvq._rvq_decode_kernel, ema._ema_update_kernel):
            assert type(k).__name__ == "InterpretedFunction"


QUANT_SHAPES = {
    # N=300 rows: 5 row blocks of 64, the last ragged (44 rows); 8 codebook tiles of 32 per layer
    "B2-D32-T150-K3-bins256": (2, 32, 150, 3, 256),
    # D=16 (the smallest tl.dot); row blocks shrunk to 32; bins=100 leaves 4 entries in the last tile
    "B1-D16-T37-K2-bins100": (1, 16, 37, 2, 100),
    # D=48 padded to 64 with masks; bins=200 leaves 8 entries in the last tile
    "B3-D48-T20-K2-bins200": (3, 48, 20, 2, 200),
}


@pytest.mark.parametrize("shape", list(QUANT_SHAPES.values()), ids=list(QUANT_SHAPES))
def test_quantize_matches_reference(shape, nan_poison):
    x, cb, cn = _problem(*shape)
    codes, q, res = torch.ops.fastcodec.rvq_quantize(x, cb, cn, True)
    assert codes.dtype == torch.long and codes.shape == (shape[0], shape[3], shape[2])
    flips = _check_quantize(x, cb, cn, codes, q, res)
    print(f"\n{flips} of {shape[0] * shape[2]} rows flipped at exact duplicates or certified near-ties")


def test_quantize_deterministic_and_consistent():
    x, cb, cn = _problem(2, 32, 40, 2, 128)
    codes, q, res = torch.ops.fastcodec.rvq_quantize(x, cb, cn, True)
    again = torch.ops.fastcodec.rvq_quantize(x, cb, cn, True)
    assert all(torch.equal(u, v) for u, v in zip((codes, q, res), again))
    assert torch.equal(torch.ops.fastcodec.rvq_encode(x, cb, cn), codes)
    codes_n, q_n, res_n = torch.ops.fastcodec.rvq_quantize(x, cb, cn, False)
    assert torch.equal(codes_n, codes) and torch.equal(q_n, q) and res_n.numel() == 0


def test_ties_go_to_the_first_index():
    # integer data: every distance is exact, so ties are real ties, inside a tile and across tiles
    D, bins, K = 16, 128, 2
    cb = torch.randint(-1, 2, (K, bins, D)).float()
    cb[:, 5] = cb[:, 3]  # a duplicate inside the first 32-entry tile: entry 5 never chosen
    cb[:, 64:] = cb[:, :64]  # tiles 2-3 repeat tiles 0-1: entries 64..127 never chosen
    cb = cb.to(DEV).contiguous()
    cn = (cb * cb).sum(-1)
    x = torch.randint(-2, 3, (2, D, 60)).float().to(DEV)
    codes = torch.ops.fastcodec.rvq_encode(x, cb, cn)
    codes_r = R._encode_ref(x, cb, cn)
    assert torch.equal(codes, codes_r)
    assert int(codes.max()) < 64 and not bool((codes == 5).any())


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
def test_nan_input_gives_in_range_codes():
    x, cb, cn = _problem(2, 32, 40, 3, 100)
    clean = RT._launch_encode(x, cb, cn, True, True)
    bad = x.clone()
    bad[0, :, 3] = float("nan")
    bad[1, 7, 10] = float("nan")
    bad[1, :, 20] = float("inf")
    cb_bad = cb.clone()
    cb_bad[1, 17, 4] = float("nan")
    # the launcher itself, bypassing the op's finiteness check
    codes, _, _ = RT._launch_encode(bad, cb_bad, (cb_bad * cb_bad).sum(-1), True, True)
    assert int(codes.min()) >= 0 and int(codes.max()) < 100
    assert not bool((codes[:, 1] == 17).any()), "a NaN codeword was chosen"
    ok = torch.ones(2, 40, dtype=torch.bool, device=DEV)
    ok[0, 3] = ok[1, 10] = ok[1, 20] = False
    # layer 0 has no NaN codeword: the finite rows keep their codes
    assert torch.equal(codes[:, 0].masked_select(ok), clean[0][:, 0].masked_select(ok))
    with pytest.raises(ValueError, match="NaN or Inf"):
        torch.ops.fastcodec.rvq_encode(bad, cb, cn)


def test_decode_matches_reference(nan_poison):
    # D=160: two D tiles of 128, the second masked
    for B, K, T, bins, D in ((2, 3, 70, 50, 160), (1, 2, 9, 33, 16)):
        cb = torch.randn(K, bins, D, device=DEV)
        codes = torch.randint(0, bins, (B, K, T), device=DEV)
        out = torch.ops.fastcodec.rvq_decode(codes, cb)
        assert torch.equal(out, R._decode_ref(codes, cb)), (B, K, T, bins, D)
    # decoding the codes of an encode gives back its quantized sum, bit for bit
    x, cb, cn = _problem(2, 32, 40, 3, 100)
    codes, q, _ = torch.ops.fastcodec.rvq_quantize(x, cb, cn, False)
    assert torch.equal(torch.ops.fastcodec.rvq_decode(codes, cb), q)


def test_decode_direct_launch_never_reads_out_of_bounds():
    cb = torch.randn(2, 10, 16, device=DEV)
    codes = torch.tensor([[[-5, 3, 10_000]] * 2], device=DEV)  # (1, 2, 3)
    out = RT._launch_decode(codes, cb)  # the op would raise; the kernel clamps instead of faulting
    assert bool(torch.isfinite(out).all())


def test_bad_inputs_raise():
    x, cb, cn = _problem(1, 16, 8, 2, 32)
    codes = torch.zeros(1, 2, 8, dtype=torch.long, device=DEV)
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.fastcodec.rvq_decode(codes + 32, cb)
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.fastcodec.rvq_decode(codes - 1, cb)
    with pytest.raises(TypeError, match="int64"):
        torch.ops.fastcodec.rvq_decode(codes.int(), cb)
    with pytest.raises(ValueError, match="empty"):
        torch.ops.fastcodec.rvq_encode(x[:, :, :0], cb, cn)
    with pytest.raises(ValueError, match="channels"):
        torch.ops.fastcodec.rvq_encode(x[:, :8].contiguous(), cb, cn)
    with pytest.raises(TypeError, match="float32"):
        torch.ops.fastcodec.rvq_encode(x.double(), cb, cn)
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.fastcodec.rvq_encode(torch.randn(2, 8, 16, device=DEV).transpose(1, 2), cb, cn)
    big = torch.zeros(1, 640, 4, device=DEV)
    cb_big = torch.zeros(1, 16, 640, device=DEV)
    with pytest.raises(ValueError, match="dim <= 512"):
        torch.ops.fastcodec.rvq_encode(big, cb_big, torch.zeros(1, 16, device=DEV))
    res = torch.zeros(2, 1, 16, 8, device=DEV)
    cs, ea = torch.ones(2, 32, device=DEV), torch.zeros(2, 32, 16, device=DEV)
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.fastcodec.ema_update(res, codes + 40, cs, ea, ea.clone(), 0.99, 1e-5)
    with pytest.raises(ValueError, match="kmeans got no samples"):
        torch.ops.fastcodec.kmeans(torch.zeros(0, 16, device=DEV), ea[0], 2)


def _ema_all(residuals, codes, bufs, fn, decay=0.99, eps=1e-5):
    bufs = [b.clone() for b in bufs]
    fn(residuals, codes, *bufs, decay, eps)
    return bufs


EMA_SHAPES = {
    # ~1 row per code, many empty codes, 4 code blocks per layer under the interpreter
    "B2-D32-T150-K3-bins256": (2, 32, 150, 3, 256),
    # ~19 rows per code: segments longer than the 16-row step
    "B2-D16-T150-K2-bins16": (2, 16, 150, 2, 16),
}


@pytest.mark.parametrize("shape", list(EMA_SHAPES.values()), ids=list(EMA_SHAPES))
def test_ema_matches_reference(shape):
    B, D, T, K, bins = shape
    x, cb, cn = _problem(B, D, T, K, bins)
    codes, _, res = R._quantize_ref(x, cb, cn, True)
    bufs = [torch.rand(K, bins, device=DEV) * 2, torch.randn(K, bins, D, device=DEV),
            torch.empty(K, bins, D, device=DEV)]
    got = _ema_all(res, codes, bufs, torch.ops.fastcodec.ema_update)
    ref = _ema_all(res, codes, bufs, R._ema_ref)
    ref64 = _ema_all(res.double(), codes, [b.double() for b in bufs], R._ema_ref)
    if DEV == "cpu":
        # counts are exact and the one fma sits where torch's add_(alpha=1-decay) puts it
        assert torch.equal(got[0], ref[0]), "cluster_size"
    else:
        assert_close(got[0], ref[0], atol=0, rtol=2**-23, name="cluster_size")  # one rounding of the fma
    # the row sums are ordered differently from the reference's x^T @ onehot, so bound the error by
    # torch's own float32 error against float64. Measured over 4 seeds: embed_avg 1.9e-7..2.7e-7 for
    # both; embed the same for both except 1.6e-6 vs torch's 1.1e-6 (|embed| ~30)
    for i, name in ((1, "embed_avg"), (2, "embed")):
        _assert_err_vs_float64(name, got[i], ref[i], ref64[i])


def test_ema_with_no_rows_only_decays():
    K, B, D, T, bins = 2, 1, 16, 0, 32
    res, codes = torch.zeros(K, B, D, T, device=DEV), torch.zeros(B, K, T, dtype=torch.long, device=DEV)
    bufs = [torch.rand(K, bins, device=DEV), torch.randn(K, bins, D, device=DEV), torch.empty(K, bins, D, device=DEV)]
    got = _ema_all(res, codes, bufs, torch.ops.fastcodec.ema_update)
    ref = _ema_all(res, codes, bufs, R._ema_ref)
    for u, v, name in zip(got, ref, ("cluster_size", "embed_avg", "embed")):
        if DEV == "cpu":
            assert torch.equal(u, v), name  # measured: bitwise equal
        else:  # torch's CUDA sum of the cluster sizes may round differently: 2 ulps
            assert_close(u, v, atol=0, rtol=2**-22, name=name)


def test_ema_deterministic_and_independent_of_code_blocks(monkeypatch):
    B, D, T, K, bins = 2, 16, 100, 2, 64
    x, cb, cn = _problem(B, D, T, K, bins)
    codes, _, res = R._quantize_ref(x, cb, cn, True)
    codes[:, :, :60] = 3  # one long segment of 120 rows: eight 16-row steps
    bufs = [torch.rand(K, bins, device=DEV), torch.randn(K, bins, D, device=DEV), torch.empty(K, bins, D, device=DEV)]
    a = _ema_all(res, codes, bufs, torch.ops.fastcodec.ema_update)
    b = _ema_all(res, codes, bufs, torch.ops.fastcodec.ema_update)
    monkeypatch.setattr(RT, "_segment_config", lambda device_type, block_d: (8, 4))
    c = _ema_all(res, codes, bufs, torch.ops.fastcodec.ema_update)
    for u, v, w in zip(a, b, c):
        assert torch.equal(u, v) and torch.equal(u, w)


def test_kmeans_matches_reference():
    N, D, bins = 400, 16, 32
    samples = torch.randn(N, D, device=DEV)
    means0 = samples[torch.randperm(N, device=DEV)[:bins]].clone()
    means0[7] = 100.0  # far from every sample: an empty cluster keeps its mean
    means, counts = torch.ops.fastcodec.kmeans(samples, means0, 4)
    means_r, counts_r = R._kmeans_ref(samples, means0, 4)
    means_64, _ = R._kmeans_ref(samples.double(), means0.double(), 4)
    # certified: no assignment of the 4 steps is within the float32 bound of another, so the counts agree
    assert_lloyd_has_no_near_ties(samples, means0, 4)
    assert torch.equal(counts, counts_r), "bucket counts"
    assert int(counts[7]) == 0 and bool((means[7] == 100.0).all())
    # measured vs float64 over 4 seeds: 1.4e-7..1.9e-7 (triton), 1.7e-7..2.1e-7 (torch float32)
    _assert_err_vs_float64("means", means, means_r, means_64)
    m0, c0 = torch.ops.fastcodec.kmeans(samples, means0, 0)
    assert torch.equal(m0, means0) and not bool(c0.any())


def _check_mean_step(samples, means0, codes, means, counts):
    """One Lloyd mean step from ``codes`` (N,) against float64 means of that same assignment, relative
    to torch float32's own error (index_add_ of the same rows)."""
    bins, D = means0.shape
    assert torch.equal(counts, torch.bincount(codes, minlength=bins))
    keep = (counts == 0)[:, None]
    div = counts.clamp(min=1)[:, None]
    sum64 = torch.zeros(bins, D, dtype=torch.float64, device=samples.device).index_add_(0, codes, samples.double())
    sum32 = torch.zeros(bins, D, device=samples.device).index_add_(0, codes, samples)
    mean64 = torch.where(keep, means0.double(), sum64 / div)
    _assert_err_vs_float64("means", means, torch.where(keep, means0, sum32 / div), mean64)


def test_kmeans_assignment_is_the_search_kernel():
    # one Lloyd step on strided samples: assignments equal the reference's up to certified near-ties
    N, D, bins = 300, 24, 40
    base = torch.randn(D, N, device=DEV)
    samples = base.t()  # (N, D) with strides (1, N): no copy in the launcher
    means0 = samples[:bins].clone()
    means, counts = torch.ops.fastcodec.kmeans(samples, means0, 1)
    buckets_r = (-((samples.unsqueeze(1) - means0.unsqueeze(0)) ** 2).sum(-1)).max(-1).indices
    codes = RT._launch_encode(samples.t().contiguous()[None], means0[None].contiguous(),
                              (means0 * means0).sum(-1)[None], False, False)[0].view(N)
    assert_codes_equivalent(codes.view(1, 1, N), buckets_r.view(1, 1, N), samples.t()[None], means0[None])
    # measured over 4 seeds: 1.6e-7..1.9e-7 vs torch float32's 1.4e-7..3.4e-7
    _check_mean_step(samples, means0, codes, means, counts)


def _tiny():
    x, cb, cn = _problem(1, 16, 20, 2, 32)
    codes, q, res = R._quantize_ref(x, cb, cn, True)
    return x, cb, cn, codes, res


@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    x, cb, cn, codes, res = _tiny()
    if op == "rvq_encode":
        argsets = [(x, cb, cn)]
    elif op == "rvq_quantize":
        argsets = [(x, cb, cn, True), (x, cb, cn, False)]
    elif op == "rvq_decode":
        argsets = [(codes, cb)]
    elif op == "ema_update":
        argsets = [(res, codes, torch.rand(2, 32, device=DEV), torch.randn(2, 32, 16, device=DEV),
                    torch.empty(2, 32, 16, device=DEV), 0.9, 1e-5)]
    else:
        s = x[0].t().contiguous()
        argsets = [(s, s[:8].clone(), 2)]
    for args in argsets:
        torch.library.opcheck(getattr(torch.ops.fastcodec, op).default, args)


def test_compile_fullgraph():
    x, cb, cn, _, _ = _tiny()

    def f(x, cb, cn):
        codes, q, _ = torch.ops.fastcodec.rvq_quantize(x, cb, cn, False)
        return codes, x + (q - x).detach()

    torch._dynamo.reset()
    codes_c, out_c = torch.compile(f, fullgraph=True, backend="aot_eager")(x, cb, cn)
    codes_e, out_e = f(x, cb, cn)
    assert torch.equal(codes_c, codes_e) and torch.equal(out_c, out_e)


_SM90_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastcodec.kernels import ema, rvq
from fastcodec.ops import rvq_triton as RT

assert type(rvq._rvq_encode_kernel).__name__ == "JITFunction", "TRITON_INTERPRET leaked into the subprocess"
I64_PTRS = {"codes_ptr", "perm_ptr", "starts_ptr"}
FLOATS = {"decay", "one_minus_decay", "epsilon", "bins_epsilon"}


def build(fn, consts, num_warps, num_stages=2):
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    sig = {a: "constexpr" if a in consts else ("*i64" if a in I64_PTRS else "*fp32") if a.endswith("_ptr")
           else "fp32" if a in FLOATS else "i32" for a in fn.arg_names}
    opts = dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=False)
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32), options=opts)
    print(fn.__name__, consts, "compiled")


for D in (128, 256):
    cfg = RT._encode_config(32 * 750, D, 132)
    nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
    build(rvq._rvq_encode_kernel, dict(cfg, WRITE_Q=True, WRITE_RES=True), nw, ns)
cfg = RT._encode_config(32 * 750, 128, 132)
nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
build(rvq._rvq_encode_kernel, dict(cfg, WRITE_Q=False, WRITE_RES=False), nw, ns)
cfg = RT._decode_config(128)
nw = cfg.pop("num_warps")
build(rvq._rvq_decode_kernel, cfg, nw)
bc, nw = RT._segment_config("cuda", 128)
seg = dict(BLOCK_C=bc, BLOCK_R=RT._SEG_ROWS, BLOCK_D=128)
build(ema._ema_update_kernel, seg, nw)
build(ema._kmeans_update_kernel, seg, nw)
cfg = RT._normalize_config("cuda", 1024, 128)
nw = cfg.pop("num_warps")
build(ema._ema_normalize_kernel, cfg, nw)
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    # the interpreter runs kernels as numpy and accepts code that the GPU compiler rejects: compile
    # every kernel at the real-shape configs for sm_90 (Triton's bundled ptxas; no GPU needed)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    r = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=600)
    assert r.returncode == 0, f"sm_90 compile failed:\n{r.stdout}\n{r.stderr[-4000:]}"
    assert r.stdout.count("compiled") == 7, r.stdout


# Real shapes: CUDA only.

CUDA_SHAPES = {
    "B32-T750-K32-bins1024-D128": (32, 128, 750, 32, 1024),
    "B8-T750-K8-bins1024-D128": (8, 128, 750, 8, 1024),
    "B1-T750-K8-bins1024-D128": (1, 128, 750, 8, 1024),
    "B8-T750-K8-bins2048-D256": (8, 256, 750, 8, 2048),
}


@requires_cuda
@pytest.mark.slow
@pytest.mark.parametrize("shape", list(CUDA_SHAPES.values()), ids=list(CUDA_SHAPES))
def test_cuda_quantize_real_shapes(shape):
    x, cb, cn = _problem(*shape, device="cuda")
    codes, q, res = torch.ops.fastcodec.rvq_quantize(x, cb, cn, True)
    flips = _check_quantize(x, cb, cn, codes, q, res)
    print(f"{shape}: {flips} certified near-tie flips")
    again = torch.ops.fastcodec.rvq_quantize(x, cb, cn, True)
    assert all(torch.equal(u, v) for u, v in zip((codes, q, res), again))
    assert torch.equal(torch.ops.fastcodec.rvq_decode(codes, cb), R._decode_ref(codes, cb))


@requires_cuda
@pytest.mark.slow
@pytest.mark.parametrize("shape", list(CUDA_SHAPES.values()), ids=list(CUDA_SHAPES))
def test_cuda_ema_real_shapes(shape):
    B, D, T, K, bins = shape
    x, cb, cn = _problem(B, D, T, K, bins, device="cuda")
    codes, _, res = R._quantize_ref(x, cb, cn, True)
    codes[:, 0, : T // 2] = 0  # a collapsed code: one segment of B*T/2 rows
    bufs = [torch.rand(K, bins, device="cuda") * 2, torch.randn(K, bins, D, device="cuda"),
            torch.empty(K, bins, D, device="cuda")]
    got = _ema_all(res, codes, bufs, torch.ops.fastcodec.ema_update)
    again = _ema_all(res, codes, bufs, torch.ops.fastcodec.ema_update)
    assert all(torch.equal(u, v) for u, v in zip(got, again)), "EMA is not bitwise reproducible"
    ref = _ema_all(res, codes, bufs, R._ema_ref)
    ref64 = _ema_all(res.double(), codes, [b.double() for b in bufs], R._ema_ref)
    assert_close(got[0], ref[0], atol=0, rtol=2**-23, name="cluster_size")
    for i, name in ((1, "embed_avg"), (2, "embed")):
        _assert_err_vs_float64(name, got[i], ref[i], ref64[i])


@requires_cuda
@pytest.mark.slow
def test_cuda_kmeans_real_shape():
    N, D, bins = 16384, 128, 1024
    samples = torch.randn(N, D, device="cuda")
    means0 = samples[torch.randperm(N, device="cuda")[:bins]].clone()
    # assignment: the search kernel against float64 distances, up to certified near-ties
    codes = RT._launch_encode(samples.t().contiguous()[None], means0[None].contiguous(),
                              (means0 * means0).sum(-1)[None], False, False)[0].view(N)
    buckets_64 = torch.cdist(samples.double(), means0.double()).argmin(-1)
    assert_codes_equivalent(codes.view(1, 1, N), buckets_64.view(1, 1, N), samples.t()[None], means0[None])
    means, counts = torch.ops.fastcodec.kmeans(samples, means0, 1)
    _check_mean_step(samples, means0, codes, means, counts)
    a = torch.ops.fastcodec.kmeans(samples, means0, 5)
    b = torch.ops.fastcodec.kmeans(samples, means0, 5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
