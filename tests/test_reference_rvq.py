"""fastcodec.reference RVQ vs audiocraft 1.3.0 and encodec 0.1.1: eval, training (kmeans init, dead-code
expiry, quantizer dropout, orthogonal reg), state_dicts, the functional API and bad input.

The reference performs the same torch ops in the same order and layouts as audiocraft, so everything
compared with audiocraft is asserted bit-identical (measured max abs error 0 in every case)."""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from fastcodec.reference import functional as Fq
from fastcodec.reference.quantization import QuantizedResult, ResidualVectorQuantizer
from tests.utils import assert_close, max_abs_err, requires_cuda

AQ = "audiocraft.quantization.vq"
EC = "encodec.quantization.vq"
FRAME_RATE = 75
KEYS = ("inited", "cluster_size", "embed", "embed_avg")


def _assert_equal(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    if not torch.equal(actual, expected):
        if actual.is_floating_point():
            raise AssertionError(f"{name}: not bit-identical, max abs err {max_abs_err(actual, expected):.3e}")
        raise AssertionError(f"{name}: {int((actual != expected).sum())}/{actual.numel()} entries differ")


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module, what: str = "") -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb), f"state_dict keys differ: {sorted(set(sa) ^ set(sb))}"
    for k in sa:
        _assert_equal(sa[k], sb[k], f"{what}{k}")


def _pair(oracle, seed: int = 1, **kw):
    """Ours and audiocraft's quantizer, each built right after the same seed."""
    torch.manual_seed(seed)
    ours = ResidualVectorQuantizer(**kw)
    torch.manual_seed(seed)
    ref = oracle(AQ).ResidualVectorQuantizer(**kw)
    return ours, ref


EVAL_SHAPES = [
    pytest.param(128, 1024, 8, 1, 37, id="D128-bins1024-K8-B1-T37"),
    pytest.param(128, 1024, 8, 3, 150, id="D128-bins1024-K8-B3-T150"),
    pytest.param(32, 64, 4, 3, 37, id="D32-bins64-K4-B3-T37"),
    pytest.param(32, 64, 4, 2, 1, id="D32-bins64-K4-B2-T1"),
]


@pytest.mark.parametrize("D,bins,K,B,T", EVAL_SHAPES)
def test_eval_matches_audiocraft_and_encodec(oracle, D, bins, K, B, T):
    ours, ref = _pair(oracle, dimension=D, n_q=K, bins=bins, kmeans_init=False)
    # Kaiming-uniform codebooks drawn from the same seed: equal only if construction uses the RNG alike
    _assert_same_state(ours, ref)
    ours.eval()
    ref.eval()
    x = torch.randn(B, D, T) * 0.2  # codewords have norm ~1.4 (bound sqrt(6/D)), x ~0.2 sqrt(D): 1.1-2.3
    out, exp = ours(x, FRAME_RATE), ref(x, FRAME_RATE)
    assert isinstance(out, QuantizedResult)
    _assert_equal(out.codes, exp.codes, "codes")
    assert out.codes.shape == (B, K, T)
    _assert_equal(out.x, exp.x, "quantized")
    _assert_equal(out.penalty, exp.penalty, "penalty")
    _assert_equal(out.bandwidth, exp.bandwidth, "bandwidth")
    assert out.bandwidth.item() == pytest.approx(K * math.log2(bins) * FRAME_RATE / 1000)
    codes = ours.encode(x)
    _assert_equal(codes, ref.encode(x), "encode")
    _assert_equal(codes, out.codes, "encode vs forward codes")
    _assert_equal(ours.decode(codes), ref.decode(codes), "decode")
    _assert_equal(ours.decode(codes), out.x, "decode vs forward")
    _assert_same_state(ours, ref, "after eval: ")
    # a strided view (every other time step of a (B, 2T, D) buffer) gives the same bits as its copy
    xs = (torch.randn(B, 2 * T, D) * 0.2)[:, ::2].transpose(1, 2)
    out_s = ours(xs, FRAME_RATE)
    _assert_equal(out_s.codes, ref(xs, FRAME_RATE).codes, "codes of a strided input")
    _assert_equal(out_s.x, ours(xs.contiguous(), FRAME_RATE).x, "strided vs contiguous input")

    enc = oracle(EC).ResidualVectorQuantizer(dimension=D, n_q=K, bins=bins, kmeans_init=False).eval()
    enc.load_state_dict(ours.state_dict())
    e = enc(x, FRAME_RATE)
    _assert_equal(out.codes, e.codes.transpose(0, 1), "encodec codes")
    _assert_equal(out.x, e.quantized, "encodec quantized")
    _assert_equal(out.penalty, e.penalty, "encodec penalty")
    _assert_equal(out.bandwidth, e.bandwidth, "encodec bandwidth")
    _assert_equal(codes, enc.encode(x, FRAME_RATE).transpose(0, 1), "encodec encode")
    _assert_equal(ours.decode(codes), enc.decode(codes.transpose(0, 1)), "encodec decode")


