"""How an RVQ case is built: quantizers with random codebooks (consistent EMA buffers, a few dead codes),
the input, the oracle's outputs and tolerances, and each provider's encode/forward/train/decode/k-means run."""
from __future__ import annotations

import torch

from .case_base import (FRAME_RATE, NO_ORACLE, Case, Options, _classes, _codes_then_floats, _compiled_reason,
                        _Family, _float_tols, _no_grad, _unavailable)
from .harness import Built, Impl, call, compare_float_dict


def _rvq_kwargs(p: dict) -> dict:
    return dict(dimension=p["D"], n_q=p["K"], bins=p["bins"], decay=0.99, kmeans_init=p.get("kmeans", False),
                kmeans_iters=p.get("iters", 10), threshold_ema_dead_code=2)


def _rvq_state(template: dict, p: dict, gen: torch.Generator, scale: float = 1.0) -> dict:
    """Random codebooks with consistent EMA buffers; about 2% dead codes so a train step expires some."""
    sd = dict(template)
    K, bins, D = p["K"], p["bins"], p["D"]
    for i in range(K):
        pre = f"vq.layers.{i}._codebook."
        if p.get("kmeans", False):
            for name in ("embed", "embed_avg", "cluster_size", "inited"):
                sd[pre + name] = torch.zeros_like(template[pre + name])
            continue
        embed = torch.randn(bins, D, generator=gen) * scale * 0.7**i  # residuals shrink layer by layer
        cs = 5 + 5 * torch.rand(bins, generator=gen)
        cs[torch.rand(bins, generator=gen) < 0.02] = 1.0  # below threshold_ema_dead_code=2
        sd[pre + "embed"] = embed
        sd[pre + "embed_avg"] = embed * cs[:, None]
        sd[pre + "cluster_size"] = cs
        sd[pre + "inited"] = torch.ones(1)
    return sd


def _rvq_family(p: dict, opts: Options, gen: torch.Generator, scale: float = 1.0) -> tuple[_Family, dict] | None:
    """Quantizers with the shape of ``p`` and one random state_dict (also returned: stateful ops reload it)."""
    classes, oracle = _classes("rvq")
    if oracle is None:
        return None
    kwargs = _rvq_kwargs(p)
    sd = _rvq_state(classes[oracle](**kwargs).state_dict(), p, gen, scale)

    def make(cls, dtype=torch.float32):
        m = cls(**kwargs)
        m.load_state_dict(sd, strict=True)
        return m.to(device=opts.device, dtype=dtype).eval()

    return _Family(classes, oracle, make), sd


def _stacked_embed(sd: dict, K: int, device: torch.device) -> torch.Tensor:
    return torch.stack([sd[f"vq.layers.{i}._codebook.embed"] for i in range(K)]).to(device)


def _rvq_buffers(m: torch.nn.Module, K: int) -> dict[str, torch.Tensor]:
    sd = m.state_dict()
    return {n: torch.stack([sd[f"vq.layers.{i}._codebook.{n}"] for i in range(K)]).detach().clone()
            for n in ("embed", "embed_avg", "cluster_size")}


def _rvq_impl(op: str, m: torch.nn.Module, entry: tuple, x: torch.Tensor, sd: dict, K: int,
              codes: torch.Tensor | None) -> Impl:
    """How ``op`` runs on quantizer ``m``; ``entry`` = (forward, encode, decode), eager or compiled."""
    forward, encode, decode = entry
    if op == "rvq_encode":
        return Impl(_no_grad(lambda: encode(x)), outputs=lambda c: {"codes": c})
    if op == "rvq_decode":
        return Impl(_no_grad(lambda: decode(codes)), outputs=lambda q: {"x": q})
    if op == "rvq_forward":
        return Impl(_no_grad(lambda: forward(x, FRAME_RATE)), outputs=lambda r: {"codes": r.codes, "x": r.x})
    if op == "rvq_kmeans":
        def setup():
            m.load_state_dict(sd)
            m.train()
            torch.manual_seed(0)  # k-means draws its initial means from torch's RNG

        return Impl(_no_grad(lambda: forward(x, FRAME_RATE)), setup=setup,
                    outputs=lambda r: _rvq_buffers(m, K))
    if op == "rvq_train":
        xs: list[torch.Tensor] = []

        def setup():
            m.load_state_dict(sd)
            m.train()
            torch.manual_seed(0)  # dead-code expiry samples replacements with torch's RNG
            xs[:] = [x.detach().clone().requires_grad_(True)]

        def step():
            r = forward(xs[0], FRAME_RATE)
            (r.x.square().mean() + r.penalty).backward()
            return r

        def outputs(r):
            return {"codes": r.codes, "x": r.x, "penalty": r.penalty.reshape(1), "grad": xs[0].grad,
                    **_rvq_buffers(m, K)}

        return Impl(step, setup=setup, outputs=outputs)
    raise ValueError(f"unknown RVQ op {op!r}")


