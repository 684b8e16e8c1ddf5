"""Cost of ``sync_ema=True``: bytes all-reduced per training step and the all-reduce's share of a step.

    python -m fastcodec.bench.sync_ema [--world 2] [--batch 8] [--time 750] [--dim 128] [--bins 1024]
                                       [--n-q 8 32] [--steps 6] [--threads 1] [--json PATH]

Starts ``world`` gloo processes on this machine (one thread each by default: 2 processes on 2 cores).
Per ``n_q``, each rank trains the quantizer on its own (batch, dim, time) latent, interleaved:

Steps are timed in wall-clock and in process CPU time (on a shared machine the wall time includes time spent
descheduled; the CPU time does not).

- ``default`` step: forward + backward with ``sync_ema=False`` (audiocraft's mode: nothing communicated
  after init);
- ``sync`` step: the same with ``sync_ema=True``; the all-reduce inside it is timed (``allreduce_ms``,
  which includes waiting for the slower rank) and, after a barrier, a bare all-reduce of the same buffer
  (``bare_allreduce_ms``: the transfer alone).

Bytes per step and rank: ``4 * (1 + n_q * bins * (dim + 1))`` (float32 frames, counts, embed_sum); a ring
all-reduce sends and receives ``2 (world - 1) / world`` times that per rank.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def bytes_per_step(n_q: int, bins: int, dim: int) -> int:
    return 4 * (1 + n_q * bins * (dim + 1))


def _worker(rank: int, args, init_file: str, out_file: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=args.world)
    import fastcodec
    from fastcodec import distributed as fdist

    timed = []
    real_all_reduce = fdist.EmaStats.all_reduce

    def all_reduce(self, frames, group=None):
        t0 = time.perf_counter()
        total = real_all_reduce(self, frames, group)
        timed.append((time.perf_counter() - t0) * 1e3)
        return total

    fdist.EmaStats.all_reduce = all_reduce
    results = []
    for n_q in args.n_q:
        kw = dict(dimension=args.dim, n_q=n_q, bins=args.bins, kmeans_init=False)
        torch.manual_seed(0)  # the same codebooks on every rank (kmeans_init=False: Kaiming-uniform)
        mods = {"default": fastcodec.ResidualVectorQuantizer(**kw).train(),
                "sync": fastcodec.ResidualVectorQuantizer(sync_ema=True, **kw).train()}
        g = torch.Generator().manual_seed(1000 + rank)
        step_ms = {"default": [], "sync": []}
        cpu_ms = {"default": [], "sync": []}
        ar_ms, bare_ms = [], []
        for step in range(args.steps + 1):
            x = torch.randn(args.batch, args.dim, args.time, generator=g) * 1.5
            for name, m in mods.items():
                xi = x.clone().requires_grad_()
                dist.barrier()
                timed.clear()
                t0, c0 = time.perf_counter(), time.process_time()
                res = m(xi, frame_rate=75)
                (res.x.square().mean() + res.penalty).backward()
                ms, cms = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
                if step:  # the first step warms up
                    step_ms[name].append(ms)
                    cpu_ms[name].append(cms)
                    if name == "sync":
                        ar_ms.append(sum(timed))
            buf = torch.zeros(bytes_per_step(n_q, args.bins, args.dim) // 4)
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(buf)
            if step:
                bare_ms.append((time.perf_counter() - t0) * 1e3)
        same = fdist.buffers_equal_across_ranks(mods["sync"].buffers())
        med = {k: statistics.median(v) for k, v in step_ms.items()}
        results.append({
            "n_q": n_q, "bytes_per_step": bytes_per_step(n_q, args.bins, args.dim),
            "default_step_ms": med["default"], "sync_step_ms": med["sync"],
            "default_step_cpu_ms": statistics.median(cpu_ms["default"]),
            "sync_step_cpu_ms": statistics.median(cpu_ms["sync"]),
            "allreduce_ms": statistics.median(ar_ms), "bare_allreduce_ms": statistics.median(bare_ms),
            "allreduce_share_of_sync_step": statistics.median(ar_ms) / med["sync"],
            "sync_buffers_bitwise_equal_across_ranks": same,
            "default_step_ms_all": step_ms["default"], "sync_step_ms_all": step_ms["sync"], "allreduce_ms_all": ar_ms,
        })
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--time", type=int, default=750)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--bins", type=int, default=1024)
    p.add_argument("--n-q", type=int, nargs="+", default=[8, 32])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from .streaming_latency import machine_info

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "out.json")
        mp.spawn(_worker, args=(args, os.path.join(d, "init"), out), nprocs=args.world, join=True)
        with open(out) as f:
            rows = json.load(f)
    report = {"machine": machine_info(), "args": vars(args), "results": rows}
    for r in rows:
        print(f"n_q={r['n_q']:3d}  {r['bytes_per_step'] / 1e6:7.2f} MB/step"
              f"  step default {r['default_step_ms']:8.1f} ms (cpu {r['default_step_cpu_ms']:.1f})"
              f"  sync {r['sync_step_ms']:8.1f} ms (cpu {r['sync_step_cpu_ms']:.1f})"
              f"  all-reduce {r['allreduce_ms']:6.1f} ms"
              f" ({100 * r['allreduce_share_of_sync_step']:.1f}%)  bare {r['bare_allreduce_ms']:6.1f} ms"
              f"  ranks bitwise equal: {r['sync_buffers_bitwise_equal_across_ranks']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