def test_ties_go_to_the_lowest_index(oracle):
    ours, ref = _pair(oracle, dimension=8, n_q=2, bins=16, kmeans_init=False)
    with torch.no_grad():
        for m in (ours, ref):
            cb = m.vq.layers[0]._codebook.embed
            cb[5] = cb[3]
            cb[11] = cb[3]
    ours.eval()
    ref.eval()
    x = ours.vq.layers[0].codebook[3].view(1, 8, 1).repeat(2, 1, 3).clone()
    codes = ours.encode(x)
    assert (codes[:, 0] == 3).all(), codes[:, 0]
    _assert_equal(codes, ref.encode(x), "codes at exact ties")


TRAIN_CASES = [
    pytest.param(dict(dimension=32, bins=64, n_q=4, q_dropout=True, kmeans_iters=2, decay=0.9), 2, 48,
                 id="D32-bins64-K4-N96-randperm-qdropout"),
    pytest.param(dict(dimension=32, bins=64, n_q=3, kmeans_iters=3, orthogonal_reg_weight=0.3,
                      orthogonal_reg_active_codes_only=True, orthogonal_reg_max_codes=16), 1, 40,
                 id="D32-bins64-K3-N40-randint-ortho-active-max16"),
    pytest.param(dict(dimension=32, bins=64, n_q=2, kmeans_iters=2, threshold_ema_dead_code=3,
                      orthogonal_reg_weight=0.1), 3, 40,
                 id="D32-bins64-K2-N120-ortho-all"),
    # 2.4 s alone, 17 s with the 2 cores shared (k-means makes a 150 x 1024 x 128 difference tensor per step)
    pytest.param(dict(dimension=128, bins=1024, n_q=8, kmeans_iters=2), 2, 75, id="D128-bins1024-K8-N150-randint",
                 marks=pytest.mark.slow),
]


def _train(model, xs, w, seed: int, encodec: bool = False):
    """Three training steps (seed reset first); per step: outputs, input gradient, buffers, and how many
    codes were below the expiry threshold when the step began."""
    torch.manual_seed(seed)
    model.train()
    steps = []
    for x in xs:
        thr = model.threshold_ema_dead_code
        expiring = sum(int((layer._codebook.cluster_size < thr).sum()) for layer in model.vq.layers
                       if layer._codebook.inited.item())
        x = x.clone().requires_grad_()
        out = model(x, FRAME_RATE)
        xq = out.quantized if encodec else out.x
        codes = out.codes.transpose(0, 1) if encodec else out.codes
        ((xq * w).sum() + out.penalty).backward()
        rec = dict(x=xq.detach(), codes=codes, bandwidth=out.bandwidth, penalty=out.penalty.detach(),
                   grad=x.grad, expiring=expiring)
        rec.update({k: v.clone() for k, v in model.state_dict().items()})
        steps.append(rec)
    return steps


def _data(kw, B, T, n_steps: int = 3):
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(B, kw["dimension"], T, generator=g) for _ in range(n_steps)]
    return xs, torch.randn(B, kw["dimension"], T, generator=g)


@pytest.mark.parametrize("kw,B,T", TRAIN_CASES)
def test_training_matches_audiocraft(oracle, kw, B, T):
    xs, w = _data(kw, B, T)
    ours, ref = _pair(oracle, **kw)
    got, exp = _train(ours, xs, w, seed=3), _train(ref, xs, w, seed=3)
    for i, (a, e) in enumerate(zip(got, exp)):
        for k in a:
            if k != "expiring":
                _assert_equal(a[k], e[k], f"step {i}: {k}")
        assert a["penalty"].item() > 0 or i == 0, f"step {i}: the commitment penalty should be active"
    # the test exercises dead-code expiry (kmeans counts ~N/bins start below the threshold)
    assert any(a["expiring"] > 0 for a in got[1:]), [a["expiring"] for a in got]
    if kw.get("q_dropout"):
        used = {a["codes"].shape[1] for a in got}
        assert len(used) > 1, f"quantizer dropout drew the same n_q every step: {used}"