def _build_rvq(case: Case, opts: Options) -> Built:
    op, p, dev = case.op, case.params, opts.device
    names = ["fastcodec", "reference", "audiocraft", "compiled"]
    gen = torch.Generator().manual_seed(0)
    family = _rvq_family(p, opts, gen)
    if family is None:
        return _unavailable(NO_ORACLE, *names)
    fam, sd = family
    classes, oracle, make = fam.classes, fam.oracle, fam.make
    B, T, K, D, bins = p["B"], p["T"], p["K"], p["D"], p["bins"]
    x = torch.randn(B, D, T, generator=gen).to(dev)
    codebooks = _stacked_embed(sd, K, dev)

    def eager(m):
        return (m, m.encode, m.decode)

    om = fam.oracle_module()
    codes = None
    if op == "rvq_decode":
        with torch.no_grad():
            codes = om.encode(x)
    exp = _rvq_impl(op, om, eager(om), x, sd, K, codes)
    exp_out = {k: v.detach().clone() for k, v in exp.outputs(call(exp, dev)[0]).items()}
    float_keys = [k for k in exp_out if k != "codes"]
    if op == "rvq_kmeans":
        # Lloyd's iterations amplify rounding into other assignments, so a float64 run is no yardstick
        # (its embed differs by up to 1e3x on Gaussian data). Bound instead: a mean summed in another
        # order over <= N rows is off by <= N ulps; smoothing and division add a few (8).
        tols, notes = {k: (0.0, (B * T + 8) * 2.0**-24) for k in float_keys}, []
    else:
        m64 = fam.oracle_module(torch.float64)
        e64 = _rvq_impl(op, m64, eager(m64), x.double(), sd, K, codes)
        tols, notes = _float_tols(exp_out, e64.outputs(call(e64, dev)[0]), float_keys)
    if "codes" in exp_out:
        check = _codes_then_floats(exp_out, tols, x, codebooks)
    else:
        def check(o):
            return compare_float_dict(o, exp_out, tols)

    impls: dict[str, Impl | str] = {}
    for name in ("fastcodec", "reference", "audiocraft"):
        cls = classes[name]
        if isinstance(cls, str):
            impls[name] = cls
            continue
        m = make(cls)
        impls[name] = _rvq_impl(op, m, eager(m), x, sd, K, codes)
    reason = _compiled_reason(case, classes, opts)
    if reason:
        impls["compiled"] = reason
    else:
        cm = make(classes["reference"])
        entry = (torch.compile(cm), torch.compile(cm.encode), torch.compile(cm.decode))
        impls["compiled"] = _rvq_impl(op, cm, entry, x, sd, K, codes)
    N = B * T
    flops = {
        "rvq_encode": 2.0 * N * K * bins * D,
        "rvq_forward": 2.0 * N * K * bins * D,
        "rvq_train": 4.0 * N * K * bins * D,  # search + embed_sum = x^T onehot, both GEMM-sized
        "rvq_kmeans": 2.0 * N * bins * D * p.get("iters", 10) * K,  # assignment as a GEMM, per iteration and layer
        "rvq_decode": None,  # a gather-sum: memory-bound, no GFLOP/s
    }[op]
    if oracle != "reference":
        notes.append(f"oracle: {oracle} (the reference is not available)")
    return Built(impls, check, flops, notes)
