"""What ``fastcodec bench`` and ``pytest bench/`` measure: operations, shapes, and the providers of each.

Providers are found at run time (``SOURCES``): the fast modules (``fastcodec.ResidualVectorQuantizer``,
``fastcodec.SEANetEncoder/SEANetDecoder``), the reference (``fastcodec.reference.*``), audiocraft
(imported like the tests do, without its heavy package __init__), the ``torch.compile``d reference
and, for SEANet on CPU, onnxruntime on the exported reference. A missing one shows as "n/a" with the
reason. Every provider of a case gets the same random weights (one state_dict, loaded strictly) and
the same input; the oracle is the reference, or audiocraft where the reference is missing.

Streaming: fastcodec's row is ``fastcodec.streaming.StreamingSEANet{Encoder,Decoder}``, driven through
audiocraft's convention, ``with m.streaming(): y = m(chunk)``; it must reproduce the offline reference
output of the whole stream (on the causal 24 kHz model with
zero padding: reflect padding makes the offline output of a prefix read past its end). The reference
and audiocraft keep no state: their row is the stateless way, one chunk plus enough left context for
the convs (inexact all the same: the LSTM state is lost).
"""
from __future__ import annotations

import contextlib
import importlib
import io
import math
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch

from fastcodec._oracles import OracleUnavailable, import_oracle

from .harness import Built, Check, Impl, Missing, call, compare_codes, compare_float_dict, float_tolerance

OPS: dict[str, str] = {
    "rvq_encode": "RVQ encode: codes of every layer",
    "rvq_forward": "RVQ forward (eval): quantized + codes",
    "rvq_train": "RVQ train step: forward + backward + EMA codebook update",
    "rvq_decode": "RVQ decode: codes -> sum of codewords",
    "rvq_kmeans": "RVQ k-means init: first training call",
    "seanet_encoder": "SEANet encoder, offline",
    "seanet_decoder": "SEANet decoder, offline",
    "seanet_streaming": "SEANet streaming: one 320-sample chunk",
    "codec": "whole codec: encoder -> RVQ encode -> RVQ decode -> decoder",
}

# kind -> provider -> (module, attribute); tests point these at stand-ins
SOURCES: dict[str, dict[str, tuple[str, str]]] = {
    "rvq": {
        "fastcodec": ("fastcodec", "ResidualVectorQuantizer"),
        "reference": ("fastcodec.reference.quantization", "ResidualVectorQuantizer"),
        "audiocraft": ("audiocraft.quantization.vq", "ResidualVectorQuantizer"),
    },
    "encoder": {
        "fastcodec": ("fastcodec", "SEANetEncoder"),
        "reference": ("fastcodec.reference.seanet", "SEANetEncoder"),
        "audiocraft": ("audiocraft.modules.seanet", "SEANetEncoder"),
    },
    "decoder": {
        "fastcodec": ("fastcodec", "SEANetDecoder"),
        "reference": ("fastcodec.reference.seanet", "SEANetDecoder"),
        "audiocraft": ("audiocraft.modules.seanet", "SEANetDecoder"),
    },
    # streaming rows: fastcodec's stateful streaming classes (its conv steps are where fast convs plug in)
    "stream_encoder": {
        "fastcodec": ("fastcodec.streaming", "StreamingSEANetEncoder"),
        "reference": ("fastcodec.reference.seanet", "SEANetEncoder"),
        "audiocraft": ("audiocraft.modules.seanet", "SEANetEncoder"),
    },
    "stream_decoder": {
        "fastcodec": ("fastcodec.streaming", "StreamingSEANetDecoder"),
        "reference": ("fastcodec.reference.seanet", "SEANetDecoder"),
        "audiocraft": ("audiocraft.modules.seanet", "SEANetDecoder"),
    },
}

FRAME_RATE = 75  # 24 kHz / hop 320

# EnCodec's SEANet configurations (encodec 0.1.1 `EncodecModel._get_model`, its SEANet defaults:
# one residual layer, conv shortcut, 2-layer LSTM, weight norm)
SEANET_CONFIGS: dict[str, dict] = {
    "24k": dict(sample_rate=24000, kwargs=dict(
        channels=1, dimension=128, n_filters=32, n_residual_layers=1, ratios=[8, 5, 4, 2], norm="weight_norm",
        causal=True, pad_mode="reflect", true_skip=False, compress=2, lstm=2)),
    # MusicGen's 32 kHz compression model (audiocraft's encodec_musicgen_32khz SEANet settings)
    "32k": dict(sample_rate=32000, kwargs=dict(
        channels=1, dimension=128, n_filters=64, n_residual_layers=1, ratios=[8, 5, 4, 4], norm="weight_norm",
        causal=False, pad_mode="constant", true_skip=True, compress=2, lstm=2)),
    "48k": dict(sample_rate=48000, kwargs=dict(
        channels=2, dimension=128, n_filters=32, n_residual_layers=1, ratios=[8, 5, 4, 2], norm="time_group_norm",
        causal=False, pad_mode="reflect", true_skip=False, compress=2, lstm=2)),
}
# streaming: the 24 kHz model with zero padding. With reflect padding the offline output of a short
# prefix reads samples past its end (the reflection), so no stream can reproduce it exactly.
SEANET_CONFIGS["24k-zeropad"] = dict(SEANET_CONFIGS["24k"], kwargs={**SEANET_CONFIGS["24k"]["kwargs"],
                                                                   "pad_mode": "constant"})