@pytest.mark.parametrize("kw,B,T", TRAIN_CASES[:1] + TRAIN_CASES[2:3])
def test_training_matches_encodec(oracle, kw, B, T):
    kw = {k: v for k, v in kw.items() if k not in ("q_dropout", "orthogonal_reg_weight")}
    xs, w = _data(kw, B, T)
    torch.manual_seed(1)
    ours = ResidualVectorQuantizer(**kw)
    enc = oracle(EC).ResidualVectorQuantizer(**kw)
    got, exp = _train(ours, xs, w, seed=3), _train(enc, xs, w, seed=3, encodec=True)
    for i, (a, e) in enumerate(zip(got, exp)):
        for k in ("codes", "penalty", "bandwidth") + tuple(k for k in a if k.startswith("vq.")):
            _assert_equal(a[k], e[k], f"step {i}: {k}")
        # encodec sums x_k + (q_k - x_k) over layers; audiocraft returns x + (sum q - x): the values differ by
        # rounding only, within 2 ulp of the largest magnitude (bound ~9e-7; measured max 1.2e-7 with |x| < 4).
        # Gradients differ by design (encodec issue #25) and are not compared.
        bound = 2 * torch.finfo(torch.float32).eps * float(max(xs[i].abs().max(), e["x"].abs().max()))
        assert_close(a["x"], e["x"], atol=bound, rtol=0, name=f"step {i}: quantized vs encodec")


def test_state_dict_loads_both_ways(oracle):
    kw = dict(dimension=16, bins=32, n_q=3, kmeans_iters=2)
    xs, _ = _data(kw, 2, 24, n_steps=2)
    torch.manual_seed(0)
    trained = ResidualVectorQuantizer(**kw).train()
    for x in xs:
        trained(x, FRAME_RATE)
    sd = trained.state_dict()
    assert list(sd) == [f"vq.layers.{i}._codebook.{k}" for i in range(3) for k in KEYS]

    for name in (AQ, EC):
        other = oracle(name).ResidualVectorQuantizer(**kw)
        other.load_state_dict(sd, strict=True)
        back = ResidualVectorQuantizer(**kw)
        back.load_state_dict(other.state_dict(), strict=True)
        _assert_same_state(back, trained, f"{name} round trip: ")
        for m in (trained, other, back):
            m.eval()
        x = torch.randn(2, 16, 10)
        codes = trained.encode(x)
        other_codes = other.encode(x) if name == AQ else other.encode(x, FRAME_RATE).transpose(0, 1)
        _assert_equal(codes, other_codes, f"{name} codes after loading ours")
        _assert_equal(back.encode(x), codes, f"codes after loading {name}'s")


def test_num_codebooks(oracle):
    ours, ref = _pair(oracle, dimension=16, n_q=6, bins=32, kmeans_init=False)
    assert ours.total_codebooks == 6 and ours.num_codebooks == 6
    ours.set_num_codebooks(3)
    ref.set_num_codebooks(3)
    assert ours.total_codebooks == 6 and ours.num_codebooks == 3
    ours.eval()
    ref.eval()
    x = torch.randn(2, 16, 9) * 0.4
    out, exp = ours(x, FRAME_RATE), ref(x, FRAME_RATE)
    assert out.codes.shape == (2, 3, 9)
    _assert_equal(out.codes, exp.codes, "codes with 3 of 6 codebooks")
    _assert_equal(out.x, exp.x, "quantized with 3 of 6 codebooks")
    _assert_equal(out.bandwidth, exp.bandwidth, "bandwidth with 3 of 6 codebooks")
    _assert_equal(ours.encode(x), out.codes, "encode with 3 of 6 codebooks")
    # decode takes any number of codebooks up to the total, not only the active ones
    full = torch.randint(0, 32, (2, 6, 9))
    _assert_equal(ours.decode(full), ref.decode(full), "decode of all 6 codebooks")


