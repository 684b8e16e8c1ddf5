"""Speed of ``precision="bf16"`` against float32, audiocraft and onnxruntime, interleaved in one process.

    python -m fastcodec.bench.bf16_speed [--seconds 5] [--batch 1 8] [--rounds 5] [--configs 24k,32k]
        [--only seanet streams tokenize] [--json PATH]

Per config (the 24 kHz EnCodec and MusicGen's 32 kHz SEANet, ``fastcodec.bench.cases.SEANET_CONFIGS``), per
batch size, the SEANet encoder and decoder on ``seconds`` of audio: fastcodec at float32, fastcodec at bf16 (the
same weights), audiocraft 1.3.0's module and onnxruntime on the exported reference, called round-robin ``rounds``
times after one warm-up call each; medians and min-max in ms. Then the batched streaming codec of the 24 kHz model
(encoder + RVQ at 6 kbps + decoder, one 320-sample chunk for B streams in one state) at float32 and bf16: the
number of real-time streams the machine sustains = B x 13.33 ms / the chunk's median time. Last, the tokenization
real-time factor (``fastcodec.tokenize`` on generated 2-20 s files, 24 kHz at 6 kbps) at float32 and bf16.

On a CPU without AVX512_BF16 / AMX (``fastcodec info``), bf16 runs emulated (bf16 operands on the float32 kernels),
so it measures the cost of the rounding, not a speed-up.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
import warnings

import torch

import fastcodec
from fastcodec._oracles import OracleUnavailable, import_oracle
from fastcodec.bench.cases import SEANET_CONFIGS
from fastcodec.bench.harness import machine_info


def _onnx(model: torch.nn.Module, inp: torch.Tensor, threads: int):
    try:
        import onnx  # noqa: F401
        import onnxruntime as ort
    except ImportError:
        return None, "onnxruntime/onnx not installed"
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (inp,), buf, dynamo=False, input_names=["x"], output_names=["y"])
    except Exception as e:  # noqa: BLE001 - reported as the column's reason
        return None, f"export failed: {type(e).__name__}: {e}"[:200]
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: inp.numpy()}
    return (lambda: sess.run(None, feed)[0]), None


def _modules(kind: str, kw: dict, seed: int) -> dict:
    torch.manual_seed(seed)
    cls = fastcodec.SEANetEncoder if kind == "encoder" else fastcodec.SEANetDecoder
    f32 = cls(**kw).eval()
    with torch.no_grad():
        for p in f32.parameters():
            p.add_(0.05 * torch.randn_like(p) * (p.abs().mean() + 1e-3))
    sd = f32.state_dict()
    bf16 = cls(**kw, precision="bf16").eval()
    bf16.load_state_dict(sd)
    mods = {"fastcodec float32": f32, "fastcodec bf16": bf16}
    ref_cls = getattr(fastcodec.reference.seanet, "SEANetEncoder" if kind == "encoder" else "SEANetDecoder")
    ref = ref_cls(**kw).eval()
    ref.load_state_dict(sd)
    try:
        seanet = import_oracle("audiocraft.modules.seanet")
        ac = getattr(seanet, "SEANetEncoder" if kind == "encoder" else "SEANetDecoder")(**kw).eval()
        ac.load_state_dict(sd)
        mods["audiocraft"] = ac
    except OracleUnavailable as e:
        mods["audiocraft"] = f"n/a: {e}"
    mods["_reference"] = ref
    return mods


def _time_round_robin(fns: dict, rounds: int) -> dict:
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()  # warm-up (plans, caches, onnxruntime's first run)
        for _ in range(rounds):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: {"median_ms": statistics.median(v), "min_ms": min(v), "max_ms": max(v)} for k, v in times.items()}


def seanet_cases(configs, batches, seconds, rounds, threads) -> list[dict]:
    out = []
    for cfg in configs:
        kw, sr = SEANET_CONFIGS[cfg]["kwargs"], SEANET_CONFIGS[cfg]["sample_rate"]
        hop = 1
        for r in kw["ratios"]:
            hop *= r
        for kind in ("encoder", "decoder"):
            mods = _modules(kind, kw, seed=0)
            for B in batches:
                g = torch.Generator().manual_seed(1)
                if kind == "encoder":
                    x = 0.1 * torch.randn(B, kw["channels"], int(seconds * sr), generator=g)
                else:
                    x = torch.randn(B, kw["dimension"], int(seconds * sr) // hop, generator=g)
                fns, notes = {}, {}
                for name, m in mods.items():
                    if name.startswith("_"):
                        continue
                    if isinstance(m, str):
                        notes[name] = m
                        continue
                    fns[name] = (lambda m=m: m(x))
                ort_fn, why = _onnx(mods["_reference"], x, threads)
                if ort_fn is None:
                    notes["onnxruntime"] = why
                else:
                    fns["onnxruntime"] = ort_fn
                with torch.inference_mode():
                    y32, yb = mods["fastcodec float32"](x), mods["fastcodec bf16"](x)
                res = _time_round_robin(fns, rounds)
                row = {"config": cfg, "module": kind, "batch": B, "seconds": seconds, "results": res, "notes": notes,
                       "bf16_vs_float32_rel_l2": float((yb - y32).norm() / y32.norm())}
                base = res["fastcodec float32"]["median_ms"]
                row["speedup_vs_float32"] = {k: base / v["median_ms"] for k, v in res.items()}
                out.append(row)
                print(json.dumps({k: row[k] for k in ("config", "module", "batch")} |
                                 {k: round(v["median_ms"], 1) for k, v in res.items()}))
                sys.stdout.flush()
    return out


def streams(batches, rounds) -> dict:
    from fastcodec import streaming
    torch.manual_seed(0)
    model = fastcodec.EncodecModel.encodec_model_24khz().eval()
    model.set_target_bandwidth(6.0)
    bf = fastcodec.EncodecModel.encodec_model_24khz(precision="bf16").eval()
    bf.load_state_dict(model.state_dict())
    bf.set_target_bandwidth(6.0)
    res = {}
    for B in batches:
        fns, states = {}, {}
        chunk = 0.1 * torch.randn(B, 1, 320)
        for name, m in (("float32", model), ("bf16", bf)):
            st = streaming.stream_state(m, B)
            with torch.inference_mode():
                for _ in range(10):  # past the start-up
                    m.stream(chunk, st)
            states[name] = st
            fns[name] = (lambda m=m, st=st: m.stream(chunk, st))
        t = _time_round_robin(fns, rounds * 4)
        res[B] = {k: v | {"realtime_streams": B * 13.333 / v["median_ms"]} for k, v in t.items()}
        print(json.dumps({"streams_batch": B} | {k: round(v["realtime_streams"], 1) for k, v in res[B].items()}))
    return res


def tokenization(clips: int, rounds: int) -> dict:
    """The 24 kHz codec at 6 kbps tokenizing ``clips`` generated files of 2-20 s (``fastcodec.tokenize``), float32
    and bf16 interleaved: real-time factor = audio seconds / wall seconds (best round)."""
    import os
    import tempfile

    from fastcodec.bench.tokenize_throughput import make_clips, tokenize_run
    torch.manual_seed(0)
    model = fastcodec.EncodecModel.encodec_model_24khz().eval()
    out = {"float32": [], "bf16": []}
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "clips")
        os.makedirs(src)
        audio_s = make_clips(src, clips, 2.0, 20.0, model.sample_rate)
        for r in range(rounds):
            for p in ("float32", "bf16"):
                model.precision = p
                out[p].append(audio_s / tokenize_run(src, os.path.join(tmp, f"{p}{r}"), model, 6.0))
    res = {p: {"realtime_factor_best": max(v), "realtime_factor_median": statistics.median(v)} for p, v in out.items()}
    res["audio_seconds"] = audio_s
    print(json.dumps({"tokenize": res}))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastcodec.bench.bf16_speed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--stream-batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--configs", default="24k,32k")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--tokenize-clips", type=int, default=12, help="files for the tokenization RTF (0: skip)")
    ap.add_argument("--only", choices=["seanet", "streams", "tokenize"], nargs="+",
                    default=["seanet", "streams", "tokenize"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    warnings.filterwarnings("ignore", message="fastcodec: precision='bf16'")
    from fastcodec import precision
    report = {"machine": machine_info(), "threads": threads, "bf16": precision.status("cpu")}
    if "seanet" in args.only:
        report["seanet"] = seanet_cases(args.configs.split(","), args.batch, args.seconds, args.rounds, threads)
    if "streams" in args.only:
        report["streams"] = streams(args.stream_batch, args.rounds)
    if "tokenize" in args.only and args.tokenize_clips:
        report["tokenize"] = tokenization(args.tokenize_clips, max(2, args.rounds // 2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
