"""Per-chunk latency of exact streaming (``fastcodec.streaming``) on the causal 24 kHz EnCodec, on CPU.

    python -m fastcodec.bench.streaming_latency [--threads 1 2] [--seconds 10] [--batch 1] [--json PATH]

For each thread count, in one process, ``seconds`` of audio in 320-sample chunks (13.3 ms, one frame):

- encoder: chunk -> latent frames; decoder: one latent frame -> 320 samples; codec: chunk -> codes at
  6 kbps (8 codebooks) -> audio, with its real-time factor (median latency / 13.3 ms);
- latency distribution per chunk (median, p99, max), the first 7 chunks apart: reflect padding makes
  the 24 kHz encoder wait for 7 frames and then emit them at once (part of the offline definition);
- the stateless way (audiocraft's 5.3 ms "stateless and wrong"): the offline encoder on one chunk,
  timed interleaved with the stream (every ``ref_every``-th chunk);
- the floor: every frame reads all float32 weights (encoder 30 MB), so a chunk costs at least the time
  to read them once (``torch.sum`` over each weight the stream reads), measured in the same run;
- exactness: the streamed output of the whole signal against the offline pass, next to PyTorch's own
  float32 error (offline float32 vs float64);
- memory: the state's bytes after 1 s and at the end (flat), and the process's peak RSS growth.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import resource
import statistics
import time

import torch

from fastcodec import steps
from fastcodec import streaming as S

HOP = 320
SAMPLE_RATE = 24_000
STARTUP_CHUNKS = 7  # reflect padding of the last encoder conv (kernel 7): 7 frames before the first output


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None}


def _stats(ms: list[float], cpu_ms: list[float] | None = None) -> dict:
    """Wall-clock distribution; ``cpu_median_ms`` is the process CPU time (all threads): on a loaded machine
    wall >> CPU shows time spent descheduled."""
    s = sorted(ms)
    out = {"n": len(s), "median_ms": statistics.median(s), "p99_ms": s[min(len(s) - 1, int(0.99 * len(s)))],
           "max_ms": s[-1], "mean_ms": statistics.fmean(s)}
    if cpu_ms:
        out["cpu_median_ms"] = statistics.median(cpu_ms)
    return out


class _Timer:
    """Wall and process-CPU milliseconds of each call."""

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __call__(self, fn, *args):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn(*args)
        self.wall.append((time.perf_counter() - t0) * 1e3)
        self.cpu.append((time.process_time() - c0) * 1e3)
        return out

    def stats(self, skip: int = 0) -> dict:
        return {"startup": _stats(self.wall[:skip]), **_stats(self.wall[skip:], self.cpu[skip:])} if skip else \
            _stats(self.wall, self.cpu)


def _streamed_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors one frame reads: packed conv weights and the LSTM's matrices."""
    out = []

    def walk(steps):
        for st in steps:
            if isinstance(st, (steps.ConvStep, steps.ConvTrStep)):
                out.append(st.weight.get()[1])
            elif isinstance(st, steps.LSTMStep):
                out.extend(t for layer in st.weights.transposed() for t in layer[:2])
            elif isinstance(st, steps.ResStep):
                walk(st.block)
                walk(st.shortcut_steps)

    walk(S.plan_of(module).steps)
    return out


def weight_floor_ms(module: torch.nn.Module, reps: int = 12) -> dict:
    """The per-frame floor: median time to read every streamed weight once, from cache ("hot", repeated
    passes) and from memory ("cold", after reading 64 MiB elsewhere to evict the 32 MiB L3)."""
    weights = _streamed_weights(module)
    scratch = torch.ones(16 * 2**20)
    out = {"weight_bytes": sum(w.numel() * w.element_size() for w in weights)}
    for name, evict in (("floor_hot_ms", False), ("floor_cold_ms", True)):
        times = []
        for _ in range(reps):
            if evict:
                scratch.sum()
            t0 = time.perf_counter()
            for w in weights:
                w.sum()
            times.append((time.perf_counter() - t0) * 1e3)
        out[name] = statistics.median(times[2:])
    return out


def _quantizer_cls(rvq: str):
    """The quantizer the codec runs: ``fast`` (``fastcodec.ResidualVectorQuantizer``) or ``reference``."""
    if rvq == "reference":
        from fastcodec.reference.quantization import ResidualVectorQuantizer
    else:
        from fastcodec import ResidualVectorQuantizer
    return ResidualVectorQuantizer