def test_functional_matches_module(nan_poison):
    torch.manual_seed(2)
    m = ResidualVectorQuantizer(dimension=32, n_q=4, bins=64, kmeans_init=False).eval()
    x = torch.randn(3, 32, 21) * 0.3
    out = m(x, FRAME_RATE)
    cbs = m.codebooks()
    assert cbs.shape == (4, 64, 32)
    z_q, codes = Fq.rvq_quantize(x, cbs)
    _assert_equal(codes, out.codes, "rvq_quantize codes")
    _assert_equal(z_q, out.x, "rvq_quantize z_q")
    _assert_equal(Fq.rvq_dequantize(codes, cbs), m.decode(codes), "rvq_dequantize")
    _assert_equal(Fq.rvq_dequantize(codes[:, :2], cbs), m.decode(codes[:, :2]), "rvq_dequantize, 2 of 4")
    _assert_equal(Fq.rvq_dequantize(codes.int(), cbs), z_q, "rvq_dequantize of int32 codes")


def test_init_codebooks_matches_first_kmeans_forward(oracle):
    kw = dict(dimension=16, n_q=3, bins=32, kmeans_iters=3)
    x = torch.randn(2, 16, 16)  # N == bins: the boundary where sample_vectors still uses randperm
    torch.manual_seed(5)
    cbs, sizes = Fq.init_codebooks(x, 3, 32, 3)
    ours, ref = _pair(oracle, **kw)
    for m in (ours, ref):
        torch.manual_seed(5)
        m.eval()(x, FRAME_RATE)  # audiocraft runs the k-means init on the first call, also in eval mode
    _assert_same_state(ours, ref, "kmeans init: ")
    for i, layer in enumerate(ours.vq.layers):
        cb = layer._codebook
        _assert_equal(cbs[i], cb.embed, f"layer {i} embed")
        _assert_equal(cbs[i], cb.embed_avg, f"layer {i} embed_avg")
        _assert_equal(sizes[i], cb.cluster_size, f"layer {i} cluster_size")
        assert cb.inited.item() == 1.0
    torch.manual_seed(5)
    cbs2, _ = Fq.init_codebooks(x.transpose(1, 2).reshape(-1, 16), 3, 32, 3)
    _assert_equal(cbs2, cbs, "init_codebooks on (N, D) vs (B, D, T)")


def test_commitment_loss_is_the_layer_penalty():
    torch.manual_seed(4)
    m = ResidualVectorQuantizer(dimension=8, n_q=1, bins=16, kmeans_init=False, threshold_ema_dead_code=0)
    embed = m.vq.layers[0].codebook.clone()
    x = (torch.randn(2, 8, 5) * 0.5).requires_grad_()
    out = m.train()(x, FRAME_RATE)
    xt = x.transpose(1, 2)
    q = F.embedding(out.codes[:, 0], embed)
    loss = Fq.commitment_loss(xt, xt + (q - xt).detach())
    _assert_equal(loss.detach(), out.penalty.detach(), "commitment_loss vs penalty")
    z_q = q.clone().requires_grad_()
    g, g_q = torch.autograd.grad(Fq.commitment_loss(xt, z_q), [x, z_q], allow_unused=True)
    assert g_q is None, "commitment_loss must not train the codebook through z_q"
    # d/dz mean((z - z_q)^2) = 2 (z - z_q) / numel; torch rounds (2/n) * d, we 2d / n: at most 2 ulp apart
    # (2.4e-7 relative); measured 1.9e-9 on |g| <= 0.03 (1 ulp)
    assert_close(g, (2 * (xt - q) / q.numel()).transpose(1, 2).detach(), atol=0, rtol=2.5e-7, name="grad")


@requires_cuda
def test_cuda_eval_matches_audiocraft(oracle):
    ours, ref = _pair(oracle, dimension=128, n_q=8, bins=1024, kmeans_init=False)
    ours, ref = ours.cuda().eval(), ref.cuda().eval()
    x = torch.randn(4, 128, 150, device="cuda") * 0.2
    out, exp = ours(x, FRAME_RATE), ref(x, FRAME_RATE)
    for k in ("codes", "x", "penalty", "bandwidth"):
        _assert_equal(getattr(out, k), getattr(exp, k), f"cuda {k}")
    _assert_equal(ours.decode(out.codes), ref.decode(out.codes), "cuda decode")
    with pytest.raises(ValueError, match="x is on cpu"):
        ours(x.cpu(), FRAME_RATE)
    with pytest.raises(ValueError, match="codes are on cpu"):
        ours.decode(out.codes.cpu())


def _module():
    return ResidualVectorQuantizer(dimension=8, n_q=3, bins=16, kmeans_init=False).eval()


