"""Output checks of ``fastcodec bench`` and the tests: float outputs within a tolerance derived from PyTorch's own
float32 error, and codes equal to the oracle's except at certified near-ties (float32 rounding bounds of the
distances). Re-exported by ``harness.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

EPS32 = 2.0**-23
U32 = 2.0**-24  # float32 unit roundoff


@dataclass
class Check:
    ok: bool
    detail: str
    flips: int = 0  # codes: rows that differ at exact duplicates or certified near-ties
    err: float | None = None  # max abs error (floats)
    tol: float | None = None

    @staticmethod
    def all(checks: list["Check"]) -> "Check":
        return Check(all(c.ok for c in checks), "; ".join(c.detail for c in checks), sum(c.flips for c in checks))


def float_tolerance(ref: torch.Tensor, ref64: torch.Tensor) -> float:
    """Tolerance for a float32 output: 4x PyTorch's own float32 error against a float64 run of the
    reference (DESIGN: "the error of PyTorch's own float32 result vs a float64 reference, times a
    small factor"), plus one float32 ulp of the largest value so an output that float64 happens to
    reproduce exactly does not demand bit-equality."""
    err = (ref.detach().double().cpu() - ref64.detach().double().cpu()).abs().max().item()
    scale = ref64.detach().abs().max().item() if ref64.numel() else 0.0
    return 4.0 * err + EPS32 * scale


def compare_floats(name: str, out: Any, ref: torch.Tensor, tol: float, rtol: float = 0.0) -> Check:
    """``|out - ref| <= tol + rtol * |ref|`` everywhere; shapes and NaN patterns must agree."""
    if not isinstance(out, torch.Tensor):
        return Check(False, f"{name}: got {type(out).__name__}, expected a tensor")
    if tuple(out.shape) != tuple(ref.shape):
        return Check(False, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}")
    a = out.detach().cpu().double()
    b = ref.detach().cpu().double()
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return Check(False, f"{name}: NaN pattern differs ({int(torch.isnan(a).sum())} vs {int(torch.isnan(b).sum())})")
    if not a.numel():
        return Check(True, f"{name} empty", err=0.0, tol=tol)
    diff = (a - b).abs().nan_to_num(0.0)
    err = diff.max().item()
    if rtol:
        bound = tol + rtol * b.abs().nan_to_num(0.0)
        worst = torch.where(diff == 0, 0.0, diff / bound).max().item()  # 0/0 where both are exactly 0
        return Check(worst <= 1.0, f"{name} max abs err {err:.1e}, {worst:.2f} of tol (rtol {rtol:.1e})",
                     err=worst, tol=1.0)
    return Check(err <= tol, f"{name} max abs err {err:.1e} (tol {tol:.1e})", err=err, tol=tol)


def compare_float_dict(out: dict, expected: dict, tols: dict[str, float | tuple[float, float]]) -> Check:
    """``compare_floats`` on every key of ``tols`` (a tol or (tol, rtol)); the detail names the
    failures, or the closest call."""
    checks = {k: compare_floats(k, out.get(k), expected[k], *(t if isinstance(t, tuple) else (t,)))
              for k, t in tols.items()}
    bad = [c.detail for c in checks.values() if not c.ok]
    if bad:
        return Check(False, "; ".join(bad))
    if not checks:
        return Check(True, "")
    worst = max(checks.values(), key=lambda c: c.err / c.tol if c.tol else 0.0)
    if len(checks) == 1:
        return worst
    return Check(True, f"{len(checks)} float outputs within tol (closest: {worst.detail})")


def gamma(n, u: float = U32):
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of an n-term sum or dot product
    in floating point, in any summation order, with or without FMA. n: an int or a tensor."""
    return n * u / (1 - n * u)


def distance_rounding_bound(r_norm: torch.Tensor, e_norm: torch.Tensor, dim: int) -> torch.Tensor:
    """Bound on the float32 rounding error of one squared distance |r - e|^2 of ``dim``-vectors:
    gamma_{dim+2} (|r| + |e|)^2. It covers the expanded form (|r|^2 - 2 r.e + |e|^2, with or without
    |r|^2, norms precomputed or not: three dot products and two additions) and the direct sum of
    (r_i - e_i)^2 (three roundings per term), in any order: every way our kernels and audiocraft compute it."""
    return gamma(dim + 2) * (r_norm + e_norm) ** 2


def residual_rounding_bound(abs_sum: torch.Tensor, layer) -> torch.Tensor:
    """Bound on the norm of a float32 residual's rounding error at RVQ ``layer`` (0 at layer 0: both
    sides read the same float32 x). Each earlier layer rounds at most three times (audiocraft's
    straight-through value r + (q - r), then r - q), each by u times at most ``abs_sum`` =
    |x| + sum_{j<layer} |e_j| (elementwise, (N, D) float64); layer: an int or (N,) -> (N,)."""
    return gamma(3 * layer) * abs_sum.norm(dim=1)


def near_tie_bound(d_a: torch.Tensor, d_b: torch.Tensor, r_norm: torch.Tensor, ea_norm: torch.Tensor,
                   eb_norm: torch.Tensor, eab: torch.Tensor, dim: int, rho=0.0, cb_err: float = 0.0) -> torch.Tensor:
    """How close two exact (float64) squared distances d_a = |r - e_a|^2, d_b = |r - e_b|^2 may be
    for two float32 computations to rank e_a and e_b differently (all float64 tensors, broadcast).

    Each side computes its distances with at most ``distance_rounding_bound`` of error, from an input
    within ``rho`` of r and codewords within ``cb_err`` of e_a, e_b (norms). Expanding
    |r + eta - e - delta|^2 gives: both roundings, + 2 rho |e_a - e_b| (the input moves both distances
    alike but for its projection on e_a - e_b), + 2 cb_err (|r - e_a| + |r - e_b|) + (rho + cb_err)^2.
    ``eab``: |e_a - e_b|.
    """
    rn = r_norm + rho
    bound = (distance_rounding_bound(rn, ea_norm + cb_err, dim) + distance_rounding_bound(rn, eb_norm + cb_err, dim)
             + 2 * rho * eab)
    if cb_err:
        bound = bound + 2 * cb_err * (d_a.clamp(min=0).sqrt() + d_b.clamp(min=0).sqrt()) + (rho + cb_err) ** 2
    return bound


def canonical_codes(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """codes (N, K) with each code replaced by the lowest index of an equal codeword (elementwise ==) of
    its layer: exact duplicates quantize to the same vector, so later layers see the same residual."""
    out = codes.clone()
    bins = codebooks.shape[1]
    for k in range(codes.shape[1]):
        _, group = torch.unique(codebooks[k], dim=0, return_inverse=True)
        first = torch.full((int(group.max()) + 1,), bins, dtype=torch.long)
        first.scatter_reduce_(0, group, torch.arange(bins), "amin")
        out[:, k] = first[group][codes[:, k]]
    return out


class CodesCheck(NamedTuple):
    ok: bool
    flips: int  # rows (b, t) whose codes differ anywhere
    detail: str


def check_codes_equivalent(codes: Any, expected: torch.Tensor, x: torch.Tensor,
                           codebooks: torch.Tensor) -> CodesCheck:
    """Codes must be equal except at exact duplicates and certified near-ties: the one rule behind
    ``compare_codes`` (the bench's check) and ``tests/utils.assert_codes_equivalent``.

    codes, expected: (B, K, T) integers; x: (B, D, T) the quantizer's float32 input; codebooks:
    (K', bins, D), K' >= K. Per row, codes are first mapped to the lowest index of an equal codeword
    of their layer (an exact duplicate gives the same quantized vector, so the later layers see the
    same residual and are still compared). At the first layer k where the mapped codes differ, both
    candidates' squared distances to the residual of the expected codes are computed in float64;
    they may differ by at most ``near_tie_bound``: the float32 rounding bound of the two distances
    (it grows with D) plus the residual's own rounding through k layers (0 at layer 0). Later layers
    of such a row are not compared (their residuals differ). Everything else fails, with an example.
    ``flips`` counts the rows whose codes differ anywhere.
    """
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex():
        return CodesCheck(False, 0, f"codes: expected an integer tensor, got {getattr(codes, 'dtype', type(codes))}")
    if tuple(codes.shape) != tuple(expected.shape):
        return CodesCheck(False, 0, f"codes shape {tuple(codes.shape)} != {tuple(expected.shape)}")
    B, K, T = expected.shape
    bins, D = codebooks.shape[1:]
    if codebooks.shape[0] < K or tuple(x.shape) != (B, D, T):
        return CodesCheck(False, 0, f"x {tuple(x.shape)} and codebooks {tuple(codebooks.shape)} do not fit "
                                    f"codes {(B, K, T)}")
    c = codes.detach().cpu().long().permute(0, 2, 1).reshape(B * T, K)
    e = expected.detach().cpu().long().permute(0, 2, 1).reshape(B * T, K)
    for name, t in (("codes", c), ("expected", e)):
        if bool(((t < 0) | (t >= bins)).any()):
            bad = sorted(set(t[(t < 0) | (t >= bins)].tolist()))[:5]
            return CodesCheck(False, 0, f"{name}: values outside [0, {bins}): {bad}")
    flips = int((c != e).any(1).sum())
    if flips == 0:
        return CodesCheck(True, 0, "codes equal")
    cb32 = codebooks.detach().cpu()[:K]
    diff = canonical_codes(c, cb32) != canonical_codes(e, cb32)
    rows = diff.any(1).nonzero().flatten()
    n_dup = flips - rows.numel()
    cb = cb32.double()
    x_rows = x.detach().cpu().double().permute(0, 2, 1).reshape(B * T, D)
    n_bad, example, worst = 0, "", 0.0
    for chunk in rows.split(1024) if rows.numel() else ():  # bounds the float64 gather to 1024 x D per layer
        cc, ee, n = c[chunk], e[chunk], chunk.numel()
        k = diff[chunk].int().argmax(1)  # the first layer where the sequences quantize differently
        r = x_rows[chunk].clone()
        abs_sum = r.abs()
        for j in range(K - 1):
            m = j < k
            if m.any():
                q = cb[j, ee[m, j]]
                r[m] -= q
                abs_sum[m] += q.abs()
        ar = torch.arange(n)
        ea, eb = cb[k, cc[ar, k]], cb[k, ee[ar, k]]
        d_a, d_b = ((r - ea) ** 2).sum(1), ((r - eb) ** 2).sum(1)
        rho = residual_rounding_bound(abs_sum, k.double())
        bound = near_tie_bound(d_a, d_b, r.norm(dim=1), ea.norm(dim=1), eb.norm(dim=1), (ea - eb).norm(dim=1), D, rho)
        gap = (d_a - d_b).abs()
        bad = gap > bound
        worst = max(worst, float((gap / bound.clamp(min=1e-300)).max()))
        if bad.any() and not example:
            i = int(bad.nonzero()[0])
            b_, t_ = divmod(int(chunk[i]), T)
            example = (f"e.g. row {int(chunk[i])} layer {int(k[i])} (batch {b_}, frame {t_}): code "
                       f"{int(cc[i, k[i]])} (float64 distance {d_a[i]:.9g}) vs expected {int(ee[i, k[i]])} "
                       f"({d_b[i]:.9g}), difference "
                       f"{(d_a[i] - d_b[i]).abs():.3e} > float32 bound {bound[i]:.3e}")
        n_bad += int(bad.sum())
    if n_bad:
        return CodesCheck(False, flips, f"codes: {n_bad} of {flips} differing rows are neither exact duplicates "
                                        f"nor near-ties ({example})")
    return CodesCheck(True, flips, f"codes equal except {flips} row(s): {n_dup} exact-duplicate codeword(s), "
                                   f"{rows.numel()} certified near-tie(s) (largest at {worst:.2f} of the bound)")


def compare_codes(codes: Any, expected: torch.Tensor, x: torch.Tensor, codebooks: torch.Tensor) -> Check:
    """``check_codes_equivalent`` as a ``Check`` (shapes there); ``flips``: rows that differ."""
    ok, flips, detail = check_codes_equivalent(codes, expected, x, codebooks)
    return Check(ok, detail, flips=flips)
