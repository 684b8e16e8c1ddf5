"""Ragged batches: ``fastcodec.ragged.encode_batch`` against encoding the clips one at a time.

B clips of random lengths (1-10 s by default) through the 24 kHz preset (causal), MusicGen's 32 kHz architecture
(non-causal, 64 filters, ratios 8,5,4,4, 2048 bins, 4 codebooks) and the 48 kHz preset (1 s segments), random
weights. Providers run interleaved (round-robin) in one process; codes are checked equal first. Also times one
plain ``model.encode`` of the zero-padded batch (what a naive batcher would do; its codes are not the clips'
own). Usage: ``python scripts/bench_ragged.py [--batch 8] [--repeats 3] [--models 24,32,48]``.
"""
from __future__ import annotations

import argparse
import math
import platform
import random
import statistics
import time

import torch

import fastcodec
from fastcodec import ragged
from fastcodec.model import EncodecModel


def musicgen_32khz() -> EncodecModel:
    kw = dict(channels=1, dimension=128, n_filters=64, n_residual_layers=1, ratios=[8, 5, 4, 4],
              norm="weight_norm", causal=False, pad_mode="reflect", true_skip=False, compress=2, lstm=2)
    q = fastcodec.ResidualVectorQuantizer(dimension=128, n_q=4, bins=2048)
    return EncodecModel(fastcodec.SEANetEncoder(**kw), fastcodec.SEANetDecoder(**kw), q, [2.2], 32_000, 1).eval()


def _init_codebooks(model: EncodecModel) -> None:
    with torch.no_grad():
        sigma = model.encoder(torch.randn(1, model.channels, model.sample_rate // 10)).std().item()
        for k, layer in enumerate(model.quantizer.vq.layers):
            layer._codebook.embed.copy_(torch.randn_like(layer._codebook.embed) * sigma * 0.6 ** k)
            layer._codebook.inited.fill_(1.0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--min-s", type=float, default=1.0)
    p.add_argument("--max-s", type=float, default=10.0)
    p.add_argument("--models", default="24,32,48")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-naive", action="store_true", help="do not time the naive padded batch")
    args = p.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"CPU batch budget {ragged.MAX_BATCH_SAMPLES['cpu']} samples")
    builders = {"24": lambda: EncodecModel.encodec_model_24khz(), "32": musicgen_32khz,
                "48": lambda: EncodecModel.encodec_model_48khz()}
    for key in args.models.split(","):
        model = builders[key]()
        _init_codebooks(model)
        if key == "24":
            model.set_target_bandwidth(6.0)
        elif key == "48":
            model.set_target_bandwidth(6.0)
        sr = model.sample_rate
        lengths = [int(rng.uniform(args.min_s, args.max_s) * sr) for _ in range(args.batch)]
        clips = [torch.randn(model.channels, n) * 0.1 for n in lengths]
        padded = torch.zeros(len(clips), model.channels, max(lengths))
        for b, c in enumerate(clips):
            padded[b, :, :c.shape[-1]] = c
        with torch.no_grad():
            alone = [model.encode(c[None]) for c in clips]
            batched = ragged.encode_batch(model, clips)
        for a, b in zip(alone, batched):
            assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b)), "codes differ: no timing"
        providers = {
            "one-at-a-time": lambda: [model.encode(c[None]) for c in clips],
            "encode_batch": lambda: ragged.encode_batch(model, clips),
            "naive padded (inexact)": lambda: model.encode(padded),
        }
        if args.skip_naive:
            del providers["naive padded (inexact)"]
        times = {k: [] for k in providers}
        with torch.no_grad():
            for _ in range(args.repeats):
                for k, fn in providers.items():
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
        audio = sum(lengths) / sr
        base = statistics.median(times["one-at-a-time"])
        print(f"\n{model.name if model.name != 'unset' else 'musicgen-32khz-arch'} "
              f"({ragged.strategy(model, clips[0])}): B={len(clips)}, {audio:.1f} s of audio, "
              f"lengths {[round(n / sr, 2) for n in lengths]} s")
        for k, ts in times.items():
            med = statistics.median(ts)
            print(f"  {k:24s} median {med * 1000:8.0f} ms (min {min(ts) * 1000:.0f}, max {max(ts) * 1000:.0f})"
                  f"  {base / med:5.2f}x vs one-at-a-time, {audio / med:6.1f}x real time")


if __name__ == "__main__":
    main()
