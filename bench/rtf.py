"""Real-time factors of the whole 24 kHz EnCodec on CPU, next to the EnCodec paper's (one thread).

    python -m fastcodec.bench.rtf [--threads 1] [--seconds 10] [--bandwidth 6] [--repeats 7] [--json PATH]

The paper (Defossez et al. 2022, Table 4) reports the 24 kHz model at 6 kbps encoding 9.8x and decoding
10.4x faster than real time on one CPU thread. Here, in one process and interleaved, for each provider:
encode = ``model.encode(wav)`` (SEANet encoder + RVQ at the bandwidth), decode = ``model.decode(frames)``
(RVQ decode + SEANet decoder), on ``seconds`` of audio, B=1, the model in eval under ``inference_mode``.
Providers: fastcodec's ``EncodecModel``; the reference (bit-identical to encodec 0.1.1, i.e. eager
PyTorch as the paper's code runs it); the same model built from audiocraft 1.3.0's SEANet and RVQ
modules when audiocraft is installed. RTF = audio seconds / median wall seconds. Weights are random
(speed does not depend on them) with codebooks at the latent's scale, layer k at 0.7^k of it, so the
nearest-code search sees trained-like distances; fastcodec's codes are checked against the reference's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import fastcodec
from fastcodec._oracles import OracleUnavailable, import_oracle
from fastcodec.bench.harness import machine_info
from fastcodec.reference.model import EncodecModel as ReferenceModel

PAPER_RTF = {"encode": 9.8, "decode": 10.4}  # EnCodec paper, 24 kHz, 6 kbps, one CPU thread


def _models(seed: int) -> dict[str, torch.nn.Module]:
    models = {"fastcodec": fastcodec.EncodecModel.encodec_model_24khz(),
              "reference": ReferenceModel.encodec_model_24khz()}
    try:
        seanet, vq = import_oracle("audiocraft.modules.seanet"), import_oracle("audiocraft.quantization.vq")
    except OracleUnavailable as e:
        print(f"audiocraft row omitted: {e}", file=sys.stderr)
    else:
        models["audiocraft"] = ReferenceModel.encodec_model_24khz(
            encoder_cls=seanet.SEANetEncoder, decoder_cls=seanet.SEANetDecoder, quantizer_cls=vq.ResidualVectorQuantizer)
    ref = models["reference"]
    g = torch.Generator().manual_seed(seed)
    sd = {k: v + 0.1 * (v.abs().mean() + 1e-3) * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
          for k, v in ref.state_dict().items()}
    with torch.inference_mode():
        scale = ref.encoder(torch.randn(1, 1, 24_000, generator=g)).std().item()
    for i in range(ref.quantizer.n_q):
        pre = f"quantizer.vq.layers.{i}._codebook."
        embed = torch.randn(sd[pre + "embed"].shape, generator=g) * scale * 0.7 ** i
        sd[pre + "embed"], sd[pre + "embed_avg"] = embed, embed.clone()
        sd[pre + "cluster_size"] = torch.ones_like(sd[pre + "cluster_size"])
        sd[pre + "inited"] = torch.ones_like(sd[pre + "inited"])
    for m in models.values():
        m.load_state_dict(sd, strict=True)
        m.eval()
    return models


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastcodec.bench.rtf", description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--bandwidth", type=float, default=6.0)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    models = _models(seed=0)
    for m in models.values():
        m.set_target_bandwidth(args.bandwidth)
    wav = 0.1 * torch.randn(1, 1, int(args.seconds * 24_000), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref_frames = models["reference"].encode(wav)
        fast_frames = models["fastcodec"].encode(wav)
    codes_r, codes_f = ref_frames[0][0], fast_frames[0][0]
    same = (codes_r == codes_f).float().mean().item()

    out = {"machine": machine_info(),
           "seconds": args.seconds, "bandwidth_kbps": args.bandwidth, "paper_rtf": PAPER_RTF,
           "codes_equal_fraction": same, "results": {}}
    print(f"24 kHz EnCodec, {args.bandwidth:g} kbps, B=1, {args.seconds:g} s of audio; "
          f"fastcodec codes equal the reference's at {100 * same:.2f}% of positions")
    for threads in args.threads:
        torch.set_num_threads(threads)
        times: dict[str, dict[str, list[float]]] = {n: {"encode": [], "decode": []} for n in models}
        with torch.inference_mode():
            for rep in range(args.repeats + 1):  # the first round warms up (weight caches, packing, builds)
                for name, m in models.items():
                    t0 = time.perf_counter()
                    frames = m.encode(wav)
                    t1 = time.perf_counter()
                    m.decode(frames)
                    t2 = time.perf_counter()
                    if rep:
                        times[name]["encode"].append(t1 - t0)
                        times[name]["decode"].append(t2 - t1)
        print(f"\n== {threads} thread(s) ==")
        print(f"{'provider':<11} {'stage':<7} {'median ms':>10} {'min-max ms':>17} {'RTF':>7} "
              f"{'x paper':>8} {'fastcodec x':>12}")
        res = out["results"][str(threads)] = {}
        for name in models:
            for stage in ("encode", "decode"):
                ts = times[name][stage]
                med = statistics.median(ts)
                rtf = args.seconds / med
                speed = med / statistics.median(times["fastcodec"][stage])
                res.setdefault(name, {})[stage] = {"median_ms": med * 1e3, "min_ms": min(ts) * 1e3,
                                                   "max_ms": max(ts) * 1e3, "rtf": rtf}
                print(f"{name:<11} {stage:<7} {med * 1e3:>10.1f} {min(ts) * 1e3:>8.1f}-{max(ts) * 1e3:<8.1f} "
                      f"{rtf:>6.1f}x {rtf / PAPER_RTF[stage]:>7.2f}x {speed:>11.2f}x")
    print(f"\npaper (one thread): encode {PAPER_RTF['encode']}x, decode {PAPER_RTF['decode']}x real time")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
