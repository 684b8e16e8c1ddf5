"""What ``precision="bf16"`` costs in fidelity against the float32 path, on real and generated audio.

    python -m fastcodec.bench.bf16_fidelity [--audio FILE ...] [--seconds 180] [--models 24khz,32khz] [--json PATH]

For each model and bandwidth, the same audio goes through the float32 codec and the bf16 codec (the same module,
``model.precision`` switched), and we report:

- code agreement per codebook level: the fraction of frames whose code at level k is the same (a level that
  differs changes every residual after it, so later levels agree less);
- the encoder latent's relative error, ||z_bf16 - z_f32|| / ||z_f32||;
- SI-SNR (dB) and mel distance (audiocraft's ``MelSpectrogramL1Loss``: L1 of log-mel, 64 mels) of the bf16
  decode (bf16 codes through the bf16 decoder) against the float32 decode, and the same for the bf16 decoder fed
  the float32 codes (the decoder's share).

Audio: the files given with ``--audio`` (encodec's repository ships test_24k.wav and test_48k.wav) converted to the
model's rate and channels, plus ``--seconds`` of generated material (``material``): speech-like (harmonics of a
moving pitch shaped by moving formants, syllable envelopes, fricative noise), music-like (chords of decaying
harmonic notes with a bass line), percussion (kick, snare, hats), coloured noise and a sweep.

Weights: ``--checkpoint`` (e.g. encodec's encodec_24khz-d7cc33bc.th, or a Hugging Face folder) measures those;
fastcodec never downloads. Without it the encoder and decoder carry the preset's initialisation (weight norm, as
EnCodec starts training) and the codebooks are fitted by the quantizer's own k-means initialisation on the
latents of ``--fit-seconds`` of other generated clips (what EnCodec training starts from), so the nearest-code
search sees trained-like distances on audio it was not fitted on.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings

import numpy as np
import torch

import fastcodec
from fastcodec.audio import convert_audio
from fastcodec.bench.harness import machine_info

BANDWIDTHS = {"24khz": (1.5, 6.0, 24.0), "32khz": (2.2,)}


# ---------------------------------------------------------------------------------------------
# material
# ---------------------------------------------------------------------------------------------


def _envelope(n: int, sr: int, rate_hz: float, rng) -> np.ndarray:
    """Syllable-like on/off amplitude: raised-cosine bumps at about ``rate_hz``."""
    env = np.zeros(n)
    t = 0
    while t < n:
        length = int(sr / rate_hz * rng.uniform(0.5, 1.2))
        on = min(length, n - t)
        env[t:t + on] = np.sin(np.linspace(0, math.pi, on)) ** 2 * rng.uniform(0.3, 1.0)
        t += length + int(sr * rng.uniform(0.0, 0.15))
    return env


def speech_like(n: int, sr: int, rng) -> np.ndarray:
    t = np.arange(n) / sr
    f0 = 120 + 60 * rng.uniform(0.5, 1.5) * np.sin(2 * math.pi * 0.7 * t + rng.uniform(0, 6)) \
        + 10 * np.sin(2 * math.pi * 5.5 * t)
    phase = 2 * math.pi * np.cumsum(f0) / sr
    # formants change every ~150 ms (vowels), interpolated
    steps = max(2, int(t[-1] / 0.15) + 2)
    formants = [np.interp(t, np.linspace(0, t[-1], steps), rng.uniform(lo, hi, steps))
                for lo, hi in ((300, 900), (900, 2400), (2400, 3400))]
    y = np.zeros(n)
    for k in range(1, 40):
        fk = k * f0
        amp = sum(np.exp(-0.5 * ((fk - F) / (80 + 0.05 * F)) ** 2) for F in formants) / k ** 0.5
        amp = np.where(fk < sr / 2 - 200, amp, 0.0)
        y += amp * np.sin(k * phase)
    y *= _envelope(n, sr, 4.0, rng)
    fric = rng.standard_normal(n) * (_envelope(n, sr, 1.5, rng) > 0.7)
    fric = np.diff(fric, prepend=0.0) * 0.15  # high-passed noise
    return y / (np.abs(y).max() + 1e-9) * 0.5 + fric


def music_like(n: int, sr: int, rng) -> np.ndarray:
    y = np.zeros(n)
    roots = [48, 53, 55, 57, 60, 62]
    t0 = 0
    while t0 < n:
        dur = int(sr * rng.choice([0.25, 0.5, 0.75, 1.0]))
        root = rng.choice(roots)
        for midi in (root, root + 4 if rng.random() < 0.5 else root + 3, root + 7, root - 12):
            f = 440.0 * 2 ** ((midi - 69) / 12)
            m = min(int(sr * 1.5), n - t0)
            tt = np.arange(m) / sr
            note = sum(np.sin(2 * math.pi * f * h * (1 + 0.0004 * h * h) * tt) * np.exp(-tt * (2 + 1.5 * h)) / h
                       for h in range(1, 12) if f * h < sr / 2)
            y[t0:t0 + m] += note * rng.uniform(0.2, 0.5)
        t0 += dur
    return y / (np.abs(y).max() + 1e-9) * 0.6


def percussion(n: int, sr: int, rng) -> np.ndarray:
    y = np.zeros(n)
    beat = int(sr * 60 / rng.uniform(90, 140) / 2)
    for i, t0 in enumerate(range(0, n, beat)):
        m = min(int(sr * 0.4), n - t0)
        tt = np.arange(m) / sr
        if i % 4 == 0:  # kick: a falling sine
            y[t0:t0 + m] += np.sin(2 * math.pi * (50 + 100 * np.exp(-tt * 30)) * tt) * np.exp(-tt * 8)
        elif i % 4 == 2:  # snare: tone plus noise
            y[t0:t0 + m] += (0.4 * np.sin(2 * math.pi * 190 * tt) + rng.standard_normal(m) * 0.6) * np.exp(-tt * 18)
        hat = min(int(sr * 0.05), n - t0)
        y[t0:t0 + hat] += np.diff(rng.standard_normal(hat), prepend=0.0) * 0.2 * np.exp(-np.arange(hat) / sr * 60)
    return y / (np.abs(y).max() + 1e-9) * 0.7


def coloured_noise(n: int, sr: int, rng) -> np.ndarray:
    white = rng.standard_normal(n)
    spec = np.fft.rfft(white)
    f = np.fft.rfftfreq(n, 1 / sr)
    spec /= np.maximum(f, 20.0) ** 0.5  # pink
    y = np.fft.irfft(spec, n)
    y *= 0.5 + 0.5 * np.sin(2 * math.pi * 0.3 * np.arange(n) / sr) ** 2
    return y / (np.abs(y).max() + 1e-9) * 0.4


def sweep(n: int, sr: int, rng) -> np.ndarray:
    t = np.arange(n) / sr
    f = 50 * (sr / 2 / 50 * 0.9) ** (t / t[-1])
    return 0.3 * np.sin(2 * math.pi * np.cumsum(f) / sr)


KINDS = {"speech": speech_like, "music": music_like, "percussion": percussion, "noise": coloured_noise,
         "sweep": sweep}


def material(sr: int, channels: int, seconds: float, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """``seconds`` of generated audio at ``sr`` split over the kinds (speech and music get 3x the others);
    clips of at most 20 s, each (channels, T) float32 (stereo: the second channel is a delayed, filtered copy)."""
    rng = np.random.default_rng(seed)
    weights = {"speech": 3, "music": 3, "percussion": 2, "noise": 1, "sweep": 1}
    total_w = sum(weights.values())
    clips = []
    for kind, w in weights.items():
        left = seconds * w / total_w
        i = 0
        while left > 0.5:
            dur = min(20.0, left)
            x = KINDS[kind](int(dur * sr), sr, rng)
            if channels == 2:
                x = np.stack([x, np.roll(np.convolve(x, [0.6, 0.4], "same"), int(0.004 * sr))])
            else:
                x = x[None]
            clips.append((f"{kind}{i}", torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))))
            left -= dur
            i += 1
    return clips


def load_audio(path: str, sr: int, channels: int) -> torch.Tensor:
    import soundfile as sf
    data, rate = sf.read(path, dtype="float32", always_2d=True)
    return convert_audio(torch.from_numpy(data.T.copy()), rate, sr, channels)


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


def si_snr_db(est: torch.Tensor, ref: torch.Tensor) -> float:
    est, ref = est.double().flatten(), ref.double().flatten()
    est, ref = est - est.mean(), ref - ref.mean()
    proj = (est @ ref) / (ref @ ref).clamp_min(1e-20) * ref
    noise = est - proj
    return float(10 * torch.log10((proj @ proj).clamp_min(1e-20) / (noise @ noise).clamp_min(1e-20)))


def build_model(name: str, fit: list[torch.Tensor], checkpoint: str | None = None,
                config: str | None = None) -> fastcodec.EncodecModel:
    """The checkpoint, or the preset with its initial SEANet weights and codebooks fitted by k-means on the latents
    of ``fit`` (other clips than the ones measured)."""
    if checkpoint:
        return fastcodec.EncodecModel.from_pretrained(checkpoint, config=config).eval()
    torch.manual_seed(0)
    model = getattr(fastcodec.EncodecModel, f"encodec_model_{name}")()
    model.eval()
    with torch.no_grad():
        z = torch.cat([model.encoder(c[None]) for c in fit], dim=-1)  # (1, D, frames)
        q = model.quantizer
        q.set_num_codebooks(q.total_codebooks)
        for layer in q.vq.layers:  # every codebook uninitialised: k-means on the first training call
            layer._codebook.inited.fill_(0)
        q.train()
        q(z, model.frame_rate)  # every level: k-means on its residuals
        q.eval()
    return model


def codebooks(model, bandwidth: float) -> int:
    """Codebooks at ``bandwidth`` kbps: bandwidth / (frame rate x bits per code)."""
    return max(1, int(round(bandwidth * 1000 / (model.frame_rate * math.log2(model.quantizer.bins)))))


def fidelity(model: fastcodec.EncodecModel, clips: list[tuple[str, torch.Tensor]], bandwidths) -> dict:
    from fastcodec.losses import MelSpectrogramL1Loss
    mel = MelSpectrogramL1Loss(model.sample_rate, n_mels=64)
    out: dict = {"latent_rel_err": None, "bandwidths": {}}
    num = den = 0.0
    per_bw = {bw: {"agree": None, "frames": 0, "si_snr": [], "mel": [], "si_snr_dec": [], "mel_dec": []}
              for bw in bandwidths}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for name, x in clips:
            model.precision = "float32"
            z32 = model.encoder(x[None])
            model.precision = "bf16"
            zb = model.encoder(x[None])
            num += float((zb - z32).double().pow(2).sum())
            den += float(z32.double().pow(2).sum())
            for bw in bandwidths:
                model.precision = "float32"
                model.quantizer.set_num_codebooks(codebooks(model, bw))
                c32 = model.quantizer.encode(z32)  # (B, K, frames) at the bandwidth's K
                y32 = model.decoder(model.quantizer.decode(c32))
                model.precision = "bf16"
                cb = model.quantizer.encode(zb)
                yb = model.decoder(model.quantizer.decode(cb))
                yb_dec = model.decoder(model.quantizer.decode(c32))
                r = per_bw[bw]
                eq = (cb == c32).double().sum(dim=(0, 2))
                r["agree"] = eq if r["agree"] is None else r["agree"] + eq
                r["frames"] += c32.shape[0] * c32.shape[-1]
                n = min(y32.shape[-1], x.shape[-1])
                r["si_snr"].append(si_snr_db(yb[..., :n], y32[..., :n]))
                r["mel"].append(float(mel(yb[..., :n], y32[..., :n])))
                r["si_snr_dec"].append(si_snr_db(yb_dec[..., :n], y32[..., :n]))
                r["mel_dec"].append(float(mel(yb_dec[..., :n], y32[..., :n])))
    model.precision = "float32"
    out["latent_rel_err"] = math.sqrt(num / den)
    for bw, r in per_bw.items():
        agree = (r["agree"] / r["frames"]).tolist()
        out["bandwidths"][str(bw)] = {
            "codebooks": len(agree),
            "code_agreement_per_level": [round(a, 5) for a in agree],
            "si_snr_db_median": float(np.median(r["si_snr"])), "si_snr_db_min": float(np.min(r["si_snr"])),
            "mel_l1_median": float(np.median(r["mel"])), "mel_l1_max": float(np.max(r["mel"])),
            "decoder_only_si_snr_db_median": float(np.median(r["si_snr_dec"])),
            "decoder_only_mel_l1_median": float(np.median(r["mel_dec"])),
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastcodec.bench.bf16_fidelity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--audio", nargs="*", default=[])
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--models", default="24khz,32khz")
    ap.add_argument("--fit-seconds", type=float, default=120.0,
                    help="generated audio (other clips) the codebooks are fitted on, without --checkpoint")
    ap.add_argument("--checkpoint", default=None, help="a local checkpoint or Hugging Face folder (one model)")
    ap.add_argument("--config", default=None, help="the checkpoint's config.json, where it is not beside it")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    report = {"machine": machine_info(), "seconds_generated": args.seconds, "fit_seconds": args.fit_seconds,
              "checkpoint": args.checkpoint, "config": args.config, "audio_files": args.audio, "models": {}}
    for name in args.models.split(","):
        t0 = time.perf_counter()
        probe = getattr(fastcodec.EncodecModel, f"encodec_model_{name}")()
        sr, ch = probe.sample_rate, probe.channels
        gen = material(sr, ch, args.seconds)
        real = [(p.rsplit("/", 1)[-1], load_audio(p, sr, ch)) for p in args.audio]
        fit = [c for _, c in material(sr, ch, args.fit_seconds, seed=1)]
        model = build_model(name, fit, args.checkpoint, args.config)
        res = {"generated": fidelity(model, gen, BANDWIDTHS[name])}
        if real:
            res["files"] = fidelity(model, real, BANDWIDTHS[name])
        res["audio_seconds"] = {"generated": sum(c.shape[-1] for _, c in gen) / sr,
                                "files": sum(c.shape[-1] for _, c in real) / sr}
        res["wall_s"] = time.perf_counter() - t0
        report["models"][name] = res
        print(json.dumps({name: res}, indent=1))
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
