"""``fastcodec.SEANetEncoder`` / ``SEANetDecoder`` (fused conv ops) against the reference.

Tolerance, per case: the fast float32 output may be at most ``FACTOR`` times as far from the float64
reference as PyTorch's own float32 output is, or as u = 2^-24 times the largest output where PyTorch
happens to be exact (a float32 result is at best within half an ulp). Measured: fast/PyTorch error
ratio 0.6-1.5 on the 24 kHz, 48 kHz and MusicGen configs. Gradients likewise, against float64 autograd.
"""
from __future__ import annotations

import pytest
import torch

import fastcodec
from fastcodec.reference.seanet import SEANetDecoder as RefDecoder
from fastcodec.reference.seanet import SEANetEncoder as RefEncoder
from tests.utils import max_abs_err

FACTOR = 4.0
U = 2.0 ** -24

CONFIGS = {
    "encodec24k": dict(channels=1, dimension=128, n_filters=32, n_residual_layers=1, ratios=[8, 5, 4, 2],
                       norm="weight_norm", causal=True, pad_mode="reflect", true_skip=False, compress=2, lstm=2),
    "musicgen32k": dict(channels=1, dimension=128, n_filters=64, n_residual_layers=1, ratios=[8, 5, 4, 4],
                        norm="weight_norm", causal=False, pad_mode="constant", true_skip=True, compress=2, lstm=2),
    "encodec48k": dict(channels=2, dimension=128, n_filters=32, n_residual_layers=1, ratios=[8, 5, 4, 2],
                       norm="time_group_norm", causal=False, pad_mode="reflect", true_skip=False, compress=2, lstm=2),
    "sweep-dil3-res2-nolstm": dict(channels=1, dimension=16, n_filters=4, n_residual_layers=2, ratios=[3, 2],
                                   dilation_base=3, norm="none", causal=True, pad_mode="constant", lstm=0,
                                   kernel_size=5, last_kernel_size=3, residual_kernel_size=5),
    "sweep-leaky-tanh-compress4": dict(channels=1, dimension=8, n_filters=8, n_residual_layers=1, ratios=[4],
                                       activation="LeakyReLU", activation_params={"negative_slope": 0.2},
                                       compress=4, causal=False, pad_mode="reflect", lstm=1,
                                       disable_norm_outer_blocks=1, norm="weight_norm"),
}


def _pair(cls_ref, cls_fast, cfg, **extra):
    torch.manual_seed(0)
    ref = cls_ref(**cfg, **extra)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fast = cls_fast(**cfg, **extra)
    fast.load_state_dict(ref.state_dict(), strict=True)
    ref64 = cls_ref(**cfg, **extra).double()
    ref64.load_state_dict(ref.state_dict())
    return ref, fast, ref64


def _assert_err(name, fast, torch32, ref64):
    """fast (float32) within FACTOR x max(PyTorch float32's error, u x the largest value) of ref64."""
    e_fast, e_torch = max_abs_err(fast, ref64), max_abs_err(torch32, ref64)
    scale = ref64.detach().abs().max().item()
    assert e_fast <= FACTOR * max(e_torch, U * scale), \
        f"{name}: fast error {e_fast:.3e} vs PyTorch float32's {e_torch:.3e} (u x {scale:.3g})"


def _check(ref, fast, ref64, x):
    with torch.no_grad():
        expected64 = ref64(x.double())
        y = fast(x)
        assert y.shape == expected64.shape
        _assert_err("output", y, ref(x), expected64)
    return y


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("length", [1, 17, 4001])
def test_encoder_matches_reference(name, length):
    cfg = CONFIGS[name]
    ref, fast, ref64 = _pair(RefEncoder, fastcodec.SEANetEncoder, cfg)
    x = torch.randn(2, cfg["channels"], length)
    _check(ref, fast, ref64, x)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("frames", [1, 2, 13])
def test_decoder_matches_reference(name, frames):
    cfg = CONFIGS[name]
    extra = {"trim_right_ratio": 0.5} if cfg.get("causal") and name.startswith("sweep") else {}
    ref, fast, ref64 = _pair(RefDecoder, fastcodec.SEANetDecoder, cfg, **extra)
    z = torch.randn(2, cfg["dimension"], frames)
    _check(ref, fast, ref64, z)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "centred"])
