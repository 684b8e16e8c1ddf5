"""Table-driven bad-input test: every public op, module and entry point x every kind of hostile input.

Each cell of ``TABLE`` is (entry point, input, expected) with expected either ``error naming `arg` `` (a
TypeError/ValueError whose message names the argument) or ``= reference`` (the documented result: equal to
fastcodec.reference on the same input). The table is the documentation: ``python -m tests.test_bad_inputs``
writes it to docs/bad-inputs.md, and ``test_doc_is_current`` fails when the committed file is stale.

Guards: every cell runs under a watchdog (faulthandler dumps the stacks and exits after CELL_TIMEOUT_S), so a
regression that hangs or churns fails instead of stalling CI; the absurd-geometry cells also assert they fail
within ``FAST_S``. Cells run on CPU tensors; the "CUDA tensor on a CPU-only op" cell hands a non-CPU (``meta``)
tensor to the C++ kernels themselves (the op layer routes by device before any kernel runs).
"""
from __future__ import annotations

import copy
import faulthandler
import re
import time
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import fastcodec
from fastcodec import reference as R
from fastcodec.checkpoint import CheckpointError
from fastcodec.ops import conv as C
from fastcodec.ops import rvq as Q

# cells are tiny: one thread avoids thread-pool wake-ups that cost 20x more than the work on a loaded host
pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOC = Path(__file__).resolve().parent.parent / "docs" / "bad-inputs.md"
CELL_TIMEOUT_S = 60  # a hang or a minutes-long churn trips this (cells take milliseconds)
FAST_S = 2.0  # absurd geometry must be refused before any work proportional to it
BIG = 2**40

ERR = (TypeError, ValueError)  # CheckpointError is a ValueError


