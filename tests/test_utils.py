"""The certified near-tie rule (``fastcodec.bench.harness.check_codes_equivalent``, asserted by
tests/utils.py and checked by ``fastcodec bench``) must reject real differences, accept exact duplicates
and near-ties within the float32 bound, and its bound must hold for every way the distance is computed."""
import pytest
import torch

from fastcodec.bench import harness as bh
from fastcodec.reference.functional import rvq_quantize
from tests.utils import (assert_codes_equivalent, assert_no_near_ties, check_codes_equivalent,
                         distance_rounding_bound)


def _problem(K=3, bins=16, D=8, T=5):
    cb = torch.randn(K, bins, D)
    x = torch.randn(1, D, T)
    _, codes = rvq_quantize(x, cb)
    return x, cb, codes


def _residual(x, cb, codes, t, k):
    """float64 residual of frame t at layer k along ``codes``."""
    r = x[0, :, t].double()
    for j in range(k):
        r = r - cb[j, codes[0, j, t]].double()
    return r


def test_equal_codes_have_no_flips():
    x, cb, codes = _problem()
    assert assert_codes_equivalent(codes, codes.clone(), x, cb) == 0


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_a_wrong_code_is_rejected(layer):
    x, cb, codes = _problem()
    wrong = codes.clone()
    wrong[0, layer, 2] = (wrong[0, layer, 2] + 1) % 16  # random codewords: distances differ by O(1)
    with pytest.raises(AssertionError, match="neither exact duplicates nor near-ties"):
        assert_codes_equivalent(wrong, codes, x, cb)
    with pytest.raises(AssertionError, match="neither exact duplicates nor near-ties"):
        assert_codes_equivalent(codes, wrong, x, cb)  # either side may be the wrong one


def test_the_assertion_and_the_bench_check_are_one_rule():
    x, cb, codes = _problem()
    wrong = codes.clone()
    wrong[0, 1, 2] = (wrong[0, 1, 2] + 1) % 16
    check = bh.compare_codes(wrong, codes, x, cb)
    assert not check.ok and check.flips == 1
    with pytest.raises(AssertionError) as info:
        assert_codes_equivalent(wrong, codes, x, cb)
    assert str(info.value) == check.detail


@pytest.mark.parametrize("layer", [0, 1])
def test_an_exact_duplicate_is_accepted_and_later_layers_still_compared(layer):
    x, cb, codes = _problem()
    c = int(codes[0, layer, 2])
    dup = (c + 5) % 16
    cb[layer, dup] = cb[layer, c]  # the quantizer never picks dup (ties go to the lowest index) unless dup < c
    _, codes = rvq_quantize(x, cb)
    first = min(c, dup)
    assert int(codes[0, layer, 2]) == first
    flipped = codes.clone()
    flipped[0, layer, 2] = max(c, dup)  # same vector: every later residual is bitwise the same
    assert assert_codes_equivalent(flipped, codes, x, cb) == 1
    assert assert_codes_equivalent(codes, flipped, x, cb) == 1
    # after the duplicate the residuals agree, so a wrong code in a later layer is still caught
    flipped[0, 2, 2] = (flipped[0, 2, 2] + 1) % 16
    with pytest.raises(AssertionError, match="1 of 1 differing rows"):
        assert_codes_equivalent(flipped, codes, x, cb)


@pytest.mark.parametrize("layer", [0, 2])
def test_the_bound_separates_near_ties_from_differences(layer):
    # a second codeword moved radially away from the chosen one by t: its distance grows by ~2 t |r - e|;
    # a quarter of the bound is a certified near-tie, three times the bound is a real difference
    x, cb, codes = _problem()
    t_, D = 3, cb.shape[2]
    c = int(codes[0, layer, t_])
    r = _residual(x, cb, codes, t_, layer)
    e = cb[layer, c].double()
    bound = 2 * distance_rounding_bound(r.norm(), e.norm(), D)  # the residual term is smaller: layer 0 has none
    other = (c + 1) % 16
    flipped = codes.clone()
    flipped[0, layer, t_] = other
    for factor, accepted in ((0.25, True), (3.0, False)):
        step = factor * bound / (2 * (r - e).norm())
        cb2 = cb.clone()
        cb2[layer, other] = (e + step * (e - r) / (e - r).norm()).float()
        ok, flips, detail = check_codes_equivalent(flipped, codes, x, cb2)
        assert ok == accepted, detail
        if accepted:
            assert flips == 1 and "1 certified near-tie" in detail


def test_bad_codes_are_rejected():
    x, cb, codes = _problem()
    for bad, match in ((codes + 16, "outside"), (codes - 17, "outside"), (codes.float(), "integer"),
                       (codes[:, :2], "shape")):
        ok, _, detail = check_codes_equivalent(bad, codes, x, cb)
        assert not ok and match in detail, detail


def test_no_near_tie_certificate():
    x, cb, _ = _problem(K=1, bins=32, D=16, T=40)
    r = x[0].t()
    assert assert_no_near_ties(r, cb[0], name="random") > 1
    dup = cb[0].clone()
    nearest = torch.cdist(r.double(), dup.double()).argmin(1)
    dup[(int(nearest[0]) + 1) % 32] = dup[nearest[0]]
    with pytest.raises(AssertionError, match="exact duplicates"):
        assert_no_near_ties(r, dup, name="duplicate")
    with pytest.raises(AssertionError, match="near-tie"):  # a wide enough allowance makes everything a tie
        assert_no_near_ties(r, cb[0], cb_err=10.0, name="loose")
    # copies of the zero codeword tie exactly in every arithmetic (every product is an exact zero) and
    # every implementation takes the lowest index: allowed, for rows that are zero and rows that are not
    zeros = cb[0].clone()
    zeros[[3, 9, 20]] = 0.0
    rz = torch.cat([r, torch.zeros(5, 16), 0.01 * r[:5]])
    assert assert_no_near_ties(rz, zeros, name="zero copies") > 1


@pytest.mark.parametrize("D", [8, 128, 512])
def test_distance_rounding_bound_holds_for_every_formula(D):
    # squared distances of large, offset vectors (the worst case for the expanded formula) computed in
    # float32 the ways audiocraft and our kernels do: the error never exceeds the bound
    r = torch.randn(200, D) * 3 + 5
    e = torch.randn(300, D) + 5
    exact = torch.cdist(r.double(), e.double()) ** 2
    ways = {
        "audiocraft": r.pow(2).sum(1, keepdim=True) - 2 * r @ e.t() + e.pow(2).sum(1)[None],
        "no |r|^2": (e.pow(2).sum(1)[None] - 2 * r @ e.t()) + r.pow(2).sum(1, keepdim=True),
        "direct": ((r[:, None] - e[None]) ** 2).sum(-1),
        "direct, sequential": ((r[:, None] - e[None]) ** 2).cumsum(-1)[..., -1],
    }
    bound = distance_rounding_bound(r.double().norm(dim=1)[:, None], e.double().norm(dim=1)[None], D)
    for name, d in ways.items():
        ratio = ((d.double() - exact).abs() / bound).max().item()
        assert ratio <= 1, f"{name}: error {ratio:.2f} of the bound"
