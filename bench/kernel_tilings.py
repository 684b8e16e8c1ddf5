"""The two CPU conv kernels, each at the other's shapes (one thread, under a minute).

    python -m fastcodec.bench.kernel_tilings [--repeats 15] [--json PATH]

csrc/conv1d_cpu.cpp (``fastcodec::conv1d``, offline: vectorised along time, tens of frames per micro-tile) and
csrc/stream_cpu.cpp (``fastcodec::conv1d_update``, streaming: a chunk's few frames as GEMM rows, vectorised along
output channels) sum each output in different orders, so one cannot replace the other without changing the bits of
one path. This measures what each tiling would cost on the other's work, for layers of the 24 kHz SEANet encoder:

- ``chunk``: the frames one 320-sample chunk completes at that layer. ``offline`` is the offline kernel on the
  window those frames read (padding 0), ``streaming`` the update op pushing the chunk's new samples into a state
  that already holds the window's first ``span - stride`` samples.
- ``signal``: 1 s of audio at that layer. ``offline`` is the offline kernel with the layer's causal padding,
  ``streaming`` the update op fed the padded second at once (it also copies it into its time-major state).

Both are called as the SEANet steps call them, without the dispatcher: the offline op's cpp implementation
(``fastcodec.ops.conv.IMPLS["cpp"]``) and the eager ``fastcodec.ops.stream.conv1d_update``. Weights are random.
Times are medians of ``repeats`` calls after a warm-up, interleaved per shape.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fastcodec.bench.harness import machine_info
from fastcodec.ops import conv as conv_ops
from fastcodec.ops import stream as stream_ops
from fastcodec.reference.conv import pad1d

SAMPLE_RATE = 24000
CHUNK = 320  # samples per streamed chunk (one 75 Hz frame)
# (name, c_in, c_out, kernel, stride, dilation, hop: input samples per sample at this layer, elu)
LAYERS = [
    ("res 32->16 k3", 32, 16, 3, 1, 1, 1, True),
    ("down 128->256 k10 s5", 128, 256, 10, 5, 1, 8, True),
    ("down 256->512 k16 s8", 256, 512, 16, 8, 1, 40, True),
]


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _case(c_in, c_out, k, s, d, length, new, alpha, repeats, gen):
    """Offline conv over ``length`` samples (padding 0) vs the update op pushing ``new`` of them into a state holding
    the first ``length - new``; both give the same frames."""
    span = (k - 1) * d + 1
    frames = (length - span) // s + 1
    x = torch.randn(1, c_in, length, generator=gen)
    w = torch.randn(c_out, c_in, k, generator=gen) / (c_in * k) ** 0.5
    b = torch.randn(c_out, generator=gen)
    offline = conv_ops.IMPLS["cpp"]
    panels = stream_ops.pack_panels(stream_ops.pack_conv1d_weight(w).t())
    state = torch.zeros(1, length, c_in).transpose(1, 2)  # time-major (B, C, cap)
    out = torch.empty(1, frames, c_out).transpose(1, 2)  # channel stride 1
    held = length - new
    if held:
        head = x[:, :, :held]
        state[:, :, :held].copy_(torch.nn.functional.elu(head, alpha) if alpha is not None else head)
    x_new = x[:, :, held:]

    def run_offline():
        offline(x, w, b, None, s, d, 0, 0, "constant", alpha)

    def run_streaming():
        stream_ops.conv1d_update(x_new, state, panels, b, 0, held, frames, k, s, d, alpha, out)

    ms = {}
    for _ in range(2):  # interleaved: each kernel measured twice, the best median kept
        for name, fn in (("offline", run_offline), ("streaming", run_streaming)):
            ms[name] = min(ms.get(name, float("inf")), _median_ms(fn, repeats))
    return {"frames": frames, "input_samples": length, "new_samples": new, "offline_ms": round(ms["offline"], 4),
            "streaming_ms": round(ms["streaming"], 4),
            "streaming_over_offline": round(ms["streaming"] / ms["offline"], 3)}


def run(repeats: int = 15) -> dict:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for name, c_in, c_out, k, s, d, hop, elu in LAYERS:
            alpha = 1.0 if elu else None
            span = (k - 1) * d + 1
            pad = span - s
            # one chunk: its new samples at this layer complete new // s frames reading pad more samples before
            new = CHUNK // hop
            chunk = _case(c_in, c_out, k, s, d, pad + new, new, alpha, repeats, gen)
            # one second: the causally padded signal at once
            t = SAMPLE_RATE // hop
            left, right = conv_ops.streamable_padding(t, k, s, d, causal=True)
            signal = _case(c_in, c_out, k, s, d, left + t + right, left + t + right, alpha, max(3, repeats // 3), gen)
            rows.append({"layer": name, "c_in": c_in, "c_out": c_out, "kernel": k, "stride": s, "dilation": d,
                         "chunk": chunk, "signal": signal})
            print(f"{name:24s} chunk ({chunk['frames']:3d} frames): offline {chunk['offline_ms']:8.3f} ms, streaming "
                  f"{chunk['streaming_ms']:8.3f} ms | 1 s ({signal['frames']:5d} frames): offline "
                  f"{signal['offline_ms']:8.3f} ms, streaming {signal['streaming_ms']:8.3f} ms", flush=True)
    ext = conv_ops._cpu_ext()
    return {"machine": machine_info(), "simd": ext.simd(), "threads": torch.get_num_threads(), "repeats": repeats,
            "chunk_samples": CHUNK, "sample_rate": SAMPLE_RATE, "rows": rows}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    res = run(args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
