"""Hours of audio tokenized per hour: ``fastcodec tokenize`` against the loop users write today.

    python -m fastcodec.bench.tokenize_throughput [--clips 40] [--min 2] [--max 20] [--rounds 2] [--json PATH]

On the same generated files (``clips`` WAVs of uniform random length in [min, max] s, at the model's rate):

- 24 kHz at 6 kbps: encodec 0.1.1's ``EncodecModel``, file by file (soundfile read, ``model.encode(wav[None])``,
  ``np.save`` of the codes), against ``fastcodec.tokenize.Tokenizer`` with the same weights;
- MusicGen's 32 kHz codec (4 codebooks of 2048, 50 Hz): audiocraft 1.3.0's SEANet encoder and RVQ with the
  ``encodec_musicgen_32khz`` settings, file by file, ``quantizer.encode(encoder(wav))``, which is what
  audiocraft's ``EncodecModel.encode`` runs for this model (no renormalisation; ``audiocraft.models`` itself
  imports transformers, which trips over the missing torchaudio here), against the tokenizer.

Weights are random (speed does not depend on them) with codebooks at the latent's scale. The two ways run
interleaved ``rounds`` times (the machine is shared); the best round of each is reported, with the
speed-up of the medians. Codes are checked equal on the first file.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import types

import numpy as np
import soundfile as sf
import torch

import fastcodec
from fastcodec.audio import convert_audio
from fastcodec.bench.harness import machine_info
from fastcodec.tokenize import Tokenizer, list_sources

SEANET_32K = dict(channels=1, dimension=128, n_filters=64, n_residual_layers=1, ratios=[8, 5, 4, 4],
                  norm="weight_norm", causal=False, pad_mode="reflect", true_skip=True, compress=2, lstm=2)
# pad_mode: facebook/encodec_32khz's config (transformers' default "reflect"), the model MusicGen loads


def _random_state(model, sample_rate: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {k: v + 0.1 * (v.abs().mean() + 1e-3) * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
          for k, v in model.state_dict().items()}
    model.load_state_dict(sd)
    with torch.inference_mode():
        scale = model.encoder(torch.randn(1, model.channels, sample_rate, generator=g)).std().item()
    for i in range(model.quantizer.total_codebooks if hasattr(model.quantizer, "total_codebooks")
                   else model.quantizer.n_q):
        pre = f"quantizer.vq.layers.{i}._codebook."
        embed = torch.randn(sd[pre + "embed"].shape, generator=g) * scale * 0.7 ** i
        sd[pre + "embed"], sd[pre + "embed_avg"] = embed, embed.clone()
        sd[pre + "cluster_size"] = torch.ones_like(sd[pre + "cluster_size"])
        sd[pre + "inited"] = torch.ones_like(sd[pre + "inited"])
    return sd


def models_24k():
    from fastcodec._oracles import import_oracle
    sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))  # encodec.utils: file I/O only
    em = import_oracle("encodec.model")
    theirs = em.EncodecModel._get_model([1.5, 3.0, 6.0, 12.0, 24.0], 24_000, 1, causal=True,
                                        model_norm="weight_norm", audio_normalize=False, name="encodec_24khz")
    ours = fastcodec.EncodecModel.encodec_model_24khz()
    sd = _random_state(ours, 24_000)
    ours.load_state_dict(sd)
    theirs.load_state_dict(sd)
    ours.set_target_bandwidth(6.0)
    theirs.set_target_bandwidth(6.0)
    baseline = lambda wav: theirs.encode(wav[None])[0][0]  # noqa: E731
    return ours.eval(), theirs.eval(), baseline, 6.0


def models_32k():
    from fastcodec._oracles import import_oracle
    from fastcodec.quantization import ResidualVectorQuantizer
    from fastcodec.seanet import SEANetDecoder, SEANetEncoder
    make = getattr(fastcodec.EncodecModel, "encodec_model_32khz", None)
    if make is not None:
        ours = make()
    else:
        ours = fastcodec.EncodecModel(SEANetEncoder(**SEANET_32K), SEANetDecoder(**SEANET_32K),
                                      ResidualVectorQuantizer(dimension=128, n_q=4, bins=2048), [2.2], 32_000, 1,
                                      name="encodec_32khz")
    seanet = import_oracle("audiocraft.modules.seanet")
    vq = import_oracle("audiocraft.quantization.vq")
    theirs = torch.nn.Module()
    theirs.encoder, theirs.decoder = seanet.SEANetEncoder(**SEANET_32K), seanet.SEANetDecoder(**SEANET_32K)
    theirs.quantizer = vq.ResidualVectorQuantizer(dimension=128, n_q=4, bins=2048)
    theirs.sample_rate, theirs.channels = 32_000, 1
    sd = _random_state(ours, 32_000)
    ours.load_state_dict(sd)
    theirs.load_state_dict(sd)
    bw = ours.target_bandwidths[-1]
    ours.set_target_bandwidth(bw)
    baseline = lambda wav: theirs.quantizer.encode(theirs.encoder(wav[None]))  # noqa: E731
    return ours.eval(), theirs.eval(), baseline, bw


def make_clips(folder: str, n: int, lo: float, hi: float, sr: int, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    total = 0.0
    for i in range(n):
        sec = float(rng.uniform(lo, hi))
        x = (0.1 * rng.standard_normal(int(sec * sr))).astype(np.float32)
        sf.write(os.path.join(folder, f"clip{i:03d}.wav"), x, sr, subtype="PCM_16")
        total += len(x) / sr
    return total


def naive_loop(folder: str, out: str, model, encode) -> float:
    """What a user writes today: one file at a time."""
    t0 = time.perf_counter()
    for name in sorted(os.listdir(folder)):
        data, sr = sf.read(os.path.join(folder, name), dtype="float32", always_2d=True)
        wav = convert_audio(torch.from_numpy(data.T.copy()), sr, model.sample_rate, model.channels)
        with torch.no_grad():
            codes = encode(wav)
        np.save(os.path.join(out, name + ".npy"), codes[0].numpy().astype(np.int16))
    return time.perf_counter() - t0


def tokenize_run(folder: str, out: str, model, bw: float) -> float:
    t0 = time.perf_counter()
    Tokenizer(model, out, bw, progress=False).run(list_sources(folder))
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastcodec.bench.tokenize_throughput",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=40)
    ap.add_argument("--min", type=float, default=2.0)
    ap.add_argument("--max", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--models", default="24khz,32khz")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    res = {"machine": machine_info(), "threads": torch.get_num_threads(), "clips": args.clips,
           "seconds": [args.min, args.max], "results": {}}
    for name in args.models.split(","):
        ours, theirs, encode, bw = {"24khz": models_24k, "32khz": models_32k}[name]()
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "src")
            os.mkdir(src)
            audio_s = make_clips(src, args.clips, args.min, args.max, ours.sample_rate)
            # warm-up (extension loads, weight packing) on the first clip, and the codes check
            first = sorted(os.listdir(src))[0]
            data, _ = sf.read(os.path.join(src, first), dtype="float32", always_2d=True)
            wav = torch.from_numpy(data.T.copy())
            with torch.no_grad():
                same = torch.equal(encode(wav), ours.encode(wav[None])[0][0])
            naive_t, fast_t = [], []
            for r in range(args.rounds):
                for label, times, fn in (("naive", naive_t, lambda o: naive_loop(src, o, theirs, encode)),
                                         ("tokenize", fast_t, lambda o: tokenize_run(src, o, ours, bw))):
                    out = os.path.join(tmp, f"{label}{r}")
                    os.mkdir(out)
                    times.append(fn(out))
                    print(f"{name} round {r}: {label} {times[-1]:.1f} s for {audio_s / 3600:.3f} h of audio "
                          f"({audio_s / times[-1]:.1f}x real time)", file=sys.stderr, flush=True)
        row = {"audio_hours": audio_s / 3600, "bandwidth": bw, "codes_equal_first_file": same,
               "naive_s": naive_t, "tokenize_s": fast_t,
               "naive_hours_per_hour": audio_s / min(naive_t), "tokenize_hours_per_hour": audio_s / min(fast_t),
               "speedup_median": statistics.median(naive_t) / statistics.median(fast_t)}
        res["results"][name] = row
        print(f"{name} {bw} kbps: naive {row['naive_hours_per_hour']:.1f} h/h, fastcodec tokenize "
              f"{row['tokenize_hours_per_hour']:.1f} h/h, speed-up (medians) {row['speedup_median']:.2f}x; "
              f"codes equal on the first file: {same}", flush=True)
    m = res["machine"]
    print(f"machine: {m.get('cpu_model')}, {res['threads']} threads, load average {m.get('loadavg')}, {m.get('date')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