@dataclass
class Case:
    op: str
    id: str
    params: dict
    suites: tuple[str, ...]
    # torch.compile costs 5-60 s of CPU per case here: the quick suite compiles only where this says
    compiled_in: tuple[str, ...] = ("full",)


@dataclass
class Options:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    suite: str = "quick"
    threads: int = 1


def _compiled_reason(case: Case, classes: dict, opts: Options) -> str | None:
    if opts.suite not in case.compiled_in:
        return f"torch.compile not run in the {opts.suite} suite (compile time)" + (
            "; see --full" if "full" in case.compiled_in and opts.suite != "full" else "")
    if isinstance(classes["reference"], str):
        return "needs the reference: " + classes["reference"]
    return None


def load_class(kind: str, provider: str) -> type | str:
    """The provider's class, or the reason it is not available."""
    module, attr = SOURCES[kind][provider]
    try:
        if module.split(".")[0] in ("audiocraft", "encodec"):
            mod = import_oracle(module)
        else:
            mod = importlib.import_module(module)
    except OracleUnavailable as e:
        return Missing(f"{provider}: {e}")
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return f"{module} is not available yet"
        return f"{module} cannot be imported: {e}"
    except Exception as e:
        return f"{module} cannot be imported: {type(e).__name__}: {e}"
    cls = getattr(mod, attr, None)
    if cls is None:
        return f"{module}.{attr} is not available yet"
    return cls


def _classes(kind: str) -> tuple[dict[str, type | str], str | None]:
    """Classes per provider and the oracle provider (reference, else audiocraft, else None)."""
    classes = {p: load_class(kind, p) for p in ("fastcodec", "reference", "audiocraft")}
    oracle = next((p for p in ("reference", "audiocraft") if not isinstance(classes[p], str)), None)
    return classes, oracle


def _no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run():
        with torch.no_grad():
            return fn()

    return run


NO_ORACLE = "no oracle: neither the reference nor audiocraft is available"


def _unavailable(reason: str, *names: str) -> Built:
    return Built({n: reason for n in names}, check=lambda out: Check(False, reason), notes=[reason])


def _float_tols(exp: dict, exp64: dict, keys: list[str]) -> tuple[dict[str, float], list[str]]:
    """Per-output tolerances from the float64 oracle run (valid only where it chose the same codes)."""
    same = "codes" not in exp or torch.equal(exp["codes"].cpu(), exp64["codes"].cpu())
    tols = {k: float_tolerance(exp[k], exp64[k] if same else exp[k]) for k in keys}
    notes = [] if same else ["the float64 oracle chose other codes at near-ties: float tolerances are 1 ulp"]
    return tols, notes


def _codes_then_floats(exp: dict, tols: dict[str, float], x_q: torch.Tensor, codebooks: torch.Tensor):
    """Check: codes up to certified near-ties, then float outputs (only when every code agrees)."""

    def check(out: dict) -> Check:
        c = compare_codes(out["codes"], exp["codes"], x_q, codebooks)
        if not c.ok:
            return c
        if c.flips:
            return Check(True, c.detail + "; float outputs not compared", flips=c.flips)
        f = compare_float_dict(out, exp, tols)
        return Check.all([c, f]) if tols else c

    return check


