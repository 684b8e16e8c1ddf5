"""How SEANet cases are built: the encoder and decoder offline, streaming, and the whole codec.

Streaming: fastcodec's row is ``fastcodec.streaming.StreamingSEANet{Encoder,Decoder}``, driven through
audiocraft's convention, ``with m.streaming(): y = m(chunk)``; it must reproduce the offline reference
output of the whole stream (on the causal 24 kHz model with
zero padding: reflect padding makes the offline output of a prefix read past its end). The reference
and audiocraft keep no state: their row is the stateless way, one chunk plus enough left context for
the convs (inexact all the same: the LSTM state is lost).
"""
from __future__ import annotations

import contextlib
import io
import math
import time
import warnings
from functools import partial
from typing import Callable

import torch

from .build_rvq import _rvq_family, _stacked_embed
from .case_base import (FRAME_RATE, NO_ORACLE, Case, Options, _classes, _codes_then_floats, _compiled_reason,
                        _Family, _float_tols, _no_grad, _unavailable)
from .harness import Built, Impl, Missing, compare_float_dict

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
