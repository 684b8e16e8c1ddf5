"""Shared test helpers: a verbose assert_close, the certified near-tie code comparison and its
no-near-tie certificate, markers."""
from __future__ import annotations

import pytest
import torch

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


# ---------------------------------------------------------------------------------------------
# codes: equal except exact duplicates and certified near-ties
# ---------------------------------------------------------------------------------------------

U32 = 2.0 ** -24  # float32 unit roundoff


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


def _canonical(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
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


def check_codes_equivalent(codes: torch.Tensor, expected: torch.Tensor, x: torch.Tensor,
                           codebooks: torch.Tensor) -> tuple[bool, int, str]:
    """The rule of ``assert_codes_equivalent``; returns (ok, flips, detail) instead of raising."""
    if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex():
        return False, 0, f"codes: expected an integer tensor, got {getattr(codes, 'dtype', type(codes))}"
    if tuple(codes.shape) != tuple(expected.shape):
        return False, 0, f"codes shape {tuple(codes.shape)} != {tuple(expected.shape)}"
    B, K, T = expected.shape
    bins, D = codebooks.shape[1:]
    if codebooks.shape[0] < K or tuple(x.shape) != (B, D, T):
        return False, 0, f"x {tuple(x.shape)} and codebooks {tuple(codebooks.shape)} do not fit codes {(B, K, T)}"
    c = codes.detach().cpu().long().permute(0, 2, 1).reshape(B * T, K)
    e = expected.detach().cpu().long().permute(0, 2, 1).reshape(B * T, K)
    for name, t in (("codes", c), ("expected", e)):
        if bool(((t < 0) | (t >= bins)).any()):
            return False, 0, f"{name}: values outside [0, {bins}): {sorted(set(t[(t < 0) | (t >= bins)].tolist()))[:5]}"
    flips = int((c != e).any(1).sum())
    if flips == 0:
        return True, 0, "codes equal"
    cb32 = codebooks.detach().cpu()[:K]
    diff = _canonical(c, cb32) != _canonical(e, cb32)
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
            example = (f"e.g. batch {b_} frame {t_} layer {int(k[i])}: code {int(cc[i, k[i]])} (float64 distance "
                       f"{d_a[i]:.9g}) vs expected {int(ee[i, k[i]])} ({d_b[i]:.9g}), difference "
                       f"{(d_a[i] - d_b[i]).abs():.3e} > float32 bound {bound[i]:.3e}")
        n_bad += int(bad.sum())
    if n_bad:
        return False, flips, f"codes: {n_bad} of {flips} differing rows are neither exact duplicates nor near-ties ({example})"
    return True, flips, (f"codes equal except {flips} row(s): {n_dup} exact-duplicate codeword(s), "
                         f"{rows.numel()} certified near-tie(s) (largest at {worst:.2f} of the bound)")


def assert_codes_equivalent(codes: torch.Tensor, expected: torch.Tensor, x: torch.Tensor,
                            codebooks: torch.Tensor, first_layer_exact: bool | None = None) -> int:
    """Codes must be equal except at exact duplicates and certified near-ties; returns the number of
    rows (b, t) whose codes differ anywhere (the flips).

    codes, expected: (B, K, T); x: (B, D, T) the quantizer's float32 input; codebooks: (K', bins, D),
    K' >= K. Per row, codes are first mapped to the lowest index of an equal codeword of
    their layer (an exact duplicate gives the same quantized vector, so the later layers see the same
    residual and are still compared). At the first layer k where the mapped codes differ, both
    candidates' squared distances to the residual of the expected codes are computed in float64; they
    may differ by at most ``near_tie_bound``: the float32 rounding bound of the two distances plus
    the residual's own rounding through k layers (0 at layer 0). Later layers of such a row are not
    compared (their residuals differ). Everything else fails, with an example.

    ``first_layer_exact`` is accepted for older callers and ignored: layer 0 has no residual term in
    the bound, so the rule itself demands equality there wherever the data has no certified near-tie,
    while a blanket "layer 0 equal" only holds until a CPU rounds one near-tie the other way.
    """
    ok, flips, detail = check_codes_equivalent(codes, expected, x, codebooks)
    assert ok, detail
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
    canon = _canonical(torch.arange(bins)[:, None], codebook.detach().cpu()[None])[:, 0]  # lowest identical index
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
