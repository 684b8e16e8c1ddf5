"""The certified near-tie rule must reject real differences and accept genuine ties."""
import pytest
import torch

from fastcodec.reference.functional import rvq_quantize
from tests.utils import assert_codes_equivalent


def test_near_tie_rule_rejects_a_wrong_code_and_accepts_a_tie():
    cb = torch.randn(2, 16, 8)
    x = torch.randn(1, 8, 5)
    _, codes = rvq_quantize(x, cb)
    assert assert_codes_equivalent(codes, codes, x, cb) == 0
    wrong = codes.clone()
    wrong[0, 1, 2] = (wrong[0, 1, 2] + 1) % 16  # a layer-1 code that is not a near-tie on random data
    with pytest.raises(AssertionError, match="not near-ties"):
        assert_codes_equivalent(wrong, codes, x, cb)
    with pytest.raises(AssertionError, match="first-layer"):
        bad0 = codes.clone()
        bad0[0, 0, 0] = (bad0[0, 0, 0] + 1) % 16
        assert_codes_equivalent(bad0, codes, x, cb)
    tie_cb = cb.clone()
    tie_cb[1, 3] = tie_cb[1, codes[0, 1, 2]]  # an exact duplicate codeword: a genuine tie
    _, tie_codes = rvq_quantize(x, tie_cb)
    flipped = tie_codes.clone()
    flipped[0, 1, 2] = 3 if int(tie_codes[0, 1, 2]) != 3 else int(codes[0, 1, 2])
    assert assert_codes_equivalent(flipped, tie_codes, x, tie_cb) == 1
