"""A model you already hold, before and after ``fastcodec.patch``: MusicGen's 32 kHz compression model.

    python -m fastcodec.bench.patched [--seconds 1] [--batch 1 8] [--repeats 5] [--threads 2] [--json PATH]

Two models, each built twice with the same random weights (one copy patched in place, one left alone) and timed
interleaved (round-robin, one process) on ``codes, scale = encode(wav)`` + ``decode(codes, scale)``:

- ``audiocraft``: audiocraft 1.3.0's ``EncodecModel`` from its SEANet/RVQ modules with MusicGen's 32 kHz settings
  (non-causal, n_filters 64, ratios 8,5,4,4, weight norm, constant padding, true skip, LSTM 2; 4 codebooks of
  2048; renormalize False), as ``MusicGen.compression_model`` holds it when trained with audiocraft;
- ``transformers``: transformers' ``EncodecModel`` with ``facebook/encodec_32khz``'s architecture (what
  audiocraft's ``get_pretrained('facebook/encodec_32khz')`` wraps; config written out here, no download), at
  its 2.2 kbps (4 codebooks).

Before timing, the patched model's output is checked against the unpatched one's: codes through the certified
near-tie rule (on the unpatched latent), audio within ``4 x`` the unpatched model's own float32 error against
its float64 copy (B=1 only: the float64 model is slow) and otherwise reported as max abs difference. Codebooks
are drawn at the latent's scale (layer k at 0.7^k of it) so the search sees trained-like distances.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch

import fastcodec
from fastcodec._oracles import import_oracle
from fastcodec.bench.harness import check_codes_equivalent, machine_info

MUSICGEN_SEANET = dict(channels=1, dimension=128, n_filters=64, n_residual_layers=1, ratios=[8, 5, 4, 4],
                       norm="weight_norm", causal=False, pad_mode="constant", true_skip=True, compress=2, lstm=2)
MUSICGEN_BINS = 2048
HF_32KHZ = dict(target_bandwidths=[2.2], sampling_rate=32000, audio_channels=1, normalize=False, chunk_length_s=None,
                overlap=None, hidden_size=128, num_filters=64, num_residual_layers=1, upsampling_ratios=[8, 5, 4, 4],
                norm_type="weight_norm", kernel_size=7, last_kernel_size=7, residual_kernel_size=3,
                dilation_growth_rate=2, use_causal_conv=False, pad_mode="reflect", compress=2, num_lstm_layers=2,
                trim_right_ratio=1.0, codebook_size=2048, codebook_dim=128, use_conv_shortcut=False)


def _audiocraft(dtype=torch.float32):
    E = import_oracle("audiocraft.models.encodec")
    S = import_oracle("audiocraft.modules.seanet")
    Q = import_oracle("audiocraft.quantization.vq")
    q = Q.ResidualVectorQuantizer(dimension=MUSICGEN_SEANET["dimension"], n_q=4, bins=MUSICGEN_BINS,
                                  kmeans_iters=50)
    m = E.EncodecModel(S.SEANetEncoder(**MUSICGEN_SEANET), S.SEANetDecoder(**MUSICGEN_SEANET), q,
                       frame_rate=50, sample_rate=32000, channels=1)
    return m.to(dtype).eval()


def _transformers(dtype=torch.float32):
    from transformers import EncodecConfig, EncodecModel

    return EncodecModel(EncodecConfig(**HF_32KHZ)).to(dtype).eval()


def _ac_run(m, x):
    codes, scale = m.encode(x)
    return codes, m.decode(codes, scale)


def _hf_run(m, x):
    out = m.encode(x, bandwidth=2.2)
    return out.audio_codes[0], m.decode(out.audio_codes, out.audio_scales).audio_values


MODELS = {
    "audiocraft": (_audiocraft, _ac_run, lambda m: m.quantizer.vq.layers, lambda layer: layer._codebook,
                   lambda m, x: m.encoder(x)),
    "transformers": (_transformers, _hf_run, lambda m: m.quantizer.layers, lambda layer: layer.codebook,
                     lambda m, x: m.encoder(x)),
}


def _init_codebooks(m, layers, codebook, latent, gen) -> None:
    scale = latent.std().item()
    with torch.no_grad():
        for k, layer in enumerate(layers(m)):
            cb = codebook(layer)
            cb.embed.copy_(torch.randn(cb.embed.shape, generator=gen) * scale * 0.7 ** k)
            cb.inited.fill_(1)


def run(seconds: float, batches: list[int], repeats: int) -> list[dict]:
    rows = []
    for name, (make, fn, layers, codebook, encode) in MODELS.items():
        torch.manual_seed(0)
        plain = make()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            probe = torch.randn(1, 1, 32000, generator=gen) * 0.1
            _init_codebooks(plain, layers, codebook, encode(plain, probe), gen)
        patched = make()
        patched.load_state_dict(plain.state_dict())
        fastcodec.patch(patched)
        for B in batches:
            x = torch.randn(B, 1, int(seconds * 32000), generator=gen) * 0.1
            with torch.no_grad():
                codes_p, audio_p = fn(patched, x)  # first calls: builds, caches
                codes_u, audio_u = fn(plain, x)
                cbs = torch.stack([codebook(layer).embed for layer in layers(plain)])
                ok, flips, detail = check_codes_equivalent(codes_p, codes_u, encode(plain, x), cbs)
                if not ok:
                    raise AssertionError(f"{name} B{B}: patched codes differ from the unpatched model's: {detail}")
                # decode the same codes on both sides for the audio check
                audio_p = fn(patched, x)[1] if torch.equal(codes_p, codes_u) else audio_p
                err = (audio_p - audio_u).abs().max().item()
                check = f"codes equal ({flips} certified near-tie rows); audio max diff {err:.2e}"
                if B == 1:
                    m64 = make(torch.float64)
                    m64.load_state_dict(plain.state_dict())
                    codes64, audio64 = fn(m64, x.double())
                    if torch.equal(codes64, codes_u):
                        err32 = (audio_u.double() - audio64).abs().max().item()
                        errp = (audio_p.double() - audio64).abs().max().item()
                        floor = 8 * torch.finfo(torch.float32).eps * audio64.abs().max().item()
                        if errp > 4 * err32 + floor:
                            raise AssertionError(f"{name} B1: patched audio error {errp:.2e} > 4 x {err32:.2e}")
                        check += f"; vs float64 {errp:.2e} (unpatched float32: {err32:.2e})"
                    del m64
            times = {"patched": [], "unpatched": []}
            with torch.no_grad():
                for _ in range(repeats):
                    for label, m in (("patched", patched), ("unpatched", plain)):
                        t0 = time.perf_counter()
                        fn(m, x)
                        times[label].append((time.perf_counter() - t0) * 1e3)
            med = {k: statistics.median(v) for k, v in times.items()}
            row = dict(model=name, batch=B, seconds=seconds, check=check,
                       patched_ms=med["patched"], unpatched_ms=med["unpatched"],
                       patched_range=[min(times["patched"]), max(times["patched"])],
                       unpatched_range=[min(times["unpatched"]), max(times["unpatched"])],
                       speedup=med["unpatched"] / med["patched"])
            rows.append(row)
            print(f"{name:12s} B{B} {seconds:g} s  patched {med['patched']:8.1f} ms "
                  f"({row['patched_range'][0]:.0f}-{row['patched_range'][1]:.0f})  unpatched "
                  f"{med['unpatched']:8.1f} ms ({row['unpatched_range'][0]:.0f}-{row['unpatched_range'][1]:.0f})  "
                  f"{row['speedup']:.2f}x  [{check}]", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="audio per batch row (default 1)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per provider (default 5)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", help="write the rows and the machine description here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*weight_norm.*")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = run(args.seconds, args.batch, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(started=started, threads=args.threads, machine=machine_info(), rows=rows), f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