def test_replicate_padding_matches_reference(causal):
    """pad_mode="replicate" (accepted by audiocraft's SEANet): the kernels repeat the edge samples. 2100 samples:
    the residual blocks run fused (csrc resblock) as well as per conv (the 1-sample input)."""
    cfg = dict(channels=1, dimension=16, n_filters=8, n_residual_layers=1, ratios=[4, 2], norm="weight_norm",
               causal=causal, pad_mode="replicate", lstm=1)
    ref, fast, ref64 = _pair(RefEncoder, fastcodec.SEANetEncoder, cfg)
    for length in (1, 2100):
        _check(ref, fast, ref64, torch.randn(2, 1, length))
    ref, fast, ref64 = _pair(RefDecoder, fastcodec.SEANetDecoder, cfg)
    _check(ref, fast, ref64, torch.randn(2, 16, 300))


@pytest.mark.parametrize("which", ["encoder", "decoder"])
def test_gradients_match_reference(which):
    cfg = CONFIGS["encodec24k"]
    cls_ref, cls_fast = (RefEncoder, fastcodec.SEANetEncoder) if which == "encoder" else (RefDecoder, fastcodec.SEANetDecoder)
    ref, fast, ref64 = _pair(cls_ref, cls_fast, cfg)
    x = torch.randn(1, 1, 3000) if which == "encoder" else torch.randn(1, 128, 9)
    xr, xf, x64 = x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()
    for m, xi in ((ref, xr), (fast, xf), (ref64, x64)):
        m(xi).square().mean().backward()
    # the backward runs in ATen for both, on float32 forwards that differ by rounding
    _assert_err("input grad", xf.grad, xr.grad, x64.grad)
    # parameters: the largest error over all of them, each relative to its largest float64 gradient,
    # against PyTorch's own. Pooled, because one tensor of a few elements (the last conv's weight_g) gives
    # a noisy ratio: measured pooled ratio 0.5-1.6 over 22 seeds, per tensor up to 5.4
    rel = {"fast": [], "torch": []}
    for (n, pr), pf, p64 in zip(ref.named_parameters(), fast.parameters(), ref64.parameters()):
        s = p64.grad.abs().max().item()
        rel["fast"].append((max_abs_err(pf.grad, p64.grad) / s, n))
        rel["torch"].append((max_abs_err(pr.grad, p64.grad) / s, n))
    (e_fast, n_fast), (e_torch, _) = max(rel["fast"]), max(rel["torch"])
    assert e_fast <= FACTOR * max(e_torch, U), f"grad {n_fast}: relative error {e_fast:.3e} vs PyTorch's {e_torch:.3e}"


def test_torch_compile_fullgraph():
    cfg = CONFIGS["encodec24k"]
    _, fast, _ = _pair(RefEncoder, fastcodec.SEANetEncoder, cfg)
    x = torch.randn(1, 1, 2000)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), fast(x))  # the same ops on the same inputs


def test_forced_reference_backend(monkeypatch):
    monkeypatch.setenv("FASTCODEC_CONV_BACKEND", "reference")
    cfg = CONFIGS["encodec24k"]
    ref, fast, _ = _pair(RefEncoder, fastcodec.SEANetEncoder, cfg)
    monkeypatch.setattr(fastcodec.steps.conv.conv_ops, "conv1d", lambda *a, **k: pytest.fail("fast op used"))
    x = torch.randn(1, 1, 500)
    with torch.no_grad():
        assert torch.equal(fast(x), ref(x))


@pytest.mark.parametrize("bad, err, match", [
    (torch.randn(1, 2, 100), ValueError, "1 channels"),
    (torch.randn(1, 100), ValueError, "rank 2"),
    (torch.randn(1, 1, 0), ValueError, "empty"),
    (torch.ones(1, 1, 100, dtype=torch.long), TypeError, "floating"),
])
def test_bad_input(bad, err, match):
    enc = fastcodec.SEANetEncoder(**CONFIGS["encodec24k"])
    with pytest.raises(err, match=match):
        enc(bad)


