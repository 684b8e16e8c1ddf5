"""``fastcodec selftest``: every op and module against the reference on the user's own device.

A GPU user runs this first: the CUDA paths cannot be checked on the machines that build fastcodec. Each case
prints one line: name, the backend that ran, the max error, the tolerance and where it comes from. A float
tolerance is ``4 x`` PyTorch's own float32 error against float64 on the same inputs (at least 8 ulps of the
largest value): the kernels sum in other orders, never by more than that. Codes must be equal except at
certified near-ties (both candidates within float32 rounding of each other in float64).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

U32 = torch.finfo(torch.float32).eps


@dataclass
class Result:
    name: str
    backend: str
    error: float
    tolerance: float
    what: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance

    def line(self) -> str:
        status = "ok  " if self.ok else "FAIL"
        return (f"{status} {self.name:28} {self.backend:9} error {self.error:.3g} <= tol {self.tolerance:.3g} "
                f"({self.what}) {self.seconds:.2f}s").replace("<=", "<=" if self.ok else "> ")


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _float_case(got: torch.Tensor, ref32: torch.Tensor, ref64: torch.Tensor) -> tuple[float, float, str]:
    e32 = _err(ref32, ref64)
    tol = max(4 * e32, 8 * U32 * ref64.abs().max().item())
    return _err(got, ref64), tol, f"4x torch fp32's {e32:.2g}"


def _code_flips(codes, ref_codes, x, codebooks) -> tuple[float, float, str]:
    """Uncertified flips: positions where the codes differ and the float64 distances of the two candidates
    (at the first differing layer) are further apart than float32 rounding allows."""
    diff = (codes != ref_codes).any(1)  # (B, T)
    n_diff = int(diff.sum())
    bad = 0
    if n_diff:
        B, K, T = codes.shape
        r = x.double().transpose(1, 2)[diff]  # (n, D)
        a, b = codes.transpose(1, 2)[diff], ref_codes.transpose(1, 2)[diff]  # (n, K)
        cb = codebooks.double()
        for i in range(r.shape[0]):
            res = r[i]
            for k in range(K):
                ea, eb = cb[k, a[i, k]], cb[k, b[i, k]]
                if a[i, k] != b[i, k]:
                    da, db = ((res - ea) ** 2).sum(), ((res - eb) ** 2).sum()
                    scale = (res * res).sum() + (ea * ea).sum() + (eb * eb).sum()
                    bad += int(abs(da - db) > 8 * U32 * scale)
                    break
                res = res - ea
    return float(bad), 0.0, f"uncertified flips; {n_diff} certified near-ties"


def _rvq_cases(dev, quick: bool) -> list[tuple[str, Callable]]:
    from .ops import rvq as R

    B, D, T, K, bins = (1, 32, 40, 2, 64) if quick else (4, 128, 375, 8, 1024)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, D, T, generator=g).to(dev)
    cb = (torch.randn(K, bins, D, generator=g) * (0.6 ** torch.arange(K)).view(K, 1, 1)).to(dev).contiguous()
    cn = (cb * cb).sum(-1)

    def encode():
        codes = torch.ops.fastcodec.rvq_encode(x, cb, cn)
        return _code_flips(codes, R._encode_ref(x, cb, cn), x, cb)

    def quantize():
        codes, q, _ = torch.ops.fastcodec.rvq_quantize(x, cb, cn, False)
        q32 = R._decode_ref(codes, cb)
        return _float_case(q, q32, R._decode_ref(codes, cb.double()))

    def decode():
        codes = R._encode_ref(x, cb, cn)
        got = torch.ops.fastcodec.rvq_decode(codes, cb)
        return _float_case(got, R._decode_ref(codes, cb), R._decode_ref(codes, cb.double()))

    def ema():
        codes, _, res = R._quantize_ref(x, cb, cn, True)
        bufs = [torch.rand(K, bins, generator=g).to(dev) * 2, cb.clone(), torch.empty_like(cb)]

        def run(fn, r, bs):
            bs = [b.clone() for b in bs]
            fn(r, codes, *bs, 0.99, 1e-5)
            return bs[2]

        return _float_case(run(torch.ops.fastcodec.ema_update, res, bufs), run(R._ema_ref, res, bufs),
                           run(R._ema_ref, res.double(), [b.double() for b in bufs]))

    return [("rvq_encode", encode), ("rvq_quantize", quantize), ("rvq_decode", decode), ("ema_update", ema)]


def _conv_cases(dev, quick: bool) -> list[tuple[str, Callable]]:
    from .ops import conv as C

    T = 200 if quick else 24000
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 32, T, generator=g).to(dev)
    w = (torch.randn(32, 32, 7, generator=g) / 15).to(dev)
    wt = (torch.randn(32, 16, 8, generator=g) / 15).to(dev)
    bias = torch.randn(32, generator=g).to(dev)
    f64 = [x.double(), w.double(), bias.double()]

    def conv():
        got = C.conv1d(x, w, bias, None, 1, 3, 18, 0, "reflect", 1.0)  # dilation 3, causal reflect pad, ELU
        return _float_case(got, C.conv1d_reference(x, w, bias, None, 1, 3, 18, 0, "reflect", 1.0),
                           C.conv1d_reference(*f64, None, 1, 3, 18, 0, "reflect", 1.0))

    def conv_strided():
        got = C.conv1d(x, w, bias, None, 4, 1, 3, 3, "constant", None)
        return _float_case(got, C.conv1d_reference(x, w, bias, None, 4, 1, 3, 3, "constant", None),
                           C.conv1d_reference(*f64, None, 4, 1, 3, 3, "constant", None))

    def convt():
        got = C.conv_transpose1d(x, wt, None, 4, 0, 4, 1.0)
        return _float_case(got, C.conv_transpose1d_reference(x, wt, None, 4, 0, 4, 1.0),
                           C.conv_transpose1d_reference(x.double(), wt.double(), None, 4, 0, 4, 1.0))

    return [("conv1d (dilated, reflect)", conv), ("conv1d (strided)", conv_strided), ("conv_transpose1d", convt)]


def _module_cases(dev, quick: bool) -> list[tuple[str, Callable]]:
    import fastcodec
    from . import reference as ref

    kw = dict(channels=1, dimension=32, n_filters=4 if quick else 32, ratios=[4, 2] if quick else [8, 5, 4, 2],
              causal=True, lstm=2, norm="weight_norm")
    T = 800 if quick else 24000
    g = torch.Generator().manual_seed(2)
    wav = torch.randn(1, 1, T, generator=g).to(dev)

    def seanet(kind):
        def run():
            torch.manual_seed(0)
            r = getattr(ref, kind)(**kw).to(dev).eval()
            f = getattr(fastcodec, kind)(**kw).to(dev).eval()
            f.load_state_dict(r.state_dict())
            hop = 1
            for r_ in kw["ratios"]:
                hop *= r_
            inp = wav if kind == "SEANetEncoder" else torch.randn(1, 32, T // hop, generator=g).to(dev)
            with torch.no_grad():
                got, r32 = f(inp), r(inp)
                r64 = r.double()(inp.double())
            return _float_case(got, r32, r64)
        return run

    def rvq_train():
        B, D, T2, K, bins = (1, 16, 20, 2, 32) if quick else (4, 128, 150, 8, 1024)
        torch.manual_seed(0)
        r = ref.ResidualVectorQuantizer(dimension=D, n_q=K, bins=bins, kmeans_init=False).to(dev).train()
        f = fastcodec.ResidualVectorQuantizer(dimension=D, n_q=K, bins=bins, kmeans_init=False).to(dev).train()
        with torch.no_grad():
            for layer in r.vq.layers:
                layer._codebook.embed.copy_(torch.randn(bins, D, generator=g))
                layer._codebook.embed_avg.copy_(layer._codebook.embed)
        f.load_state_dict(r.state_dict())
        x = torch.randn(B, D, T2, generator=g).to(dev)
        torch.manual_seed(1)
        f(x, 75)
        torch.manual_seed(1)
        r(x, 75)
        # the buffers after one step: cluster sizes exact, embeddings within a few ulps (sum order)
        fs = f.state_dict()
        err = max(_err(fs[k], v) / max(v.abs().max().item(), 1e-30) for k, v in r.state_dict().items())
        return err, 8 * U32, "relative, 8 ulps: the kernels' summation order"

    return [("SEANetEncoder", seanet("SEANetEncoder")), ("SEANetDecoder", seanet("SEANetDecoder")),
            ("RVQ training step", rvq_train)]


def run(device: str = "cpu", quick: bool = False, print_fn: Callable[[str], None] = print,
        only: set[str] | None = None) -> list[Result]:
    """Run every case on ``device`` (those named in ``only``, if given) and print one line each."""
    from . import _backend

    dev = torch.device(device)
    results = []
    for family, cases in (("rvq", _rvq_cases(dev, quick)), ("conv", _conv_cases(dev, quick)),
                          ("rvq", _module_cases(dev, quick))):
        for name, fn in cases:
            if only is not None and name not in only:
                continue
            backend = _backend.choose(family if "SEANet" not in name else "conv", dev)
            t0 = time.perf_counter()
            try:
                err, tol, what = fn()
            except Exception as e:  # a crash is a failure with its reason, and the next case still runs
                err, tol, what = float("inf"), 0.0, f"{type(e).__name__}: {e}"
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            res = Result(name, backend, err, tol, what, time.perf_counter() - t0)
            print_fn(res.line())
            results.append(res)
    return results


def case_names() -> list[str]:
    return ["rvq_encode", "rvq_quantize", "rvq_decode", "ema_update", "conv1d (dilated, reflect)",
            "conv1d (strided)", "conv_transpose1d", "SEANetEncoder", "SEANetDecoder", "RVQ training step"]