def _model(seed: int = 0, rvq: str = "fast") -> tuple[S.StreamingEncodecModel, torch.nn.Module]:
    torch.manual_seed(seed)
    model = S.StreamingEncodecModel.encodec_model_24khz(quantizer_cls=_quantizer_cls(rvq))
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "weight_g"):
                m.weight_g.mul_(torch.empty_like(m.weight_g).uniform_(0.5, 1.5))
        sigma = model.encoder(torch.randn(1, 1, 4 * HOP)).std().item()
        for k, layer in enumerate(model.quantizer.vq.layers):
            layer._codebook.embed.copy_(torch.randn_like(layer._codebook.embed) * sigma * 0.6 ** k)
            layer._codebook.inited.fill_(1.0)
    model.set_target_bandwidth(6.0)
    return model, copy.deepcopy(model).double()


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def measure(threads: int = 1, seconds: float = 10.0, batch: int = 1, ref_every: int = 10, seed: int = 0,
            rvq: str = "fast") -> dict:
    """One thread count: latency of encoder, decoder and codec streams, bounds, exactness and memory."""
    torch.set_num_threads(threads)
    model, model64 = _model(seed, rvq)
    enc, dec = model.encoder, model.decoder
    n_chunks = int(seconds * SAMPLE_RATE) // HOP
    gen = torch.Generator().manual_seed(seed + 1)
    audio = torch.randn(batch, 1, n_chunks * HOP, generator=gen) * 0.1
    chunks = list(audio.split(HOP, -1))
    res: dict = {"threads": threads, "batch": batch, "seconds": n_chunks * HOP / SAMPLE_RATE, "chunk_samples": HOP,
                 "chunk_ms": 1e3 * HOP / SAMPLE_RATE, "rvq": type(model.quantizer).__module__, **machine_info()}

    with torch.no_grad():
        # encoder: stream, with the stateless reference timed every ref_every-th chunk
        state = enc.stream_state(batch)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t_enc, t_ref, outs = _Timer(), _Timer(), []
        for i, c in enumerate(chunks):
            outs.append(t_enc(enc.stream, c, state)[0])
            if i % ref_every == 0:
                t_ref(enc, c)
            if i == min(SAMPLE_RATE // HOP, len(chunks) - 1):
                res["state_bytes_1s"] = state.nbytes()
        res["state_bytes_end"] = state.nbytes()
        res["encoder_stream_rss_growth_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        outs.append(enc.stream_flush(state))
        latent = torch.cat(outs, -1)
        off32, off64 = enc(audio), model64.encoder(audio.double())
        res["encoder"] = {**t_enc.stats(STARTUP_CHUNKS), "err_vs_offline32": _err(latent, off32),
                          "err_vs_offline64": _err(latent, off64), "offline32_err_vs_64": _err(off32, off64),
                          **weight_floor_ms(enc)}
        res["reference_stateless"] = t_ref.stats()

        # decoder: one latent frame at a time
        state = dec.stream_state(batch)
        t_dec = _Timer()
        outs = [t_dec(dec.stream, z, state)[0] for z in off32.split(1, -1)]
        outs.append(dec.stream_flush(state))
        decoded = torch.cat(outs, -1)
        dec32, dec64 = dec(off32), model64.decoder(off32.double())
        res["decoder"] = {**t_dec.stats(STARTUP_CHUNKS), "err_vs_offline32": _err(decoded, dec32),
                          "err_vs_offline64": _err(decoded, dec64), "offline32_err_vs_64": _err(dec32, dec64),
                          **weight_floor_ms(dec)}

        # codec: audio -> codes -> audio, chunk by chunk (the decoder starts 7 frames after the encoder)
        state = model.stream_state(batch)
        t_codec = _Timer()
        outs = [t_codec(model.stream, c, state)[0] for c in chunks]
        outs.append(model.stream_flush(state))
        res["codec"] = {**t_codec.stats(2 * STARTUP_CHUNKS), "samples_out": sum(o.shape[-1] for o in outs)}
        res["codec"]["rtf"] = res["codec"]["median_ms"] / res["chunk_ms"]

        # the codec's quantizer alone on one frame: encode + decode (part of the codec row)
        t_rvq = _Timer()
        for z in off32.split(1, -1):
            t_rvq(lambda f: model.quantizer.decode(model.quantizer.encode(f)), z)
        res["rvq_one_frame"] = t_rvq.stats()
    return res


def format_table(results: list[dict]) -> str:
    r0 = results[0]
    lines = [f"exact streaming, 24 kHz EnCodec, {r0['seconds']:.1f} s in {r0['chunk_samples']}-sample chunks "
             f"({r0['chunk_ms']:.1f} ms), batch {r0['batch']}; {r0['cpu']}, torch {r0['torch']}, "
             f"load {tuple(round(x, 1) for x in r0['loadavg'] or ())}",
             f"{'threads':>7} {'path':<20} {'median ms':>9} {'p99 ms':>8} {'max ms':>8} {'cpu ms':>7} "
             f"{'floor hot/cold ms':>17}  notes"]
    for r in results:
        for name in ("encoder", "decoder", "codec", "rvq_one_frame", "reference_stateless"):
            d = r[name]
            note = ""
            if "err_vs_offline32" in d:
                note = (f"err vs offline32 {d['err_vs_offline32']:.1e} (offline32 vs 64: "
                        f"{d['offline32_err_vs_64']:.1e}); start-up median {d['startup']['median_ms']:.2f} ms")
            if name == "codec":
                note = f"RTF {d['rtf']:.3f}"
            if name == "rvq_one_frame":
                note = f"{r['rvq']} encode + decode, 8 codebooks"
            if name == "reference_stateless":
                note = "offline encoder on one chunk (no state: wrong output)"
            floor = f"{d['floor_hot_ms']:8.2f}/{d['floor_cold_ms']:<8.2f}" if "floor_hot_ms" in d else f"{'':>17}"
            lines.append(f"{r['threads']:>7} {name:<20} {d['median_ms']:9.3f} {d['p99_ms']:8.3f} {d['max_ms']:8.3f} "
                         f"{d['cpu_median_ms']:7.3f} {floor}  {note}")
        lines.append(f"{r['threads']:>7} encoder state bytes after 1 s {r['state_bytes_1s']}, at the end "
                     f"{r['state_bytes_end']}; peak RSS growth while streaming "
                     f"{r['encoder_stream_rss_growth_mib']:.1f} MiB; weights read per frame: encoder "
                     f"{r['encoder']['weight_bytes'] / 2**20:.1f} MiB, decoder "
                     f"{r['decoder']['weight_bytes'] / 2**20:.1f} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rvq", choices=["fast", "reference"], default="fast", help="the codec's quantizer")
    p.add_argument("--json", default=None, help="write the results here (e.g. bench/results/streaming.json)")
    args = p.parse_args(argv)
    results = [measure(t, args.seconds, args.batch, rvq=args.rvq) for t in args.threads]
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