@pytest.mark.parametrize("name", ["encodec24k", "musicgen32k", "sweep-dil3-res2-nolstm"])
@pytest.mark.parametrize("which", ["encoder", "decoder"])
def test_tiled_residual_blocks_are_bitwise_the_untiled_ones(monkeypatch, name, which):
    # inference on long signals runs residual blocks tile by tile (halo from the neighbours, padding only at
    # the signal's ends): every output sample comes from the same kernel arithmetic, so bitwise equal.
    # Small tiles here (the real one is 8192 samples) so short inputs cross many tile edges.
    from fastcodec.steps import residual as S

    cls = fastcodec.SEANetEncoder if which == "encoder" else fastcodec.SEANetDecoder
    torch.manual_seed(0)
    m = cls(**CONFIGS[name]).eval()
    x = torch.randn(2, CONFIGS[name]["channels"], 3001) if which == "encoder" else \
        torch.randn(2, CONFIGS[name]["dimension"], 41)
    tiled = []
    real = S.ResStep._tiled
    monkeypatch.setattr(S.ResStep, "_tiled", lambda self, h: tiled.append(h.shape[-1]) or real(self, h))
    monkeypatch.setattr(S, "_RES_FUSED_MIN", 74)
    with torch.no_grad():
        y = m(x)
    assert tiled, "no residual block was tiled"
    monkeypatch.setattr(S, "_RES_FUSED_MIN", 10 ** 9)
    with torch.no_grad():
        y_ref = m(x)
    assert torch.equal(y, y_ref)
    with torch.enable_grad():  # training keeps the autograd path
        monkeypatch.setattr(S, "_RES_FUSED_MIN", 74)
        tiled.clear()
        m(x)
        assert not tiled


# ---------------------------------------------------------------------------------------------
# the fused residual block (csrc resblock: one parallel region over time tiles)
# ---------------------------------------------------------------------------------------------