BAD_X = [
    pytest.param(lambda: [[0.0]], TypeError, "torch.Tensor", id="list"),
    pytest.param(lambda: torch.ones(1, 8, 4, dtype=torch.long), TypeError, "floating-point", id="int64"),
    pytest.param(lambda: torch.ones(1, 8, 4, dtype=torch.float64), TypeError, "float64", id="float64"),
    pytest.param(lambda: torch.ones(8, 4), ValueError, r"\(batch, dim=8, time\)", id="2d"),
    pytest.param(lambda: torch.ones(1, 7, 4), ValueError, "7 channels", id="wrong-dim"),
    pytest.param(lambda: torch.ones(0, 8, 4), ValueError, "empty", id="B0"),
    pytest.param(lambda: torch.ones(1, 8, 0), ValueError, "empty", id="T0"),
    pytest.param(lambda: torch.ones(1, 8, 4).index_fill_(2, torch.tensor([2]), float("nan")), ValueError, "NaN",
                 id="nan"),
    pytest.param(lambda: torch.ones(1, 8, 4).index_fill_(2, torch.tensor([0]), float("inf")), ValueError, "Inf",
                 id="inf"),
]


@pytest.mark.parametrize("make,exc,msg", BAD_X)
@pytest.mark.parametrize("mode", ["forward-eval", "forward-train", "encode", "functional"])
def test_bad_x(make, exc, msg, mode):
    m = _module()
    with pytest.raises(exc, match=msg):
        if mode == "forward-eval":
            m(make(), FRAME_RATE)
        elif mode == "forward-train":
            m.train()(make(), FRAME_RATE)
        elif mode == "encode":
            m.encode(make())
        else:
            Fq.rvq_quantize(make(), m.codebooks())


@pytest.mark.parametrize("rate,exc,msg", [("75", TypeError, "number"), (True, TypeError, "number"),
                                          (0, ValueError, "> 0"), (float("nan"), ValueError, "> 0")])
def test_bad_frame_rate(rate, exc, msg):
    with pytest.raises(exc, match=msg):
        _module()(torch.ones(1, 8, 4), rate)


BAD_CODES = [
    pytest.param(lambda: torch.zeros(1, 3, 4), TypeError, "integer", id="float"),
    pytest.param(lambda: torch.zeros(1, 3, 4, dtype=torch.bool), TypeError, "integer", id="bool"),
    pytest.param(lambda: [0, 1], TypeError, "torch.Tensor", id="list"),
    pytest.param(lambda: torch.zeros(3, 4, dtype=torch.long), ValueError, r"\(batch, n_q, time\)", id="2d"),
    pytest.param(lambda: torch.zeros(1, 0, 4, dtype=torch.long), ValueError, "0 codebooks; expected 1 to 3",
                 id="K0"),
    pytest.param(lambda: torch.zeros(1, 4, 4, dtype=torch.long), ValueError, "4 codebooks; expected 1 to 3",
                 id="K-too-many"),
    pytest.param(lambda: torch.zeros(0, 3, 4, dtype=torch.long), ValueError, "empty", id="B0"),
    pytest.param(lambda: torch.zeros(1, 3, 0, dtype=torch.long), ValueError, "empty", id="T0"),
    pytest.param(lambda: torch.tensor([[[0, -1], [2, 3], [4, 5]]]), ValueError, r"\[-1, 5\], allowed \[0, 16\)",
                 id="negative"),
    pytest.param(lambda: torch.tensor([[[0, 16], [2, 3], [4, 5]]], dtype=torch.int32), ValueError,
                 r"\[0, 16\], allowed \[0, 16\)", id="too-large-int32"),
]


@pytest.mark.parametrize("make,exc,msg", BAD_CODES)
@pytest.mark.parametrize("api", ["module", "functional"])
def test_bad_codes(make, exc, msg, api):
    m = _module()
    with pytest.raises(exc, match=msg):
        m.decode(make()) if api == "module" else Fq.rvq_dequantize(make(), m.codebooks())


def test_integer_codes_are_converted():
    m = _module()
    codes = torch.randint(0, 16, (2, 3, 5))
    expected = m.decode(codes)
    for dt in (torch.int32, torch.int16, torch.uint8):
        _assert_equal(m.decode(codes.to(dt)), expected, f"decode of {dt} codes")


