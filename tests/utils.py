"""Shared test helpers: a verbose assert_close, the certified near-tie code comparison, markers."""
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


def assert_codes_equivalent(codes: torch.Tensor, expected: torch.Tensor, x: torch.Tensor,
                            codebooks: torch.Tensor, rel_bound: float = 1e-5,
                            first_layer_exact: bool = True) -> int:
    """Codes must be equal except at certified near-ties; returns the number of (row) flips.

    codes, expected: (B, K, T); x: (B, D, T) the input; codebooks: (K, bins, D). The rule (one
    implementation, shared with ``fastcodec bench``: ``fastcodec.bench.harness.compare_codes``): at the
    first layer where a row's code sequences differ, both candidates' squared distances to the shared
    residual are computed in float64 and may differ by at most ``rel_bound * (|r|^2 + |e|^2)``, the
    float32 rounding bound of the expanded distance. ``first_layer_exact`` demands layer 0 equal
    everywhere (random data has no near-ties there).
    """
    from fastcodec.bench.harness import compare_codes

    assert codes.shape == expected.shape, f"codes shape {tuple(codes.shape)} != {tuple(expected.shape)}"
    if first_layer_exact:
        n0 = int((codes[:, 0].cpu() != expected[:, 0].cpu()).sum())
        assert n0 == 0, f"{n0} first-layer codes differ: the first layer must match exactly"
    check = compare_codes(codes, expected, x, codebooks, rel_bound)
    assert check.ok, check.detail
    return check.flips