class _threads:
    """Run a block with torch's intra-op thread count set to n, restored after."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


def _res_pair(dim, dilation, causal, pad_mode, true_skip):
    """A reference SEANetResnetBlock with perturbed weight-norm weights and its fast step."""
    from fastcodec import steps
    from fastcodec.reference.seanet import SEANetResnetBlock

    blk = SEANetResnetBlock(dim, dilations=(dilation, 1), norm="weight_norm", causal=causal, pad_mode=pad_mode,
                            true_skip=true_skip)
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return blk, steps.build(blk, "", None, dim)[0]


def _res_plain(step, x):
    """The block as three separate fastcodec conv1d calls (the untiled arithmetic, written out)."""
    from fastcodec.steps import residual as S
    from fastcodec.ops import conv as conv_ops

    s0, s1, sc = step.steps[0], step.steps[1], step.shortcut
    right = 0 if s0.module.causal else s0.padding_total // 2
    h = conv_ops.conv1d(x, S._weight(s0.conv), s0.conv.bias, None, 1, s0.dilation, s0.padding_total - right, right,
                        s0.module.pad_mode, s0.alpha)
    skip = x if sc is None else conv_ops.conv1d(x, S._weight(sc.conv), sc.conv.bias)
    return conv_ops.conv1d(h, S._weight(s1.conv), s1.conv.bias, skip, elu_alpha=s1.alpha)


@pytest.mark.parametrize("dim", [32, 64, 20], ids=lambda c: f"C{c}")
@pytest.mark.parametrize("true_skip", [True, False], ids=["identity", "conv-shortcut"])
@pytest.mark.parametrize("causal, pad_mode", [(True, "reflect"), (False, "reflect"), (True, "constant"),
                                              (False, "constant")], ids=["causal-reflect", "centred-reflect",
                                                                         "causal-constant", "centred-constant"])
def test_fused_resblock_is_bitwise_the_untiled_block(monkeypatch, dim, true_skip, causal, pad_mode):
    # every output is the same chunked sum over r = ci*kernel + k in the same order, whatever the tile or the
    # thread: bitwise equal to the untiled step and to three plain conv1d calls. Tiles of 64 frames (one
    # micro-tile), 37 (not a whole vector: partial vectors and row tails) and the automatic choice.
    from fastcodec.steps import residual as S

    ref64_err = []
    for dilation in (1, 3):
        blk, step = _res_pair(dim, dilation, causal, pad_mode, true_skip)
        blk64 = type(blk)(dim, dilations=(dilation, 1), norm="weight_norm", causal=causal, pad_mode=pad_mode,
                          true_skip=true_skip).double()
        blk64.load_state_dict(blk.state_dict())
        for tile in (64, 37, 0):
            t_unit = tile or 64
            for B, T in ((1, 2 * t_unit), (3, 2 * t_unit + 1), (1, 5 * t_unit + 13)):
                x = torch.randn(B, dim, T)
                for threads in (1, 2):
                    with torch.no_grad(), _threads(threads):
                        y = step._tiled(x, tile)
                        monkeypatch.setattr(S, "_RES_FUSED_MIN", 10 ** 9)
                        y_untiled = step(x)
                        y_plain = _res_plain(step, x)
                    case = f"dilation {dilation} tile {tile} B{B} T{T} threads {threads}"
                    assert torch.equal(y, y_untiled), f"fused != untiled ({case})"
                    assert torch.equal(y, y_plain), f"fused != plain conv1d calls ({case})"
                with torch.no_grad():
                    expected64 = blk64(x.double())
                    e_torch = (blk(x).double() - expected64).abs().max().item()
                    e_fast = (y.double() - expected64).abs().max().item()
                ref64_err.append((e_fast, e_torch, expected64.abs().max().item()))
    for e_fast, e_torch, scale in ref64_err:
        assert e_fast <= FACTOR * max(e_torch, U * scale), \
            f"fused error {e_fast:.3e} vs PyTorch float32's {e_torch:.3e} (u x {scale:.3g})"


def test_fused_resblock_strided_inputs():
    # x sliced from a bigger buffer (channel stride != T) and x with a non-unit time stride (copied inside)
    _, step = _res_pair(32, 3, False, "reflect", True)
    big = torch.randn(2, 40, 700)
    xs = (big[:, 4:36, 50:650], torch.randn(2, 600, 32).transpose(1, 2))
    for x in xs:
        with torch.no_grad():
            assert torch.equal(step._tiled(x, 64), _res_plain(step, x.contiguous()))


def test_fused_resblock_writes_every_output():
    # out prefilled with NaN: every element must be overwritten (odd T, partial last tile, B=3)
    from fastcodec.steps import residual as S
    from fastcodec.ops import conv as conv_ops

    _, step = _res_pair(20, 3, True, "constant", False)
    s0, s1, sc = step.steps[0], step.steps[1], step.shortcut
    x = torch.randn(3, 20, 301)
    out = torch.full((3, 20, 301), float("nan"))
    pw = lambda conv: conv_ops._packed_weight(S._weight(conv))  # noqa: E731
    with torch.no_grad():
        conv_ops._cpu_ext().resblock(x, pw(s0.conv), s0.conv.bias, pw(s1.conv), s1.conv.bias, pw(sc.conv),
                                     sc.conv.bias, out, 10, 3, 3, 6, 0, 0, 1.0, 1.0, 37)
        assert torch.equal(out, _res_plain(step, x))


def test_fused_resblock_through_the_module(monkeypatch):
    # the module path picks the fused block for signals of at least _RES_FUSED_MIN samples (lowered here)
    from fastcodec.steps import residual as S

    _, step = _res_pair(32, 1, True, "reflect", False)
    x = torch.randn(1, 32, 1000)
    calls = []
    real = S.ResStep._tiled
    monkeypatch.setattr(S.ResStep, "_tiled", lambda self, h, tile=None: calls.append(1) or real(self, h, tile))
    monkeypatch.setattr(S, "_RES_FUSED_MIN", 200)
    with torch.no_grad():
        y = step(x)
    assert calls
    assert torch.equal(y, _res_plain(step, x))


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_resblock_real_shape(threads):
    # the 24 kHz encoder's first block at 10 s (C=32, T=240000, conv shortcut), automatic tiles
    _, step = _res_pair(32, 1, True, "reflect", False)
    x = torch.randn(1, 32, 240000)
    with torch.no_grad(), _threads(threads):
        assert torch.equal(step._tiled(x), _res_plain(step, x))


def _resblock_args(C=32, c_hid=16, T=300, shortcut=True):
    from fastcodec.ops import conv as conv_ops

    ext = conv_ops._cpu_ext()
    x = torch.randn(1, C, T)
    w0 = ext.pack_weight(torch.randn(c_hid, C, 3))
    w1 = ext.pack_weight(torch.randn(C, c_hid, 1))
    wsc = ext.pack_weight(torch.randn(C, C, 1)) if shortcut else None
    args = dict(x=x, w0=w0, b0=torch.randn(c_hid), w1=w1, b1=torch.randn(C), wsc=wsc,
                bsc=torch.randn(C) if shortcut else None, out=torch.empty(1, C, T), c_hid=c_hid, kernel0=3,
                dilation0=1, pad_left=2, pad_right=0, pad_mode=1, alpha0=1.0, alpha1=1.0, tile=64)
    return ext, args


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(x=torch.randn(1, 30, 300)), "packed weight 0 has shape"),
    (lambda a: a.update(c_hid=24), "packed weight 0 has shape"),
    (lambda a: a.update(w1=a["w1"][:, :8].contiguous()), "packed weight 1 has shape"),
    (lambda a: a.update(wsc=a["wsc"][:1].contiguous()), "packed shortcut weight has shape"),
    (lambda a: a.update(wsc=None, bsc=None, out=torch.empty(1, 30, 300), w1=a["w1"][:5].contiguous()),
     "identity shortcut needs c_out == c_in"),
    (lambda a: a.update(b1=torch.randn(31)), "bias 1 must be"),
    (lambda a: a.update(pad_left=3), "sum to"),
    (lambda a: a.update(out=torch.empty(1, 32, 299)), "out must be a contiguous"),
    (lambda a: a.update(out=torch.empty(1, 300, 32).transpose(1, 2)), "out must be a contiguous"),
    (lambda a: a.update(out=a["x"]), "share x's storage"),
    (lambda a: a.update(x=a["x"].double()), "x must be float32"),
    (lambda a: a.update(x=torch.randn(1, 32, 0)), "non-empty"),
    (lambda a: a.update(tile=-1), "tile >= 0"),
    (lambda a: a.update(pad_mode=7), "bad pad_mode"),
], ids=["x-channels", "c_hid", "w1-shape", "wsc-shape", "identity-c_out", "bias", "padding", "out-shape",
        "out-strides", "out-aliases-x", "dtype", "empty", "tile", "pad_mode"])
def test_fused_resblock_bad_input(change, match):
    ext, args = _resblock_args()
    ext.resblock(*args.values())  # the unchanged arguments are valid
    change(args)
    with pytest.raises(RuntimeError, match=match):
        ext.resblock(*args.values())


# ---------------------------------------------------------------------------------------------
# the activation pool (fastcodec/_pool.py): layer outputs reused across layers and calls
# ---------------------------------------------------------------------------------------------


def _pool_of(m):
    return m.__dict__.get("_activation_pool_obj")


@pytest.mark.parametrize("name", ["encodec24k", "encodec48k"])
@pytest.mark.parametrize("which", ["encoder", "decoder"])
def test_activation_pool_is_bitwise_the_plain_forward(monkeypatch, name, which):
    # the pool changes where outputs live, never what is computed; the caller's output is its own
    torch.manual_seed(0)
    cls = fastcodec.SEANetEncoder if which == "encoder" else fastcodec.SEANetDecoder
    m = cls(**CONFIGS[name]).eval()
    cfg = CONFIGS[name]
    xs = [torch.randn(2, cfg["channels"], 4001), torch.randn(1, cfg["channels"], 2500)] if which == "encoder" else \
        [torch.randn(2, cfg["dimension"], 31), torch.randn(1, cfg["dimension"], 20)]
    monkeypatch.setenv("FASTCODEC_POOL_MB", "0")
    with torch.no_grad():
        plain = [m(x) for x in xs]
    assert _pool_of(m) is None
    monkeypatch.delenv("FASTCODEC_POOL_MB")
    with monkeypatch.context() as mp, torch.no_grad():
        mp.delattr(torch._C, "_storage_Use_Count")  # a torch without the use count: plain allocations
        assert all(torch.equal(m(x), y) for x, y in zip(xs, plain)) and _pool_of(m) is None
    with torch.no_grad():
        first = [m(x) for x in xs]
        kept = [y.clone() for y in first]
        again = [m(x) for x in xs + xs]
    pool = _pool_of(m)
    assert pool is not None and pool.slots, "no layer output went through the pool"
    for y, y_plain, y_kept, y2, y3 in zip(first, plain, kept, again[:2], again[2:]):
        assert torch.equal(y, y_plain) and torch.equal(y2, y_plain) and torch.equal(y3, y_plain)
        assert torch.equal(y, y_kept), "a later call overwrote an earlier output"
        assert not pool.owns(y) and not pool.owns(y2)
    held = pool.nbytes()
    with torch.inference_mode():
        m(xs[0])
    assert pool.nbytes() == held, "the pool grew on a repeated shape"


def test_activation_pool_hands_out_only_free_buffers(monkeypatch):
    from fastcodec import _pool

    pool = _pool.ActivationPool()
    a = pool.empty((2, 3, 100))
    b = pool.empty((2, 3, 100))
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    view = a[:, 1:, 10:].transpose(1, 2)  # a view of a view keeps the buffer in use
    ptr_a = a.untyped_storage().data_ptr()
    del a
    c = pool.empty((600,))
    assert c.untyped_storage().data_ptr() not in (ptr_a, b.untyped_storage().data_ptr())
    del view
    d = pool.empty((5, 100))  # the smallest free buffer that fits: a's, now unviewed
    assert d.untyped_storage().data_ptr() == ptr_a and pool.nbytes() == 3 * 600 * 4
    monkeypatch.setenv("FASTCODEC_POOL_MB", "0.008")  # 8.2 KiB: the 3 busy 2.4 KB buffers leave no room for a 4th
    e = pool.empty((600,))
    assert not pool.owns(e) and pool.nbytes() == 3 * 600 * 4
    del b, c, d
    fastcodec.release_pools()
    assert pool.nbytes() == 0
    # over the cap, free buffers are dropped (smallest first) to make room, whatever their place in the list
    monkeypatch.setenv("FASTCODEC_POOL_MB", str(700 * 4 / 2**20))
    keep, small, mid = pool.empty((100,)), pool.empty((50,)), pool.empty((200,))
    del small, mid
    big = pool.empty((600,))
    assert pool.owns(big) and pool.owns(keep) and pool.nbytes() == 700 * 4
    for bad in ("-1", "lots", "nan", "inf"):
        monkeypatch.setenv("FASTCODEC_POOL_MB", bad)
        with pytest.raises(ValueError, match="FASTCODEC_POOL_MB"):
            pool.empty((4,))


def test_activation_pool_off_for_autograd_and_shared_safely_between_threads():
    import threading

    torch.manual_seed(0)
    m = fastcodec.SEANetEncoder(**CONFIGS["encodec24k"])
    x = torch.randn(1, 1, 3000)
    y = m(x)  # parameters require grad: the autograd path, no pool
    assert y.requires_grad and _pool_of(m) is None
    m.eval()
    with torch.no_grad():
        expected = m(x)
        results, errors = [], []

        def work():
            try:
                with _threads(1):
                    results.extend(m(x) for _ in range(3))
            except Exception as e:  # noqa: BLE001 (reported below)
                errors.append(e)

        workers = [threading.Thread(target=work) for _ in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert not errors and len(results) == 6
    assert all(torch.equal(r, expected) for r in results)
