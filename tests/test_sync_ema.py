"""Codebooks under ``torch.distributed`` (gloo, CPU): ``sync_ema=True`` against one process on the
concatenated batch, and the default mode against audiocraft's own module run in the same processes.

One start of 4 processes checks everything:
- ``sync_ema=True`` over the 4 ranks, and over the pairs {0, 1} and {2, 3} (``process_group``; ranks 2 and 3
  hold 1 and 3 batch rows): after every step the buffers are bitwise the same on every rank of the group,
  and equal to one process's step on the concatenated batch from the same state (codes exactly, cluster_size
  bitwise, embed/embed_avg to float32 rounding: the all-reduce adds the ranks' partial ``embed_sum`` in
  another order than one process does);
- default mode over the 4 ranks: audiocraft's ``ResidualVectorQuantizer`` (with flashy's broadcast),
  our reference and the fast module, lockstep on each rank's own batch, with every step expiring codes so
  buffers are broadcast from rank 0 after k-means init and after every expiry.
"""
from __future__ import annotations

import copy
import os
import pickle
import sys
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastcodec
from fastcodec.reference.quantization import ResidualVectorQuantizer as RefRVQ
from tests.utils import U32, max_abs_err

# the same rule as test_quantizer.py: a float32 result may be at most ERR_FACTOR times as far from the
# float64 one as the single-process float32 result is (or u x the value's scale where that one is exact)
ERR_FACTOR = 4.0
D, BINS, K, B, T, STEPS = 8, 16, 3, 2, 12, 3
SYNC_KW = dict(dimension=D, n_q=K, bins=BINS, kmeans_init=True, kmeans_iters=2, threshold_ema_dead_code=2,
               q_dropout=True, decay=0.9, orthogonal_reg_weight=0.1)
# threshold far above any cluster size: every layer expires codes at every step on every rank, so the
# ranks take the same decision and audiocraft broadcasts (its ranks' EMA states differ between steps, so a
# threshold they straddle would make some ranks broadcast alone: a mismatched collective)
DEFAULT_KW = dict(dimension=D, n_q=K, bins=BINS, kmeans_init=True, kmeans_iters=2, threshold_ema_dead_code=10 ** 6,
                  decay=0.9)


def _batches(seed: int, world: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(world * B, D, T, generator=g) * 1.5 for _ in range(STEPS)]


def _snapshot(m) -> dict:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _run_sync(rank: int, world: int, group, seed: int, sizes: list[int]) -> dict:
    """``sizes``: each rank's share of the world * B batch rows (they may differ)."""
    torch.manual_seed(0)
    m = fastcodec.ResidualVectorQuantizer(sync_ema=True, process_group=group, **SYNC_KW).train()
    states, codes = [_snapshot(m)], []
    lo = sum(sizes[:rank])
    for step, x in enumerate(_batches(seed, world)):
        torch.manual_seed(100 + step)
        codes.append(m(x[lo:lo + sizes[rank]], frame_rate=75).codes)
        states.append(_snapshot(m))
    return {"states": states, "codes": codes}


def _flashy_stub() -> None:
    """flashy.distrib.broadcast_tensors as flashy 0.0.2 writes it (flashy is not installed: it pulls dora)."""
    def broadcast_tensors(tensors, src=0):
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return
        tensors = [t for t in tensors if torch.is_floating_point(t) or torch.is_complex(t)]
        n = torch.tensor([len(tensors)], dtype=torch.long)
        dist.all_reduce(n)
        assert n.item() == len(tensors) * dist.get_world_size()
        for h in [dist.broadcast(t.data, src=src, async_op=True) for t in tensors]:
            h.wait()

    flashy = types.ModuleType("flashy")
    flashy.distrib = types.SimpleNamespace(broadcast_tensors=broadcast_tensors)
    sys.modules["flashy"], sys.modules["flashy.distrib"] = flashy, flashy.distrib
    core_vq = sys.modules.get("audiocraft.quantization.core_vq")
    if core_vq is not None:  # imported before the fork (earlier tests) with the no-op stub: rebind its name
        core_vq.flashy = flashy