@pytest.mark.parametrize("n,exc", [(0, ValueError), (4, ValueError), (-1, ValueError), (2.0, TypeError)])
def test_bad_set_num_codebooks(n, exc):
    m = _module()
    with pytest.raises(exc, match="number of codebooks"):
        m.set_num_codebooks(n)
    assert m.num_codebooks == 3


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(n_q=0), ValueError, "n_q must be >= 1"),
    (dict(bins=0), ValueError, "bins must be >= 1"),
    (dict(dimension=0), ValueError, "dimension must be >= 1"),
    (dict(dimension=8.0), TypeError, "dimension must be an int"),
    (dict(decay=1.5), ValueError, "decay"),
    (dict(kmeans_iters=-1), ValueError, "kmeans_iters"),
    (dict(threshold_ema_dead_code=-1), ValueError, "threshold_ema_dead_code"),
    (dict(orthogonal_reg_max_codes=0), ValueError, "orthogonal_reg_max_codes"),
])
def test_bad_constructor_args(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        ResidualVectorQuantizer(**{"dimension": 8, "n_q": 2, "bins": 16, **kw})


def test_bad_state_dict():
    m = _module()
    sd = m.state_dict()
    missing = {k: v for k, v in sd.items() if k != "vq.layers.1._codebook.embed_avg"}
    with pytest.raises(RuntimeError, match=r'Missing key\(s\).*"vq\.layers\.1\._codebook\.embed_avg"'):
        _module().load_state_dict(missing)
    for key, bad in (("vq.layers.2._codebook.embed", torch.zeros(17, 8)),
                     ("vq.layers.0._codebook.cluster_size", torch.zeros(16, 1)),
                     ("vq.layers.0._codebook.inited", torch.zeros(()))):
        with pytest.raises(RuntimeError, match=f"size mismatch for {re.escape(key)}"):
            _module().load_state_dict({**sd, key: bad})
    extra = {**sd, "vq.layers.3._codebook.embed": torch.zeros(16, 8)}
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*vq\.layers\.3\._codebook\.embed"):
        _module().load_state_dict(extra)


@pytest.mark.parametrize("call,exc,msg", [
    (lambda cb: Fq.rvq_quantize(torch.ones(1, 8, 4), cb[0]), ValueError, r"\(n_q, bins, dim\)"),
    (lambda cb: Fq.rvq_quantize(torch.ones(1, 8, 4), cb.long()), TypeError, "codebooks must be a floating"),
    (lambda cb: Fq.rvq_quantize(torch.ones(1, 8, 4), cb[:, :, :4]), ValueError, "8 channels"),
    (lambda cb: Fq.rvq_quantize(torch.ones(1, 8, 4), cb[:0]), ValueError, "non-empty"),
    (lambda cb: Fq.init_codebooks(torch.ones(4), 2, 4, 1), ValueError, r"\(N, D\) or \(B, D, T\)"),
    (lambda cb: Fq.init_codebooks(torch.ones(0, 8), 2, 4, 1), ValueError, "empty"),
    (lambda cb: Fq.init_codebooks(torch.full((3, 8), float("nan")), 2, 4, 1), ValueError, "NaN"),
    (lambda cb: Fq.init_codebooks(torch.ones(3, 8, dtype=torch.long), 2, 4, 1), TypeError, "floating"),
    (lambda cb: Fq.init_codebooks(torch.ones(3, 8), 0, 4, 1), ValueError, "num_codebooks must be >= 1"),
    (lambda cb: Fq.init_codebooks(torch.ones(3, 8), 2, 0, 1), ValueError, "bins must be >= 1"),
    (lambda cb: Fq.init_codebooks(torch.ones(3, 8), 2, 4, -1), ValueError, "iters must be >= 0"),
    (lambda cb: Fq.init_codebooks(torch.ones(3, 8), 2, 4.0, 1), TypeError, "bins must be an int"),
    (lambda cb: Fq.commitment_loss(torch.ones(2, 3), torch.ones(3, 2)), ValueError, "same shape"),
    (lambda cb: Fq.commitment_loss(torch.ones(2, 3), None), TypeError, "two tensors"),
], ids=["cb-2d", "cb-int", "dim-mismatch", "cb-empty", "samples-1d", "samples-empty", "samples-nan",
        "samples-int", "K0", "bins0", "iters-neg", "bins-float", "loss-shapes", "loss-none"])
def test_bad_functional_input(call, exc, msg):
    cb = _module().codebooks()
    with pytest.raises(exc, match=msg):
        call(cb)
