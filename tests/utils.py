"""Shared test helpers: a verbose assert_close, the certified near-tie code comparison (a wrapper of
the bench's rule) and its no-near-tie certificate, markers."""
from __future__ import annotations

import pytest
import torch

# the near-tie rule and its float32 bounds live in the bench harness (one implementation); re-exported here
from fastcodec.bench.harness import (U32, canonical_codes, check_codes_equivalent,  # noqa: F401
                                     distance_rounding_bound, gamma, near_tie_bound, residual_rounding_bound)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Default tolerances per dtype; tests that know their error budget pass atol/rtol with the reason.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-12, 1e-12),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float16: (1e-3, 1e-3),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float | None = None,
                 rtol: float | None = None, name: str = "tensor") -> None:
    """allclose with a diagnostic: shapes, NaN/Inf mismatches, max abs/rel error and first bad indices."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    da, dr = TOLERANCES.get(expected.dtype, (1e-5, 1e-5))
    atol = da if atol is None else atol
    rtol = dr if rtol is None else rtol
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), f"{name}: NaN pattern differs ({int(nan_a.sum())} vs {int(nan_e.sum())})"
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    assert torch.equal(inf_a, inf_e) and torch.equal(a[inf_a], e[inf_e]), f"{name}: Inf pattern differs"
    fin = ~(nan_a | inf_a)
    err = (a - e).abs().masked_fill(~fin, 0)
    bad = err > atol + rtol * e.abs().masked_fill(~fin, 0)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements differ; max abs err {err.max().item():.3e} "
            f"(atol {atol:.1e}, rtol {rtol:.1e}); first bad indices {idx}: "
            f"actual {[a[tuple(i)].item() for i in idx]}, expected {[e[tuple(i)].item() for i in idx]}"
        )


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def assert_codes_equivalent(codes: torch.Tensor, expected: torch.Tensor, x: torch.Tensor,
                            codebooks: torch.Tensor, first_layer_exact: bool | None = None) -> int:
    """Codes must be equal except at exact duplicates and certified near-ties (the rule and its shapes:
    ``fastcodec.bench.harness.check_codes_equivalent``, shared with ``fastcodec bench``); returns the
    number of rows (b, t) whose codes differ anywhere (the flips), or raises with the rule's diagnostic.

    ``first_layer_exact`` is accepted for older callers and ignored: layer 0 has no residual term in
    the bound, so the rule itself demands equality there wherever the data has no certified near-tie,
    while a blanket "layer 0 equal" only holds until a CPU rounds one near-tie the other way.
    """
    ok, flips, detail = check_codes_equivalent(codes, expected, x, codebooks)
    if not ok:
        raise AssertionError(detail)
    return flips


def assert_no_near_ties(r: torch.Tensor, codebook: torch.Tensor, rho=0.0, cb_err: float = 0.0,
                        name: str = "") -> float:
    """Certify that no float32 computation can pick another codeword than the exact nearest one.

    r: (N, D) a layer's input as one implementation computed it; codebook: (bins, D) its codewords;
    rho: (N,) or float, how far another implementation's input may be from r; cb_err: how far its
    codewords may be from these (norm). Every row's float64 nearest codeword must beat every other
    codeword by more than ``near_tie_bound``. Then every implementation within those bounds makes the
    same choice, so codes and the buffers they feed can be compared exactly or to rounding.

    Exact duplicates of the nearest codeword tie; they are allowed only when it is the zero vector
    (audiocraft's k-means init makes those from rows quantized by a bitwise copy of themselves): every
    product with it is an exact zero, so every arithmetic computes the same distance for each copy and
    takes the lowest index. Nonzero duplicates fail: a GEMM may round identical columns differently.
    Returns the smallest margin / bound (> 1).
    """
    r64, cb = r.detach().cpu().double(), codebook.detach().cpu().double()
    N, D = r64.shape
    bins = cb.shape[0]
    rn, en = r64.norm(dim=1), cb.norm(dim=1)
    d = (rn[:, None] ** 2 - 2 * r64 @ cb.t() + en[None] ** 2).clamp(min=0)  # (N, bins); float64 error ~1e-16
    canon = canonical_codes(torch.arange(bins)[:, None], codebook.detach().cpu()[None])[:, 0]  # lowest identical index
    a = canon[d.argmin(1)]
    ea = cb[a]
    eab = torch.cdist(ea, cb, compute_mode="donot_use_mm_for_euclid_dist")  # (N, bins): |e_a - e_b|
    rho_t = torch.as_tensor(rho, dtype=torch.float64)
    rho_t = rho_t[:, None] if rho_t.dim() else rho_t
    d_a = d.gather(1, a[:, None])
    bound = near_tie_bound(d_a, d, rn[:, None], en[a][:, None], en[None], eab, D, rho_t, cb_err)
    ratio = (d - d_a) / bound.clamp(min=1e-300)
    dup = canon[None] == a[:, None]  # (N, bins): the nearest codeword and its exact copies
    itself = torch.arange(bins)[None] == a[:, None]
    ratio = torch.where(dup, 0.0, ratio)
    ratio = torch.where(itself | (dup & (en[a] == 0)[:, None]), float("inf"), ratio)
    worst = float(ratio.min())
    if worst <= 1:
        i, b = divmod(int(ratio.argmin()), bins)
        raise AssertionError(
            f"{name}: the data has a near-tie: row {i} is {d[i, a[i]]:.9g} from codeword {int(a[i])} and "
            f"{d[i, b]:.9g} from codeword {b}, within the float32 bound {bound[i, b]:.3e}"
            + (" (exact duplicates)" if bool(dup[i, b]) else "")
            + "; exact comparisons need data that cannot tie")
    return worst


def lloyd_mean_error(samples: torch.Tensor, assign: torch.Tensor, bins: int, rho: float = 0.0) -> float:
    """How far one float32 implementation's Lloyd means may be from the exact means of the same
    clusters: gamma_{n+1} |sum_i |s_i|| / n (a sum of the cluster's n rows in any order, then the
    division) plus rho, how far its rows may be from these. samples: (N, D); assign: (N,) in
    [0, bins). The max over nonempty clusters (an empty cluster keeps its mean)."""
    s64 = samples.detach().cpu().double()
    a = assign.detach().cpu()
    n = torch.bincount(a, minlength=bins).double()
    sums = torch.zeros(bins, s64.shape[1], dtype=torch.float64).index_add_(0, a, s64.abs()).norm(dim=1)
    err = gamma(n + 1) * sums / n.clamp(min=1) + rho
    return float(err[n > 0].max())


def assert_lloyd_has_no_near_ties(samples: torch.Tensor, means: torch.Tensor, num_iters: int,
                                  name: str = "k-means") -> float:
    """``assert_no_near_ties`` on each assignment of ``num_iters`` Lloyd steps of the reference from
    ``means`` over ``samples`` (N, D): from the second step on, another implementation's means may
    differ from the reference's by twice ``lloyd_mean_error``. Then every implementation assigns
    every row alike, and counts and means compare exactly / to rounding. Returns the smallest margin."""
    from fastcodec.reference.functional import lloyd

    cb_err, worst = 0.0, float("inf")
    for it in range(num_iters):
        worst = min(worst, assert_no_near_ties(samples, means, cb_err=cb_err, name=f"{name} step {it}"))
        assign = torch.cdist(samples.detach().cpu().double(), means.detach().cpu().double()).argmin(1)
        empty = bool((torch.bincount(assign, minlength=means.shape[0]) == 0).any())
        cb_err = max(cb_err if empty else 0.0, 2 * lloyd_mean_error(samples, assign, means.shape[0]))
        means, _ = lloyd(samples, means, 1)
    return worst