def _run_default(rank: int, world: int) -> dict:
    from fastcodec._oracles import import_oracle

    _flashy_stub()
    vq = import_oracle("audiocraft.quantization.vq")
    mods = {}
    for name, cls in (("audiocraft", vq.ResidualVectorQuantizer), ("ref", RefRVQ), ("ref64", RefRVQ),
                      ("fast", fastcodec.ResidualVectorQuantizer)):
        torch.manual_seed(0)
        mods[name] = cls(**DEFAULT_KW).train()
    mods["ref64"].double()
    out = {name: {"states": [], "codes": []} for name in mods}
    for step, x in enumerate(_batches(7, world)):
        x = x[rank * B:(rank + 1) * B]
        if step:  # each step from the float32 reference's state: every step is measured on its own
            for name in ("fast", "ref64"):
                mods[name].load_state_dict(mods["ref"].state_dict())
        for name, m in mods.items():
            torch.manual_seed(100 + rank + step)  # the ranks' k-means draws differ: rank 0's must win
            res = m(x.double() if name == "ref64" else x, frame_rate=75)
            out[name]["codes"].append(res.codes)
            out[name]["states"].append(_snapshot(m))
    return out


def _copies(group) -> dict:
    """A process group cannot be copied or pickled: a deep copy shares it; an unpickled module refuses to
    synchronise until it is given one."""
    m = fastcodec.ResidualVectorQuantizer(sync_ema=True, process_group=group, **SYNC_KW)
    c, u = copy.deepcopy(m), pickle.loads(pickle.dumps(m))
    try:
        u(torch.zeros(B, D, T), frame_rate=75)
        refused = ""
    except RuntimeError as e:
        refused = str(e)
    return {"deepcopy_shares_group": c.process_group is group, "unpickled_refuses": refused}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["FASTCODEC_RVQ_BACKEND"] = "cpp"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    result = {
        "sync4": _run_sync(rank, world, None, seed=1, sizes=[B] * world),
        # the second pair's ranks hold 1 and 3 batch rows: gathers and the frame count handle unequal shares
        "sync2": _run_sync(rank % 2, 2, pairs[rank // 2], seed=2 + rank // 2,
                           sizes=[[B, B], [1, 2 * B - 1]][rank // 2]),
        "default": _run_default(rank, world),
        "copies": _copies(pairs[rank // 2]),
    }
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp("sync_ema")
    # once per process, before the fork: the first custom-op call imports torch._dynamo (~3 s of CPU), and the
    # extension loads; every worker inherits both
    with pytest.MonkeyPatch.context() as m:
        m.setenv("FASTCODEC_RVQ_BACKEND", "cpp")
        fastcodec.ResidualVectorQuantizer(**SYNC_KW).train()(_batches(0, 1)[0], frame_rate=75)
    # fork, not spawn: the workers inherit the imported torch and the loaded extension (a spawned worker
    # re-imports torch: ~2.5 s of CPU each); they set one thread before any parallel region
    mp.start_processes(_worker, args=(4, str(d / "init"), str(d)), nprocs=4, join=True, start_method="fork")
    return [torch.load(d / f"rank{r}.pt", weights_only=True) for r in range(4)]


def _assert_f32(name, got, ref32, ref64) -> None:
    e_got, e_ref = max_abs_err(got, ref64), max_abs_err(ref32, ref64)
    tol = ERR_FACTOR * max(e_ref, U32 * ref64.abs().max().item())
    assert e_got <= tol, f"{name}: error vs float64 {e_got:.3e} > {ERR_FACTOR:g} x max({e_ref:.3e}, u x scale)"


def _layers(state: dict):
    return sorted({k.split("._codebook.")[0] for k in state if "._codebook." in k})


@pytest.mark.parametrize("key, members, seeds", [
    ("sync4", [[0, 1, 2, 3]], [1]),
    ("sync2", [[0, 1], [2, 3]], [2, 3]),
], ids=["world4", "world2-pairs"])
def test_sync_ema_equals_one_process_on_the_concatenated_batch(ranks, key, members, seeds, monkeypatch):
    monkeypatch.setenv("FASTCODEC_RVQ_BACKEND", "cpp")  # as in the workers
    for group, seed in zip(members, seeds):
        runs = [ranks[r][key] for r in group]
        for step in range(STEPS + 1):  # bitwise the same on every rank, after every step
            for r, run in zip(group[1:], runs[1:]):
                for name, t in run["states"][step].items():
                    assert torch.equal(t, runs[0]["states"][step][name]), f"rank {r} step {step} {name}"
        xs = _batches(seed, len(group))
        for step, x in enumerate(xs):
            start = runs[0]["states"][step]
            one = fastcodec.ResidualVectorQuantizer(**SYNC_KW).train()
            one64 = RefRVQ(**SYNC_KW).double().train()
            one.load_state_dict(start)
            one64.load_state_dict(start)
            torch.manual_seed(100 + step)
            res = one(x, frame_rate=75)
            torch.manual_seed(100 + step)
            res64 = one64(x.double(), frame_rate=75)
            codes = torch.cat([run["codes"][step] for run in runs])
            assert codes.shape == res.codes.shape, "the ranks ran another number of layers than one process"
            # buffers compare to rounding only where the codes agree; 96 rows of D=8 against 16 codewords
            # keep every decision far from a tie (the float64 run chooses the same codes)
            assert torch.equal(res64.codes, res.codes) and torch.equal(codes, res.codes), f"step {step}"
            end = runs[0]["states"][step + 1]
            s32, s64 = one.state_dict(), one64.state_dict()
            for layer in _layers(end):
                p = f"{layer}._codebook."
                assert torch.equal(end[p + "inited"], s32[p + "inited"])
                # counts are exact integers and the EMA step is the kernels' fma: bitwise
                assert torch.equal(end[p + "cluster_size"], s32[p + "cluster_size"]), f"step {step} {p}cluster_size"
                for b in ("embed_avg", "embed"):
                    _assert_f32(f"step {step} {p}{b}", end[p + b], s32[p + b], s64[p + b])


def test_default_mode_matches_audiocraft_under_distributed(ranks):
    runs = [r["default"] for r in ranks]
    for step in range(STEPS):
        for rank, run in enumerate(runs):
            ac, ref, ref64, fast = (run[n]["states"][step] for n in ("audiocraft", "ref", "ref64", "fast"))
            for name in ac:  # the reference is audiocraft's arithmetic: bitwise
                assert torch.equal(ref[name], ac[name]), f"rank {rank} step {step} {name}"
            assert torch.equal(run["fast"]["codes"][step], run["ref"]["codes"][step])
            for name in ac:
                if name.endswith(("inited", "cluster_size")):
                    assert torch.equal(fast[name], ref[name]), f"rank {rank} step {step} {name}"
                else:
                    _assert_f32(f"rank {rank} step {step} {name}", fast[name], ref[name], ref64[name])
    # audiocraft's mode keeps the ranks apart: each rank's EMA step sees its own batch
    after = [run["ref"]["states"][0]["vq.layers.0._codebook.embed_avg"] for run in runs]
    assert not any(torch.equal(after[r], after[0]) for r in range(1, 4))


def test_copies_with_a_process_group(ranks):
    for r in ranks:
        assert r["copies"]["deepcopy_shares_group"]
        assert "pickled with a process_group" in r["copies"]["unpickled_refuses"]


def test_sync_ema_bad_arguments():
    with pytest.raises(TypeError, match="sync_ema"):
        fastcodec.ResidualVectorQuantizer(dimension=D, n_q=1, bins=BINS, sync_ema=1)
    with pytest.raises(ValueError, match="process_group"):
        fastcodec.ResidualVectorQuantizer(dimension=D, n_q=1, bins=BINS, process_group=object())


def test_sync_ema_single_process_is_the_default_path(monkeypatch):
    monkeypatch.setenv("FASTCODEC_RVQ_BACKEND", "cpp")
    """Without torch.distributed (or with one process) sync_ema=True runs the ordinary path: bitwise the same."""
    outs = []
    for sync in (False, True):
        torch.manual_seed(0)
        m = fastcodec.ResidualVectorQuantizer(sync_ema=sync, **SYNC_KW).train()
        for step, x in enumerate(_batches(5, 1)):
            torch.manual_seed(100 + step)
            m(x, frame_rate=75)
        outs.append(m.state_dict())
    for name in outs[0]:
        assert torch.equal(outs[0][name], outs[1][name]), name