@dataclass(frozen=True)
class Cell:
    entry: str
    case: str
    expect: str  # an argument name (the error must name it), "=ref" or "in-range" (codes in [0, bins))
    run: tp.Callable[[], tp.Any]  # raises, or returns (actual, expected) to compare
    fast: bool = False

    @property
    def id(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", f"{self.entry}-{self.case}")

    @property
    def outcome(self) -> str:
        if self.expect == "=ref":
            return "= reference"
        if self.expect == "in-range":
            return "returns codes in [0, bins) (not checked per call; the quantizer checks codebooks when they change)"
        return "error naming " + " or ".join(f"`{a}`" for a in self.expect.split("|"))


# ---------------------------------------------------------------------------------------------
# perturbations of one tensor argument
# ---------------------------------------------------------------------------------------------


def _strided(t: torch.Tensor) -> torch.Tensor:
    """Same values, every axis with a non-unit stride (sliced from a bigger buffer)."""
    big = torch.zeros(*(2 * s for s in t.shape), dtype=t.dtype)
    v = big[tuple(slice(None, None, 2) for _ in t.shape)]
    v.copy_(t)
    return v


def _poke(t: torch.Tensor, value) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[t.numel() // 2] = value
    return t


FLOAT_CASES: list[tuple[str, tp.Callable[[torch.Tensor], torch.Tensor]]] = [
    ("rank+1", lambda t: t.unsqueeze(0)),
    ("rank-1", lambda t: t[0]),
    ("fp16", lambda t: t.half()),
    ("bf16", lambda t: t.bfloat16()),
    ("fp64", lambda t: t.double()),
    ("int32", lambda t: t.int()),
    ("other device (meta)", lambda t: t.to("meta")),
    ("non-contiguous", _strided),
    ("stride-0 view", lambda t: t.flatten()[:1].reshape([1] * t.dim()).expand(t.shape)),
    ("empty dim 0", lambda t: t[:0]),
    ("empty last dim", lambda t: t[..., :0]),
    ("NaN", lambda t: _poke(t, float("nan"))),
    ("Inf", lambda t: _poke(t, float("inf"))),
    ("not a tensor", lambda t: t.tolist()),
]

CODE_CASES: list[tuple[str, tp.Callable[[torch.Tensor], torch.Tensor]]] = [
    ("rank+1", lambda t: t.unsqueeze(0)),
    ("rank-1", lambda t: t[0]),
    ("int32", lambda t: t.int()),
    ("float", lambda t: t.float()),
    ("other device (meta)", lambda t: t.to("meta")),
    ("non-contiguous", _strided),
    ("stride-0 view", lambda t: t.flatten()[:1].reshape([1] * t.dim()).expand(t.shape)),
    ("empty dim 0", lambda t: t[:0]),
    ("empty last dim", lambda t: t[..., :0]),
    ("code -1", lambda t: _poke(t, -1)),
    ("code = bins", lambda t: _poke(t, BINS)),
    ("code 2**40", lambda t: _poke(t, BIG)),
    ("not a tensor", lambda t: t.tolist()),
]

# ---------------------------------------------------------------------------------------------
# entry points: base arguments (tiny), the fast call, the reference call
# ---------------------------------------------------------------------------------------------

B, CH, T, K, D, BINS, NQ = 2, 3, 11, 3, 4, 8, 2


def _g(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _codebooks():
    return _g(NQ, BINS, D, seed=1)


def _conv_base():
    return dict(x=_g(B, CH, T), weight=_g(5, CH, K, seed=2), bias=_g(5, seed=3), skip=None, stride=2, dilation=2,
                pad_left=2, pad_right=1, pad_mode="reflect", elu_alpha=1.0)


def _convtr_base():
    return dict(x=_g(B, CH, T), weight=_g(CH, 5, 4, seed=2), bias=_g(5, seed=3), stride=2, trim_left=1,
                trim_right=1, elu_alpha=1.0)


def _enc_base():
    cb = _codebooks()
    return dict(x=_g(B, D, T), codebooks=cb, code_norms=(cb * cb).sum(-1))


def _dec_base():
    return dict(codes=torch.randint(0, BINS, (B, NQ, T), generator=torch.Generator().manual_seed(4)),
                codebooks=_codebooks())


def _ema_base():
    cb = _codebooks()
    return dict(residuals=_g(NQ, B, D, T), codes=_dec_base()["codes"], cluster_size=torch.ones(NQ, BINS),
                embed_avg=cb.clone(), embed=cb.clone(), decay=0.9, epsilon=1e-5)


def _kmeans_base():
    return dict(samples=_g(20, D), means=_g(BINS, D, seed=5), num_iters=2)


def _ema_ref(**kw):
    kw = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    Q._ema_ref(**kw)
    return kw["cluster_size"], kw["embed_avg"], kw["embed"]


def _ema_fast(**kw):
    torch.ops.fastcodec.ema_update(**kw)
    return kw["cluster_size"], kw["embed_avg"], kw["embed"]


def _lstm_base():
    torch.manual_seed(0)
    w = [t.detach().clone() for t in torch.nn.LSTM(3, 4, 2)._flat_weights]
    return dict(x=_g(5, B, 3), w0=w[0], rest=w[1:], num_layers=2)


def _lstm(fn):
    def call(x, w0, rest, num_layers):
        with torch.no_grad():
            return fn(x, [w0] + rest, num_layers)
    return call


def _lstm_ref(x, weights, num_layers):
    from fastcodec.ops.lstm import _lstm_impl

    return _lstm_impl(x, weights, num_layers)


OPS = {
    "fastcodec::conv1d": (_conv_base, lambda **kw: torch.ops.fastcodec.conv1d(**kw), C.conv1d_reference,
                          ("x", "weight", "bias")),
    "fastcodec::conv_transpose1d": (_convtr_base, lambda **kw: torch.ops.fastcodec.conv_transpose1d(**kw),
                                    C.conv_transpose1d_reference, ("x", "weight", "bias")),
    "fastcodec::rvq_encode": (_enc_base, lambda **kw: torch.ops.fastcodec.rvq_encode(**kw), Q._encode_ref,
                              ("x", "codebooks", "code_norms")),
    "fastcodec::rvq_quantize": (_enc_base, lambda **kw: torch.ops.fastcodec.rvq_quantize(**kw, need_residuals=True),
                                lambda **kw: Q._quantize_ref(**kw, need_residuals=True), ("x", "codebooks")),
    "fastcodec::rvq_decode": (_dec_base, lambda **kw: torch.ops.fastcodec.rvq_decode(**kw), Q._decode_ref,
                              ("codes", "codebooks")),
    "fastcodec::ema_update": (_ema_base, _ema_fast, _ema_ref, ("residuals", "codes", "cluster_size", "embed_avg",
                                                               "embed")),
    "fastcodec::lstm": (_lstm_base, _lstm(torch.ops.fastcodec.lstm), _lstm(_lstm_ref), ("x", "w0")),
    "fastcodec::kmeans": (_kmeans_base, lambda **kw: torch.ops.fastcodec.kmeans(**kw), Q._kmeans_ref,
                          ("samples", "means")),
}

# (entry, case) -> "=ref" where the documented result is the reference's (the op accepts any strides)
REF_CELLS = {
    ("fastcodec::conv1d", "x: non-contiguous"), ("fastcodec::conv1d", "x: stride-0 view"),
    ("fastcodec::conv1d", "weight: non-contiguous"), ("fastcodec::conv1d", "weight: stride-0 view"),
    ("fastcodec::conv1d", "bias: non-contiguous"), ("fastcodec::conv1d", "bias: stride-0 view"),
    ("fastcodec::conv_transpose1d", "x: non-contiguous"), ("fastcodec::conv_transpose1d", "x: stride-0 view"),
    ("fastcodec::conv_transpose1d", "weight: non-contiguous"),
    ("fastcodec::conv_transpose1d", "weight: stride-0 view"),
    ("fastcodec::conv_transpose1d", "bias: non-contiguous"), ("fastcodec::conv_transpose1d", "bias: stride-0 view"),
    ("fastcodec::kmeans", "samples: non-contiguous"), ("fastcodec::kmeans", "samples: stride-0 view"),
    ("fastcodec::kmeans", "means: non-contiguous"), ("fastcodec::kmeans", "means: stride-0 view"),
}
REF_CELLS |= {("fastcodec::lstm", f"{a}: {c}") for a in ("x", "w0")
              for c in ("non-contiguous", "stride-0 view", "NaN", "Inf")}
# how the error names an argument the table spells differently (the LSTM's first weight is weights[0])
OP_ERROR_NAME = {"w0": r"weights(\[0\])?|w_ih_l0"}
# an EMA step over no rows is valid (the buffers only decay, as in the reference): emptying the residuals alone
# leaves codes of the old shape, which the error names
CELL_ERROR_NAME = {("fastcodec::ema_update", "residuals: empty last dim"): "codes"}
# NaN/Inf flow through arithmetic ops exactly as in the reference (the conv is linear; the EMA averages)
for _e in ("fastcodec::rvq_encode", "fastcodec::rvq_quantize"):
    for _a in ("codebooks", "code_norms"):
        REF_CELLS |= {(_e, f"{_a}: NaN"), (_e, f"{_a}: Inf")}
for _e, _a in (("fastcodec::rvq_decode", "codebooks"), ("fastcodec::conv1d", "x"), ("fastcodec::conv1d", "weight"),
               ("fastcodec::conv1d", "bias"),
               ("fastcodec::conv_transpose1d", "x"), ("fastcodec::conv_transpose1d", "weight"),
               ("fastcodec::conv_transpose1d", "bias")):
    REF_CELLS |= {(_e, f"{_a}: NaN"), (_e, f"{_a}: Inf")}
# the EMA only writes embed (embed_avg / smoothed cluster_size): what it held before does not matter
REF_CELLS |= {("fastcodec::ema_update", "embed: NaN"), ("fastcodec::ema_update", "embed: Inf")}


def _compare(actual, expected):
    if isinstance(expected, torch.Tensor):
        expected, actual = (expected,), (actual,)
    for a, e in zip(actual, expected):
        if e.dtype == torch.long:
            assert torch.equal(a, e)
        else:
            # tiny shapes, float32 both sides; same arithmetic up to summation order (measured < 1e-6)
            torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, equal_nan=True)


def _op_cells() -> list[Cell]:
    cells = []
    for entry, (base, fast, ref, tensors) in OPS.items():
        for arg in tensors:
            cases = CODE_CASES if base()[arg].dtype == torch.long else FLOAT_CASES
            for case, fn in cases:
                name = f"{arg}: {case}"
                expect = CELL_ERROR_NAME.get((entry, name), OP_ERROR_NAME.get(arg, arg))
                if (entry, name) in REF_CELLS:
                    expect = "in-range" if entry in ("fastcodec::rvq_encode", "fastcodec::rvq_quantize") else "=ref"

                def run(base=base, fast=fast, ref=ref, arg=arg, fn=fn):
                    kw = base()
                    kw[arg] = fn(kw[arg])
                    out = fast(**kw)
                    return out, ref(**{**base(), arg: fn(base()[arg])})

                cells.append(Cell(entry, name, expect, run))
    return cells


def _geometry_cells() -> list[Cell]:
    """Absurd integers: each must be refused at once (no work or allocation proportional to it)."""
    cells = []
    conv = lambda **kw: torch.ops.fastcodec.conv1d(**{**_conv_base(), **kw})  # noqa: E731
    convtr = lambda **kw: torch.ops.fastcodec.conv_transpose1d(**{**_convtr_base(), **kw})  # noqa: E731
    for arg in ("stride", "dilation", "pad_left", "pad_right"):
        for v, what in ((0 if arg in ("stride", "dilation") else -1, "below range"), (2**31, "2**31"), (BIG, "2**40")):
            cells.append(Cell("fastcodec::conv1d", f"{arg} = {what}", arg, lambda a=arg, v=v: conv(**{a: v}), True))
    cells.append(Cell("fastcodec::conv1d", "dilation*(K-1) past int32, padded to fit", "dilation",
                      lambda: conv(dilation=2**30, pad_left=2**31, pad_right=0), True))
    cells.append(Cell("fastcodec::conv1d", "stride > padded input (one frame)", "=ref",
                      lambda: (conv(stride=60_000), C.conv1d_reference(**{**_conv_base(), "stride": 60_000}))))
    cells.append(Cell("fastcodec::conv1d", "pad_mode = 'circular'", "pad_mode", lambda: conv(pad_mode="circular")))
    cells.append(Cell("fastcodec::conv1d", "elu_alpha = NaN", "elu_alpha", lambda: conv(elu_alpha=float("nan"))))
    cells.append(Cell("fastcodec::conv1d", "T shorter than the kernel span, no padding", "kernel span",
                      lambda: conv(pad_left=0, pad_right=0, dilation=8)))
    cells.append(Cell("fastcodec::conv1d", "T shorter than every padding (reflect)", "=ref",
                      lambda: (conv(x=_g(B, CH, 1), pad_left=4, pad_right=4, stride=1),
                               C.conv1d_reference(**{**_conv_base(), "x": _g(B, CH, 1), "pad_left": 4,
                                                     "pad_right": 4, "stride": 1}))))
    cells.append(Cell("fastcodec::conv1d", "skip of the wrong shape", "skip", lambda: conv(skip=_g(B, 5, 3))))
    for arg in ("stride", "trim_left", "trim_right"):
        for v, what in ((0 if arg == "stride" else -1, "below range"), (2**31, "2**31"), (BIG, "2**40")):
            cells.append(Cell("fastcodec::conv_transpose1d", f"{arg} = {what}", arg,
                              lambda a=arg, v=v: convtr(**{a: v}), True))
    cells.append(Cell("fastcodec::conv_transpose1d", "trims eat the whole output", "trims",
                      lambda: convtr(trim_left=20, trim_right=20)))
    lstm = lambda **kw: _lstm(torch.ops.fastcodec.lstm)(**{**_lstm_base(), **kw})  # noqa: E731
    cells.append(Cell("fastcodec::lstm", "num_layers = 0", "num_layers", lambda: lstm(num_layers=0), True))
    cells.append(Cell("fastcodec::lstm", "num_layers = 2**40", "num_layers|weights", lambda: lstm(num_layers=BIG),
                      True))
    cells.append(Cell("fastcodec::lstm", "one weight missing", "weights", lambda: lstm(rest=_lstm_base()["rest"][:-1])))
    cells.append(Cell("fastcodec::lstm", "x of the wrong input size", "x", lambda: lstm(x=_g(5, B, 2))))
    km = lambda **kw: torch.ops.fastcodec.kmeans(**{**_kmeans_base(), **kw})  # noqa: E731
    cells.append(Cell("fastcodec::kmeans", "num_iters = -1", "num_iters", lambda: km(num_iters=-1), True))
    cells.append(Cell("fastcodec::kmeans", "num_iters = 2**40", "num_iters", lambda: km(num_iters=BIG), True))
    ema = lambda **kw: _ema_fast(**{**_ema_base(), **kw})  # noqa: E731
    cells.append(Cell("fastcodec::ema_update", "decay = 1.5", "decay", lambda: ema(decay=1.5)))
    cells.append(Cell("fastcodec::ema_update", "decay = NaN", "decay", lambda: ema(decay=float("nan"))))
    cells.append(Cell("fastcodec::ema_update", "epsilon = 0", "epsilon", lambda: ema(epsilon=0.0)))
    cells.append(Cell("fastcodec::rvq_encode", "2-D codebooks", "codebooks",
                      lambda: torch.ops.fastcodec.rvq_encode(_g(B, D, T), _g(BINS, D), _g(BINS))))
    cells.append(Cell("fastcodec::rvq_decode", "codes for more codebooks than given", "codebooks",
                      lambda: torch.ops.fastcodec.rvq_decode(torch.zeros(B, NQ + 1, T, dtype=torch.long),
                                                             _codebooks())))
    return cells


def _kernel_cells() -> list[Cell]:
    """The C++ kernels refuse non-CPU tensors themselves (the stand-in for a CUDA tensor on a CPU-only op)."""
    from fastcodec.ops import rvq_cpp

    meta = lambda t: t.to("meta")  # noqa: E731
    kw = _enc_base()
    dec = _dec_base()
    return [
        Cell("C++ rvq_cpu.encode", "x: non-CPU", "x", lambda: rvq_cpp.extension().encode(
            meta(kw["x"]), kw["codebooks"], kw["code_norms"], False, False, None)),
        Cell("C++ rvq_cpu.decode", "codes: non-CPU", "codes", lambda: rvq_cpp.extension().decode(
            meta(dec["codes"]), dec["codebooks"])),
        Cell("C++ conv_cpu.pack_weight", "weight: non-CPU", "weight", lambda: C._cpu_ext().pack_weight(
            meta(_conv_base()["weight"]))),
    ]


# ---------------------------------------------------------------------------------------------
# modules and entry points: the fast module against the reference module with the same weights
# ---------------------------------------------------------------------------------------------

_MODELS: dict[str, tp.Any] = {}
SEANET = dict(channels=1, dimension=D, n_filters=2, n_residual_layers=1, ratios=[2, 2], lstm=1, causal=True)


def _pair(name: str):
    """(fast, reference) modules with the same random weights, built once per session."""
    if name not in _MODELS:
        torch.manual_seed(0)
        if name == "rvq":
            kw = dict(dimension=D, n_q=NQ, bins=BINS, kmeans_init=False)
            fast, ref = fastcodec.ResidualVectorQuantizer(**kw), R.ResidualVectorQuantizer(**kw)
        elif name == "encoder":
            fast, ref = fastcodec.SEANetEncoder(**SEANET), R.SEANetEncoder(**SEANET)
        elif name == "decoder":
            fast, ref = fastcodec.SEANetDecoder(**SEANET), R.SEANetDecoder(**SEANET)
        else:
            parts = dict(encoder=fastcodec.SEANetEncoder(**SEANET), decoder=fastcodec.SEANetDecoder(**SEANET),
                         quantizer=fastcodec.ResidualVectorQuantizer(dimension=D, n_q=NQ, bins=BINS))
            fast = fastcodec.EncodecModel(**parts, target_bandwidths=[1.0], sample_rate=400, channels=1)
            ref = R.EncodecModel(R.SEANetEncoder(**SEANET), R.SEANetDecoder(**SEANET),
                                 R.ResidualVectorQuantizer(dimension=D, n_q=NQ, bins=BINS), [1.0], 400, 1)
            fast.quantizer.train()
            fast.quantizer(_g(1, D, 40), 100.0)  # k-means init, so the codebooks are real
        ref.load_state_dict(fast.state_dict())
        _MODELS[name] = (fast.eval(), ref.eval())
    return _MODELS[name]


def _module_call(name, method, train=False):
    def call(which, arg):
        m = _pair(name)[which]
        if train:  # a training call updates the codebooks: each cell starts from the same fresh copy
            m = copy.deepcopy(m)
        m.train(train)
        try:
            if train:
                torch.manual_seed(0)
            out = getattr(m, method)(*arg) if method else m(*arg)
        finally:
            m.eval()
        if hasattr(out, "codes"):  # QuantizedResult
            return (out.x, out.codes, out.penalty) if train else (out.x, out.codes)
        if isinstance(out, list):  # EncodecModel.encode's frames
            return out[0][0]
        return out
    return call


def _codec_stream(kind, which, args):
    """The fast model streamed (one chunk, then flush) against the reference model offline."""
    (t,) = args
    fast, ref = _pair("model")
    if kind == "encode":
        if which == 1:
            return ref.encode(t)[0][0]
        state = fast.encode_state(B)
        return torch.cat([fast.stream_encode(t, state)[0], fast.stream_encode_flush(state)], -1)
    if which == 1:
        return ref.decode([(t, None)])
    state = fast.decode_state(B)
    return torch.cat([fast.stream_decode(t, state)[0], fast.stream_decode_flush(state)], -1)


# entry -> (argument name, base input, call(which, args) with which 0 = fast / 1 = reference, build args)
MODULES = {
    "ResidualVectorQuantizer.encode": ("x", lambda: _g(B, D, T), _module_call("rvq", "encode"), lambda t: (t,)),
    "ResidualVectorQuantizer.decode": ("codes", lambda: _dec_base()["codes"], _module_call("rvq", "decode"),
                                       lambda t: (t,)),
    "ResidualVectorQuantizer.forward (eval)": ("x", lambda: _g(B, D, T), _module_call("rvq", None),
                                               lambda t: (t, 100.0)),
    "ResidualVectorQuantizer.forward (train)": ("x", lambda: _g(B, D, T), _module_call("rvq", None, train=True),
                                                lambda t: (t, 100.0)),
    "EncodecModel.stream_encode": ("chunk", lambda: _g(B, 1, 16), lambda w, a: _codec_stream("encode", w, a),
                                   lambda t: (t,)),
    "EncodecModel.stream_decode": ("codes", lambda: _dec_base()["codes"], lambda w, a: _codec_stream("decode", w, a),
                                   lambda t: (t,)),
    "SEANetEncoder": ("x", lambda: _g(B, 1, 16), _module_call("encoder", None), lambda t: (t,)),
    "SEANetDecoder": ("x", lambda: _g(B, D, 4), _module_call("decoder", None), lambda t: (t,)),
    "EncodecModel.encode": ("x", lambda: _g(B, 1, 16), _module_call("model", "encode"), lambda t: (t,)),
    "EncodecModel.decode": ("codes", lambda: _dec_base()["codes"], _module_call("model", "decode"),
                            lambda t: ([(t, None)],)),
    "EncodecModel.decode_latent": ("z", lambda: _g(B, 5, D), _module_call("model", "decode_latent"),
                                   lambda t: (t,)),
}
# the modules make their own contiguous copy and convert integer codes; NaN flows through SEANet's arithmetic
MODULE_REF_CELLS: set[tuple[str, str]] = {
    (e, f"{a}: {c}") for e, (a, *_) in MODULES.items() for c in ("non-contiguous", "stride-0 view")
} | {(e, "codes: int32") for e in MODULES if "decode" in e and "latent" not in e} | {
    (e, f"{a}: {c}") for e, a in (("SEANetEncoder", "x"), ("SEANetDecoder", "x"), ("EncodecModel.decode_latent", "z"))
    for c in ("NaN", "Inf")}
# what the error calls the argument when it is not the parameter's name
MODULE_ERROR_NAME = {"EncodecModel.encode": "audio|x", "EncodecModel.stream_encode": "audio|chunk",
                     "EncodecModel.decode_latent": "z|x"}


def _module_cells() -> list[Cell]:
    cells = []
    for entry, (arg, base, call, args) in MODULES.items():
        cases = CODE_CASES if base().dtype == torch.long else FLOAT_CASES
        for case, fn in cases:
            name = f"{arg}: {case}"

            def run(base=base, call=call, args=args, fn=fn):
                out = call(0, args(fn(base())))
                return out, call(1, args(fn(base())))

            cells.append(Cell(entry, name, "=ref" if (entry, name) in MODULE_REF_CELLS
                              else MODULE_ERROR_NAME.get(entry, arg), run))
    return cells


def _stream_call(which, chunk):
    enc = _pair("encoder")[which]
    if which == 1:  # the reference: offline over the same samples
        return enc(chunk)
    state = enc.stream_state(B)
    return torch.cat([enc.stream(chunk, state)[0], enc.stream_flush(state)], -1)


def _saved_state():
    enc = _pair("encoder")[0]
    state = enc.stream_state(B)
    enc.stream(_g(B, 1, 7), state)
    return enc, state, state.state_dict()


def _load(edit):
    enc, state, sd = _saved_state()
    edit(sd)
    fresh = enc.stream_state(B)
    fresh.load_state_dict(sd)
    return fresh


def _set_first(suffix, value):
    def edit(sd):
        key = next(k for k in sd if k.endswith(suffix))
        sd[key] = value(sd[key]) if callable(value) else value
    return edit


def _cli(*argv):
    import contextlib
    import io

    from fastcodec import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(list(argv))
    if rc != 0:
        raise ValueError(f"exit {rc}: {err.getvalue().strip().splitlines()[-1]}")
    return rc


def _other_cells() -> list[Cell]:
    cells = []
    for case, fn in FLOAT_CASES:
        name = f"chunk: {case}"
        expect = "=ref" if case in ("non-contiguous", "stride-0 view", "NaN", "Inf") else "chunk"
        cells.append(Cell("SEANetEncoder.stream", name, expect,
                          lambda fn=fn: (_stream_call(0, fn(_g(B, 1, 16))), _stream_call(1, fn(_g(B, 1, 16))))))
    st = "StreamState.load_state_dict"
    for case, edit, expect in [
        ("batch_size = 0", lambda sd: sd.update(batch_size=torch.tensor(0)), "batch_size"),
        ("batch_size = 2**40", lambda sd: sd.update(batch_size=torch.tensor(BIG)), "batch_size"),
        ("batch_size as float", lambda sd: sd.update(batch_size=torch.tensor(2.0)), "batch_size"),
        ("finished = 5", lambda sd: sd.update(finished=torch.tensor(5)), "finished"),
        ("a window start = -1", _set_first(".start", torch.tensor(-1)), r"slots\.\d+\.start"),
        ("a window start = 2**40", _set_first(".start", torch.tensor(BIG)), "start"),
        ("a counter = 2**63 - 1", _set_first(".total", torch.tensor(2**63 - 1)), r"slots\.\d+\.total"),
        ("emitted > total", _set_first(".emitted", torch.tensor(10**6)), "emitted"),
        ("a counter as a list", _set_first(".n", [1]), r"slots\.\d+\.n"),
        ("LSTM state of the wrong width", _set_first(".h", lambda t: t[..., :1]), r"slots\.\d+\.h"),
        ("NaN in a conv buffer", _set_first(".buf", lambda t: t.fill_(float("nan"))), r"slots\.\d+\.buf"),
        ("residual bookkeeping off", _set_first(".unmatched", torch.tensor(3)), "unmatched"),
        ("a key missing", lambda sd: sd.pop("finished"), "missing"),
        ("an unknown key", lambda sd: sd.update(extra=torch.tensor(1)), "unexpected"),
    ]:
        cells.append(Cell(st, case, expect, lambda edit=edit: _load(edit)))
    model = lambda: _pair("model")[0]  # noqa: E731
    good = lambda: {k: v.clone() for k, v in model().state_dict().items()}  # noqa: E731
    lc = "load_checkpoint"
    for case, src, expect in [
        ("source = b'path' (bytes)", lambda: b"path", "source"),
        ("source = 123", lambda: 123, "source"),
        ("source = a missing file", lambda: "/nonexistent/fastcodec.th", "not found"),
        ("a tensor with NaN", lambda: {**good(), "quantizer.vq.layers.0._codebook.embed":
                                       good()["quantizer.vq.layers.0._codebook.embed"].fill_(float("nan"))},
         r"quantizer\.vq\.layers\.0\._codebook\.embed"),
        ("a tensor of the wrong shape", lambda: {**good(), "encoder.model.0.conv.conv.bias": torch.zeros(3)},
         r"encoder\.model\.0\.conv\.conv\.bias"),
        ("a value that is not a tensor", lambda: {**good(), "encoder.model.0.conv.conv.bias": 1.0},
         r"encoder\.model\.0\.conv\.conv\.bias"),
        ("a non-str key", lambda: {**good(), 7: torch.zeros(1)}, "keys"),
        ("a key missing (strict)", lambda: {k: v for k, v in good().items() if "bias" not in k}, "missing"),
    ]:
        cells.append(Cell(lc, case, expect, lambda src=src: fastcodec.load_checkpoint(model(), src())))
    for case, argv, expect in [
        ("bench --threads 0", ("bench", "--threads", "0"), "--threads"),
        ("bench --threads x", ("bench", "--threads", "x"), "--threads"),
        ("bench --device tpu", ("bench", "--device", "tpu"), "--device"),
        ("unknown command", ("frobnicate",), "frobnicate"),
    ]:
        cells.append(Cell("fastcodec CLI", case, expect, lambda argv=argv: _cli(*argv)))
    cells.append(Cell("any tensor argument", "negative-stride view (torch refuses to make one)", "Negative strides",
                      lambda: torch.as_strided(torch.zeros(4), (4,), (-1,), 3)))
    return cells


TABLE: list[Cell] = _op_cells() + _geometry_cells() + _kernel_cells() + _module_cells() + _other_cells()
IDS = [c.id for c in TABLE]


assert len(set(IDS)) == len(IDS), "duplicate cell ids"


def _names(message: str, expect: str) -> bool:
    return re.search(rf"(?<![\w.])({expect})(?!\w)", message) is not None


def check_cell(cell: Cell) -> None:
    faulthandler.dump_traceback_later(CELL_TIMEOUT_S, exit=True)  # a hang fails the run instead of stalling it
    t0 = time.perf_counter()
    try:
        if cell.expect in ("=ref", "in-range"):
            actual, expected = cell.run()
            if cell.expect == "=ref":
                _compare(actual, expected)
            else:
                codes = actual[0] if isinstance(actual, tuple) else actual
                assert codes.dtype == torch.long and int(codes.min()) >= 0 and int(codes.max()) < BINS
            return
        # torch's own refusals are RuntimeErrors: its schema check (which names the argument), the C++ kernels'
        # TORCH_CHECKs, and what torch itself cannot represent
        allowed = ERR + ((RuntimeError,) if cell.entry.startswith(("C++", "any")) else ())
        try:
            cell.run()
        except allowed as e:
            assert _names(str(e), cell.expect), f"{type(e).__name__} does not name {cell.expect!r}: {e}"
        except RuntimeError as e:
            assert "Expected a value of type" in str(e) and _names(str(e), cell.expect), f"unclear error: {e}"
        else:
            raise AssertionError(f"{cell.entry} [{cell.case}] returned instead of raising")
        if cell.fast:
            assert time.perf_counter() - t0 < FAST_S, "absurd geometry was not refused at once"
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.mark.parametrize("cell", TABLE, ids=IDS)
def test_cell(cell):
    check_cell(cell)


def test_failed_stream_load_leaves_the_state_as_it_was():
    enc, state, sd = _saved_state()
    before = {k: v.clone() for k, v in state.state_dict().items()}
    bad = dict(sd)
    bad[next(k for k in sd if k.endswith(".emitted"))] = torch.tensor(10**6)
    with pytest.raises(ValueError, match="emitted"):
        state.load_state_dict(bad)
    after = state.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def render() -> str:
    lines = [
        "# Bad inputs: what every entry point does",
        "",
        "Generated from `tests/test_bad_inputs.py` (`python -m tests.test_bad_inputs` rewrites this file; a test",
        "fails when it is stale). Every row is a test. \"error naming `a`\": a `TypeError`/`ValueError` (or",
        "`CheckpointError`, a `ValueError`) whose message names `a`; torch's own schema check and the C++ kernels'",
        "checks raise `RuntimeError`s that name the argument too. \"= reference\": the result equals",
        "`fastcodec.reference` on the same input. Integer geometry (strides, dilations, paddings, trims, kernel",
        "span) is limited to 2**16 and refused before any work; kmeans runs at most 10 000 iterations.",
        "The \"other device\" rows use a `meta` tensor next to CPU ones (this machine has no CUDA); the C++ rows hand",
        "a non-CPU tensor to the CPU kernels directly, below the op layer that routes by device.",
        "",
        f"{len(TABLE)} cells.",
    ]
    entries = list(dict.fromkeys(c.entry for c in TABLE))
    for entry in entries:
        lines += ["", f"## `{entry}`", "", "| input | outcome |", "|---|---|"]
        lines += [f"| {c.case} | {c.outcome} |" for c in TABLE if c.entry == entry]
    return "\n".join(lines) + "\n"


def test_doc_is_current():
    assert DOC.is_file() and DOC.read_text() == render(), "run `python -m tests.test_bad_inputs` to regenerate"


if __name__ == "__main__":
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render())
    print(f"wrote {DOC} ({len(TABLE)} cells)")