@dataclass
class _Family:
    """One module family of a case: its classes per provider, the oracle provider, and ``make``."""
    classes: dict[str, type | str]
    oracle: str
    make: Callable[..., torch.nn.Module]  # make(cls, dtype=float32): built, loaded, on the device, eval

    def oracle_module(self, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        return self.make(self.classes[self.oracle], dtype)


def _rvq_kwargs(p: dict) -> dict:
    return dict(dimension=p["D"], n_q=p["K"], bins=p["bins"], decay=0.99, kmeans_init=p.get("kmeans", False),
                kmeans_iters=p.get("iters", 10), threshold_ema_dead_code=2)


def _rvq_state(template: dict, p: dict, gen: torch.Generator, scale: float = 1.0) -> dict:
    """Random codebooks with consistent EMA buffers; about 2% dead codes so a train step expires some."""
    sd = dict(template)
    K, bins, D = p["K"], p["bins"], p["D"]
    for i in range(K):
        pre = f"vq.layers.{i}._codebook."
        if p.get("kmeans", False):
            for name in ("embed", "embed_avg", "cluster_size", "inited"):
                sd[pre + name] = torch.zeros_like(template[pre + name])
            continue
        embed = torch.randn(bins, D, generator=gen) * scale * 0.7**i  # residuals shrink layer by layer
        cs = 5 + 5 * torch.rand(bins, generator=gen)
        cs[torch.rand(bins, generator=gen) < 0.02] = 1.0  # below threshold_ema_dead_code=2
        sd[pre + "embed"] = embed
        sd[pre + "embed_avg"] = embed * cs[:, None]
        sd[pre + "cluster_size"] = cs
        sd[pre + "inited"] = torch.ones(1)
    return sd


def _rvq_family(p: dict, opts: Options, gen: torch.Generator, scale: float = 1.0) -> tuple[_Family, dict] | None:
    """Quantizers with the shape of ``p`` and one random state_dict (also returned: stateful ops reload it)."""
    classes, oracle = _classes("rvq")
    if oracle is None:
        return None
    kwargs = _rvq_kwargs(p)
    sd = _rvq_state(classes[oracle](**kwargs).state_dict(), p, gen, scale)

    def make(cls, dtype=torch.float32):
        m = cls(**kwargs)
        m.load_state_dict(sd, strict=True)
        return m.to(device=opts.device, dtype=dtype).eval()

    return _Family(classes, oracle, make), sd


def _stacked_embed(sd: dict, K: int, device: torch.device) -> torch.Tensor:
    return torch.stack([sd[f"vq.layers.{i}._codebook.embed"] for i in range(K)]).to(device)


def _rvq_buffers(m: torch.nn.Module, K: int) -> dict[str, torch.Tensor]:
    sd = m.state_dict()
    return {n: torch.stack([sd[f"vq.layers.{i}._codebook.{n}"] for i in range(K)]).detach().clone()
            for n in ("embed", "embed_avg", "cluster_size")}


def _rvq_impl(op: str, m: torch.nn.Module, entry: tuple, x: torch.Tensor, sd: dict, K: int,
              codes: torch.Tensor | None) -> Impl:
    """How ``op`` runs on quantizer ``m``; ``entry`` = (forward, encode, decode), eager or compiled."""
    forward, encode, decode = entry
    if op == "rvq_encode":
        return Impl(_no_grad(lambda: encode(x)), outputs=lambda c: {"codes": c})
    if op == "rvq_decode":
        return Impl(_no_grad(lambda: decode(codes)), outputs=lambda q: {"x": q})
    if op == "rvq_forward":
        return Impl(_no_grad(lambda: forward(x, FRAME_RATE)), outputs=lambda r: {"codes": r.codes, "x": r.x})
    if op == "rvq_kmeans":
        def setup():
            m.load_state_dict(sd)
            m.train()
            torch.manual_seed(0)  # k-means draws its initial means from torch's RNG

        return Impl(_no_grad(lambda: forward(x, FRAME_RATE)), setup=setup,
                    outputs=lambda r: _rvq_buffers(m, K))
    if op == "rvq_train":
        xs: list[torch.Tensor] = []

        def setup():
            m.load_state_dict(sd)
            m.train()
            torch.manual_seed(0)  # dead-code expiry samples replacements with torch's RNG
            xs[:] = [x.detach().clone().requires_grad_(True)]

        def step():
            r = forward(xs[0], FRAME_RATE)
            (r.x.square().mean() + r.penalty).backward()
            return r

        def outputs(r):
            return {"codes": r.codes, "x": r.x, "penalty": r.penalty.reshape(1), "grad": xs[0].grad,
                    **_rvq_buffers(m, K)}

        return Impl(step, setup=setup, outputs=outputs)
    raise ValueError(f"unknown RVQ op {op!r}")


def _build_rvq(case: Case, opts: Options) -> Built:
    op, p, dev = case.op, case.params, opts.device
    names = ["fastcodec", "reference", "audiocraft", "compiled"]
    gen = torch.Generator().manual_seed(0)
    family = _rvq_family(p, opts, gen)
    if family is None:
        return _unavailable(NO_ORACLE, *names)
    fam, sd = family
    classes, oracle, make = fam.classes, fam.oracle, fam.make
    B, T, K, D, bins = p["B"], p["T"], p["K"], p["D"], p["bins"]
    x = torch.randn(B, D, T, generator=gen).to(dev)
    codebooks = _stacked_embed(sd, K, dev)

    def eager(m):
        return (m, m.encode, m.decode)

    om = fam.oracle_module()
    codes = None
    if op == "rvq_decode":
        with torch.no_grad():
            codes = om.encode(x)
    exp = _rvq_impl(op, om, eager(om), x, sd, K, codes)
    exp_out = {k: v.detach().clone() for k, v in exp.outputs(call(exp, dev)[0]).items()}
    float_keys = [k for k in exp_out if k != "codes"]
    if op == "rvq_kmeans":
        # Lloyd's iterations amplify rounding into other assignments, so a float64 run is no yardstick
        # (its embed differs by up to 1e3x on Gaussian data). Bound instead: a mean summed in another
        # order over <= N rows is off by <= N ulps; smoothing and division add a few (8).
        tols, notes = {k: (0.0, (B * T + 8) * 2.0**-24) for k in float_keys}, []
    else:
        m64 = fam.oracle_module(torch.float64)
        e64 = _rvq_impl(op, m64, eager(m64), x.double(), sd, K, codes)
        tols, notes = _float_tols(exp_out, e64.outputs(call(e64, dev)[0]), float_keys)
    if "codes" in exp_out:
        check = _codes_then_floats(exp_out, tols, x, codebooks)
    else:
        def check(o):
            return compare_float_dict(o, exp_out, tols)

    impls: dict[str, Impl | str] = {}
    for name in ("fastcodec", "reference", "audiocraft"):
        cls = classes[name]
        if isinstance(cls, str):
            impls[name] = cls
            continue
        m = make(cls)
        impls[name] = _rvq_impl(op, m, eager(m), x, sd, K, codes)
    reason = _compiled_reason(case, classes, opts)
    if reason:
        impls["compiled"] = reason
    else:
        cm = make(classes["reference"])
        entry = (torch.compile(cm), torch.compile(cm.encode), torch.compile(cm.decode))
        impls["compiled"] = _rvq_impl(op, cm, entry, x, sd, K, codes)
    N = B * T
    flops = {
        "rvq_encode": 2.0 * N * K * bins * D,
        "rvq_forward": 2.0 * N * K * bins * D,
        "rvq_train": 4.0 * N * K * bins * D,  # search + embed_sum = x^T onehot, both GEMM-sized
        "rvq_kmeans": 2.0 * N * bins * D * p.get("iters", 10) * K,  # assignment as a GEMM, per iteration and layer
        "rvq_decode": None,  # a gather-sum: memory-bound, no GFLOP/s
    }[op]
    if oracle != "reference":
        notes.append(f"oracle: {oracle} (the reference is not available)")
    return Built(impls, check, flops, notes)


def _seanet_kwargs(p: dict) -> dict:
    kw = dict(SEANET_CONFIGS[p["config"]]["kwargs"])
    kw["ratios"] = list(kw["ratios"])
    return kw


def _perturbed(template: dict, gen: torch.Generator) -> dict:
    """Seeded noise on every float tensor, so weight norm's g differs from |v| and biases are not 0."""
    return {k: v + 0.1 * (v.abs().mean() + 1e-3) * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in template.items()}


def _conv_lstm_flops(m: torch.nn.Module, inp: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Run ``m(inp)`` and count its FLOPs: 2*C_in*C_out*k*T_out per conv (transposed: T_in) from
    torch's FlopCounterMode, plus 2*4H*(I+H) per step and layer of every nn.LSTM (seen by a hook)."""
    from torch.utils.flop_counter import FlopCounterMode

    lstm_flops = [0.0]

    def hook(mod, args, _out):
        T, Bn = (args[0].shape[1], args[0].shape[0]) if mod.batch_first else args[0].shape[:2]
        H, dirs = mod.hidden_size, 2 if mod.bidirectional else 1
        for layer in range(mod.num_layers):
            inp = mod.input_size if layer == 0 else H * dirs
            lstm_flops[0] += 2.0 * 4 * H * (inp + H) * dirs * T * Bn

    hooks = [mod.register_forward_hook(hook) for mod in m.modules() if isinstance(mod, torch.nn.LSTM)]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            out = m(inp)
    finally:
        for h in hooks:
            h.remove()
    conv = sum(v for k, v in fc.get_flop_counts()["Global"].items() if "convolution" in str(k))
    return out, float(conv) + lstm_flops[0]


def _onnx_impl(model: torch.nn.Module, inp: torch.Tensor, opts: Options) -> Impl | str:
    """onnxruntime (CPU) on ``model`` exported at this input's shape."""
    if opts.device.type != "cpu":
        return Missing("onnxruntime: its CPU provider is not compared with a GPU run")
    if opts.suite == "smoke":
        return "onnxruntime not run in the smoke suite (export time)"
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime as ort
    except ImportError:
        return Missing("onnxruntime: onnxruntime/onnx not installed (pip install onnxruntime onnx)")
    t0 = time.perf_counter()
    errors = []
    for dynamo in (False, True):  # the TorchScript exporter is faster and needs no onnxscript
        try:
            buf = io.BytesIO()
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (inp,), buf, dynamo=dynamo, input_names=["x"], output_names=["y"])
            break
        except Exception as e:
            errors.append(f"dynamo={dynamo}: {type(e).__name__}: {e}"[:200])
    else:
        return "ONNX export failed: " + "; ".join(errors)
    so = ort.SessionOptions()
    so.intra_op_num_threads = opts.threads
    so.inter_op_num_threads = 1
    # its pool spins after each run by default, taking the cores from whichever provider the round-robin
    # times next (fastcodec's 1 s encoder measured 62 instead of 31 ms right after it)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: inp.detach().cpu().numpy()}
    return Impl(lambda: sess.run(None, feed)[0], outputs=lambda y: torch.from_numpy(y), measure_memory=False,
                note=f"exported in {time.perf_counter() - t0:.1f}s; memory outside torch's allocator")


def _seanet_family(kind: str, p: dict, opts: Options, gen: torch.Generator) -> _Family | None:
    """SEANet encoder or decoder (``kind``: a key of SOURCES) of config ``p["config"]``, with seeded
    random weights."""
    classes, oracle = _classes(kind)
    if oracle is None:
        return None
    torch.manual_seed(0)  # the constructor initialises the weights from the global RNG
    sd = _perturbed(classes[oracle](**_seanet_kwargs(p)).state_dict(), gen)

    def make(cls, dtype=torch.float32):
        m = cls(**_seanet_kwargs(p))
        m.load_state_dict(sd, strict=True)
        return m.to(device=opts.device, dtype=dtype).eval()

    return _Family(classes, oracle, make)


def _seanet_input(kind: str, p: dict, kw: dict, gen: torch.Generator, frames: int | None = None) -> torch.Tensor:
    """Audio (B, channels, samples) for the encoder, a latent (B, dimension, frames) for the decoder:
    ``p["seconds"]`` long, or ``frames`` frames."""
    hop = math.prod(kw["ratios"])
    if frames is None:
        frames = math.ceil(p["seconds"] * SEANET_CONFIGS[p["config"]]["sample_rate"] / hop)
    if kind == "encoder":
        return 0.1 * torch.randn(p["B"], kw["channels"], frames * hop, generator=gen)
    return torch.randn(p["B"], kw["dimension"], frames, generator=gen)


def _build_seanet(case: Case, opts: Options) -> Built:
    p = case.params
    kind = "encoder" if case.op == "seanet_encoder" else "decoder"
    names = ["fastcodec", "reference", "audiocraft", "compiled", "onnxruntime"]
    gen = torch.Generator().manual_seed(0)
    fam = _seanet_family(kind, p, opts, gen)
    if fam is None:
        return _unavailable(NO_ORACLE, *names)
    classes, oracle, make = fam.classes, fam.oracle, fam.make
    inp = _seanet_input(kind, p, _seanet_kwargs(p), gen).to(opts.device)
    exp, flops = _conv_lstm_flops(fam.oracle_module(), inp)
    with torch.no_grad():
        exp64 = fam.oracle_module(torch.float64)(inp.double())
    tols, notes = _float_tols({"y": exp}, {"y": exp64}, ["y"])

    def check(out):
        return compare_float_dict({"y": out}, {"y": exp}, tols)

    impls: dict[str, Impl | str] = {}
    for name in ("fastcodec", "reference", "audiocraft"):
        cls = classes[name]
        impls[name] = cls if isinstance(cls, str) else Impl(_no_grad(partial(make(cls), inp)))
    reason = _compiled_reason(case, classes, opts)
    if reason:
        impls["compiled"] = reason
    else:
        cm = torch.compile(make(classes["reference"]))
        impls["compiled"] = Impl(_no_grad(lambda: cm(inp)))
    impls["onnxruntime"] = _onnx_impl(fam.oracle_module(), inp, opts)
    if oracle != "reference":
        notes.append(f"oracle: {oracle} (the reference is not available)")
    return Built(impls, check, flops, notes)


def encoder_context(kw: dict) -> int:
    """Left context in samples of the encoder's conv stack (receptive field - 1): sum of (k-1)*dilation*J
    over its convs, J = product of the strides before the conv. The LSTM's context is unbounded."""
    ratios = list(reversed(kw["ratios"]))
    res_k, base = kw.get("residual_kernel_size", 3), kw.get("dilation_base", 2)
    ctx, J = kw.get("kernel_size", 7) - 1, 1
    for r in ratios:
        ctx += sum((res_k - 1) * base**j * J for j in range(kw["n_residual_layers"]))
        ctx += (2 * r - 1) * J  # downsampling conv: kernel 2r
        J *= r
    return ctx + (kw.get("last_kernel_size", 7) - 1) * J


def decoder_context(kw: dict) -> int:
    """Left context in frames of the decoder's conv stack: a transposed conv (kernel 2r, stride r)
    reads one past input; the convs after it read (k-1)*dilation samples of the finer rate."""
    res_k, base = kw.get("residual_kernel_size", 3), kw.get("dilation_base", 2)
    ctx, P = float(kw.get("kernel_size", 7) - 1), 1
    for r in kw["ratios"]:
        ctx += 1 / P
        P *= r
        ctx += sum((res_k - 1) * base**j for j in range(kw["n_residual_layers"])) / P
    return math.ceil(ctx + (kw.get("last_kernel_size", 7) - 1) / P)


def _build_streaming(case: Case, opts: Options) -> Built:
    p = case.params
    kind = p["side"]
    names = ["fastcodec", "reference", "audiocraft", "compiled"]
    gen = torch.Generator().manual_seed(0)
    fam = _seanet_family("stream_" + kind, p, opts, gen)
    if fam is None:
        return _unavailable(NO_ORACLE, *names)
    classes, oracle, make = fam.classes, fam.oracle, fam.make
    kw = _seanet_kwargs(p)
    if not kw["causal"] or kw["pad_mode"] != "constant":
        raise ValueError(f"streaming is exact only for a causal, zero-padded config; {p['config']} is not")
    hop = math.prod(kw["ratios"])
    ctx = math.ceil(encoder_context(kw) / hop) if kind == "encoder" else decoder_context(kw)
    step = hop if kind == "encoder" else 1  # one chunk: 320 samples in, or one frame of latent in
    stream = _seanet_input(kind, p, kw, gen, frames=ctx + 1 + p.get("extra_chunks", 4)).to(opts.device)
    chunks = list(stream.split(step, dim=-1))
    window = stream[..., -(ctx + 1) * step:]  # the stream's last chunk with its left context

    def last(y):
        return y[..., -1:] if kind == "encoder" else y[..., -hop:]

    om, om64 = fam.oracle_module(), fam.oracle_module(torch.float64)
    with torch.no_grad():
        offline, offline64 = om(stream), om64(stream.double())
        exp, exp64 = last(om(window)), last(om64(window.double()))
    lost = (last(offline) - exp).abs().max().item()  # what the stateless way loses on the last chunk
    tols, notes = _float_tols({"y": exp}, {"y": exp64}, ["y"])
    stream_tols, _ = _float_tols({"y": offline}, {"y": offline64}, ["y"])
    notes.append(f"stateless rows: one chunk + {ctx} chunks of left context; their output differs from "
                 f"the offline one by up to {lost:.2e} (LSTM state lost)")

    def check(out):
        return compare_float_dict({"y": out}, {"y": exp}, tols)

    impls: dict[str, Impl | str] = {}
    for name in ("reference", "audiocraft"):
        cls = classes[name]
        impls[name] = cls if isinstance(cls, str) else Impl(_no_grad(partial(_last_of, make(cls), window, last)))
    reason = _compiled_reason(case, classes, opts)
    if reason:
        impls["compiled"] = reason
    else:
        cm = torch.compile(make(classes["reference"]))
        impls["compiled"] = Impl(_no_grad(partial(_last_of, cm, window, last)))
    impls["fastcodec"] = _streaming_impl(classes["fastcodec"], make, chunks, offline, stream_tols)
    if oracle != "reference":
        notes.append(f"oracle: {oracle} (the reference is not available)")
    return Built(impls, check, None, notes)


def _last_of(m: torch.nn.Module, window: torch.Tensor, last: Callable) -> torch.Tensor:
    return last(m(window))


def _streaming_impl(cls, make, chunks, offline, tols) -> Impl | str:
    """The fast module streaming chunk after chunk; checked against the offline output of the stream."""
    if isinstance(cls, str):
        return cls
    m = make(cls)
    if not callable(getattr(m, "streaming", None)):
        return f"{cls.__name__} has no streaming() context yet (audiocraft's `with m.streaming(): m(chunk)`)"
    with torch.no_grad(), m.streaming():
        got = torch.cat([m(c) for c in chunks], dim=-1)
    verdict = compare_float_dict({"y": got}, {"y": offline}, tols)
    verdict.detail = "stream vs offline: " + verdict.detail
    ctx = m.streaming()
    ctx.__enter__()
    state = {"i": 0}

    def fn():
        state["i"] += 1
        with torch.no_grad():
            return m(chunks[state["i"] % len(chunks)])

    return Impl(fn, check=lambda _out: verdict, close=lambda: ctx.__exit__(None, None, None))


def _build_codec(case: Case, opts: Options) -> Built:
    p = case.params
    names = ["fastcodec", "reference", "audiocraft", "compiled"]
    gen = torch.Generator().manual_seed(0)
    enc, dec = _seanet_family("encoder", p, opts, gen), _seanet_family("decoder", p, opts, gen)
    if enc is None or dec is None:
        return _unavailable(NO_ORACLE, *names)
    kw = _seanet_kwargs(p)
    x = _seanet_input("encoder", p, kw, gen).to(opts.device)
    z, enc_flops = _conv_lstm_flops(enc.oracle_module(), x)
    rp = dict(K=p["K"], bins=p["bins"], D=kw["dimension"])
    family = _rvq_family(rp, opts, gen, scale=z.std().item())  # codebooks at the latent's scale
    if family is None:
        return _unavailable(NO_ORACLE, *names)
    quant, sd_q = family
    codebooks = _stacked_embed(sd_q, rp["K"], opts.device)

    def pipeline(e, quant_encode, quant_decode, d, xin):
        def run():
            with torch.no_grad():
                codes = quant_encode(e(xin))
                return {"codes": codes, "audio": d(quant_decode(codes))}

        return run

    def eager(provider: str, dtype=torch.float32):
        clss = (enc.classes[provider], quant.classes[provider], dec.classes[provider])
        missing = next((c for c in clss if isinstance(c, str)), None)
        if missing:
            return missing
        q = quant.make(clss[1], dtype)
        return pipeline(enc.make(clss[0], dtype), q.encode, q.decode, dec.make(clss[2], dtype), x.to(dtype))

    oracle = enc.oracle if enc.oracle == quant.oracle == dec.oracle else None
    if oracle is None:
        return _unavailable("the oracle modules come from different providers", *names)
    exp = eager(oracle)()
    with torch.no_grad():
        _, dec_flops = _conv_lstm_flops(dec.oracle_module(), quant.oracle_module().decode(exp["codes"]))
    tols, notes = _float_tols(exp, eager(oracle, torch.float64)(), ["audio"])
    check = _codes_then_floats(exp, tols, z, codebooks)
    impls: dict[str, Impl | str] = {}
    for name in ("fastcodec", "reference", "audiocraft"):
        run = eager(name)
        impls[name] = run if isinstance(run, str) else Impl(run)
    reason = _compiled_reason(case, enc.classes, opts) or _compiled_reason(case, quant.classes, opts)
    if reason:
        impls["compiled"] = reason
    else:
        q = quant.make(quant.classes["reference"])
        impls["compiled"] = Impl(pipeline(torch.compile(enc.make(enc.classes["reference"])), torch.compile(q.encode),
                                          torch.compile(q.decode), torch.compile(dec.make(dec.classes["reference"])),
                                          x))
    flops = enc_flops + dec_flops + 2.0 * p["B"] * z.shape[-1] * rp["K"] * rp["bins"] * rp["D"]
    kbps = rp["K"] * math.log2(rp["bins"]) * FRAME_RATE / 1000
    notes.append(f"{rp['K']} codebooks of {rp['bins']} ({kbps:g} kbps); codes certified against the oracle's latent")
    if oracle != "reference":
        notes.append(f"oracle: {oracle} (the reference is not available)")
    return Built(impls, check, flops, notes)


BUILDERS: dict[str, Callable[[Case, Options], Built]] = {
    "rvq_encode": _build_rvq, "rvq_forward": _build_rvq, "rvq_train": _build_rvq, "rvq_decode": _build_rvq,
    "rvq_kmeans": _build_rvq, "seanet_encoder": _build_seanet, "seanet_decoder": _build_seanet,
    "seanet_streaming": _build_streaming, "codec": _build_codec,
}


def _rvq(op: str, B: int, T: int, K: int, suites: tuple[str, ...], bins: int = 1024, D: int = 128,
         compiled_in: tuple[str, ...] = ("full",), **extra) -> Case:
    cid = f"B{B}-T{T}-K{K}" + (f"-bins{bins}-D{D}" if (bins, D) != (1024, 128) else "")
    return Case(op, cid, dict(B=B, T=T, K=K, bins=bins, D=D, **extra), suites, compiled_in)


def _seanet(op: str, config: str, B: int, seconds: float, suites: tuple[str, ...],
            compiled_in: tuple[str, ...] = ("full",)) -> Case:
    return Case(op, f"{config}-B{B}-{seconds:g}s", dict(config=config, B=B, seconds=seconds), suites, compiled_in)


S, Q, F, G = ("smoke",), ("quick", "full"), ("full",), ("gpu",)
CASES: list[Case] = [
    _rvq("rvq_encode", 1, 20, 2, S, bins=64, D=16),
    _rvq("rvq_encode", 1, 750, 8, Q),
    _rvq("rvq_encode", 8, 750, 8, Q, compiled_in=Q),
    _rvq("rvq_encode", 32, 750, 8, F),
    _rvq("rvq_encode", 8, 750, 32, F),
    _rvq("rvq_encode", 1, 750, 32, F),
    _rvq("rvq_encode", 32, 750, 32, F),
    _rvq("rvq_encode", 8, 750, 8, F, bins=2048, D=256),
    _rvq("rvq_forward", 1, 20, 2, S, bins=64, D=16),
    _rvq("rvq_forward", 8, 750, 8, Q),
    _rvq("rvq_forward", 8, 750, 32, F),
    _rvq("rvq_train", 1, 20, 2, S, bins=64, D=16),
    _rvq("rvq_train", 1, 750, 8, Q, compiled_in=Q),
    _rvq("rvq_train", 8, 750, 8, F),
    _rvq("rvq_train", 16, 150, 32, F),
    _rvq("rvq_decode", 1, 20, 2, S, bins=64, D=16),
    _rvq("rvq_decode", 8, 750, 8, Q),
    _rvq("rvq_decode", 8, 750, 32, F),
    _rvq("rvq_decode", 32, 750, 8, F),
    _rvq("rvq_kmeans", 1, 20, 2, S, bins=16, D=16, kmeans=True, iters=3),
    _rvq("rvq_kmeans", 1, 150, 1, Q, kmeans=True, iters=10),
    _rvq("rvq_kmeans", 1, 750, 2, F, kmeans=True, iters=10),
    _seanet("seanet_encoder", "24k", 1, 0.1, S),
    _seanet("seanet_encoder", "24k", 1, 1, Q),
    _seanet("seanet_encoder", "24k", 1, 10, Q),
    _seanet("seanet_encoder", "24k", 8, 10, F),
    _seanet("seanet_encoder", "32k", 1, 10, Q),
    _seanet("seanet_encoder", "48k", 1, 10, F),
    _seanet("seanet_decoder", "24k", 1, 0.1, S),
    _seanet("seanet_decoder", "24k", 1, 1, Q),
    _seanet("seanet_decoder", "24k", 1, 10, Q),
    _seanet("seanet_decoder", "24k", 8, 10, F),
    _seanet("seanet_decoder", "32k", 1, 10, Q),
    _seanet("seanet_decoder", "48k", 1, 10, F),
    Case("seanet_streaming", "24k-zeropad-encoder-B1", dict(config="24k-zeropad", side="encoder", B=1), S + Q),
    Case("seanet_streaming", "24k-zeropad-decoder-B1", dict(config="24k-zeropad", side="decoder", B=1), S + Q),
    Case("codec", "24k-B1-0.1s-K2", dict(config="24k", B=1, seconds=0.1, K=2, bins=1024), S),
    Case("codec", "24k-B1-1s-K8", dict(config="24k", B=1, seconds=1, K=8, bins=1024), Q),
    Case("codec", "24k-B1-10s-K8", dict(config="24k", B=1, seconds=10, K=8, bins=1024), F),
    Case("codec", "24k-B8-10s-K8", dict(config="24k", B=8, seconds=10, K=8, bins=1024), F),
    # `fastcodec bench --device cuda`: the first numbers on a GPU, most wanted first (a --budget stops early)
    _rvq("rvq_encode", 32, 750, 32, G, compiled_in=G),
    _rvq("rvq_train", 32, 750, 32, G, compiled_in=G),
    _rvq("rvq_decode", 32, 750, 32, G),
    _seanet("seanet_encoder", "24k", 32, 1, G, compiled_in=G),
    _seanet("seanet_decoder", "24k", 32, 1, G, compiled_in=G),
    _rvq("rvq_encode", 1, 750, 8, G),
    _rvq("rvq_train", 8, 750, 8, G),
]

# per suite: warm-up calls, max and min timed rounds, seconds of timing after which min rounds suffice
SUITE_TIMING: dict[str, dict] = {
    "smoke": dict(warmup=1, reps=3, min_reps=2, budget_s=0.5),
    "quick": dict(warmup=1, reps=9, min_reps=3, budget_s=4.0),
    "full": dict(warmup=3, reps=25, min_reps=5, budget_s=20.0),
    "gpu": dict(warmup=3, reps=25, min_reps=5, budget_s=5.0),
}


def select(suite: str, only: list[str] | None = None) -> list[Case]:
    """The cases of ``suite`` ("smoke", "quick", "full", "gpu"), optionally restricted to some operations."""
    if suite not in SUITE_TIMING:
        raise ValueError(f"unknown suite {suite!r}; choose one of {', '.join(SUITE_TIMING)}")
    unknown = sorted(set(only or ()) - set(OPS))
    if unknown:
        raise ValueError(f"unknown operation(s) {', '.join(unknown)}; choose from {', '.join(OPS)}")
    return [c for c in CASES if suite in c.suites and (not only or c.op in only)]


def build(case: Case, opts: Options) -> Built:
    """Make ``case`` runnable: weights, inputs, oracle outputs, every provider's Impl (or reason)."""
    return BUILDERS[case.op](case, opts)
