"""fastcodec.balancer.Balancer against audiocraft 1.3.0's ``Balancer`` (``audiocraft/losses/balancer.py``).

How the comparison is made: audiocraft's own Balancer runs with ``fastcodec.bench.oracle_stubs``'
flashy stand-in (``averager``: flashy's bias-corrected EMA; ``distrib.average_metrics``: the identity
of a non-distributed run). encodec 0.1.1's wheel does not ship its ``balancer.py`` (the GitHub
repository does; its arithmetic is audiocraft's, with ``rescale_grads`` for ``balance_grads`` and no
return value), so audiocraft's is the oracle. Two copies of a small model get the same losses over
several steps (the EMA of the norms matters from the second step on); the parameter gradients, the
effective loss and the monitored ratios must agree to float64 rounding (1e-12 relative; both sides do
the same float64 operations in the same order, measured differences are 0).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from fastcodec.balancer import Balancer
from fastcodec.bench.oracle_stubs import import_audiocraft

from .utils import assert_close


def _losses(y, target):
    return {"l1": F.l1_loss(y, target), "l2": 10 * F.mse_loss(y, target), "ms": (y - target).abs().pow(3).mean(),
            "zero_weight": y.mean()}


@pytest.mark.parametrize("kw", [dict(), dict(per_batch_item=False, total_norm=2.0, ema_decay=0.9),
                                dict(balance_grads=False), dict(ema_decay=0.0, epsilon=1e-3)])
def test_balancer_matches_audiocraft(kw):
    oracle = import_audiocraft("audiocraft.losses.balancer", pytest.fail)
    weights = {"l1": 0.1, "l2": 1.0, "ms": 2.0, "zero_weight": 0.0}
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 6)).double()
    model2 = copy.deepcopy(model)
    ours = Balancer(weights, monitor=True, **kw)
    theirs = oracle.Balancer(weights, monitor=True, **kw)
    for step in range(3):
        x = torch.randn(4, 3, 6, dtype=torch.float64)
        target = torch.randn(4, 3, 6, dtype=torch.float64)
        model.zero_grad(), model2.zero_grad()
        y1, y2 = model(x), model2(x)
        e1 = ours.backward(_losses(y1, target), y1)
        e2 = theirs.backward(_losses(y2, target), y2)
        assert_close(e1, e2, atol=0, rtol=1e-12, name=f"step {step} effective loss")
        for (name, p1), p2 in zip(model.named_parameters(), model2.parameters()):
            assert_close(p1.grad, p2.grad, atol=1e-15, rtol=1e-12, name=f"step {step} grad {name}")
        assert ours.metrics.keys() == theirs.metrics.keys()
        for k in ours.metrics:
            assert ours.metrics[k] == pytest.approx(theirs.metrics[k], rel=1e-12)


def test_balanced_gradient_shares():
    """With ema_decay=0 (no history), each loss's share of the backpropagated gradient norm is its weight share."""
    y = torch.randn(2, 50, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 50, dtype=torch.float64)
    b = Balancer({"a": 1.0, "b": 3.0}, ema_decay=0.0, per_batch_item=False, total_norm=4.0, epsilon=0.0)
    la, lb = F.mse_loss(y, t), 1000 * F.l1_loss(y, t)
    ga = torch.autograd.grad(la, y, retain_graph=True)[0]
    gb = torch.autograd.grad(lb, y, retain_graph=True)[0]
    b.backward({"a": la, "b": lb}, y)
    expected = 4.0 * (0.25 * ga / ga.norm() + 0.75 * gb / gb.norm())
    assert_close(y.grad, expected, atol=1e-14, rtol=1e-12, name="balanced grad")
    assert Balancer({"a": 1.0}, rescale_grads=False).balance_grads is False


def test_other_loss_in_the_same_backward():
    """backward(..., other=penalty) gives the gradients of penalty.backward() then backward(losses)."""
    lin = torch.nn.Linear(5, 5).double()
    lin2 = copy.deepcopy(lin)
    x, t = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    b1, b2 = Balancer({"a": 1.0, "b": 2.0}), Balancer({"a": 1.0, "b": 2.0})
    y1, y2 = lin(x), lin2(x)
    b1.backward({"a": F.l1_loss(y1, t), "b": F.mse_loss(y1, t)}, y1, other=lin.weight.square().sum())
    lin2.weight.square().sum().backward()
    b2.backward({"a": F.l1_loss(y2, t), "b": F.mse_loss(y2, t)}, y2)
    for p1, p2 in zip(lin.parameters(), lin2.parameters()):
        assert_close(p1.grad, p2.grad, atol=1e-15, rtol=1e-12, name="grad")


def test_bad_input():
    y = torch.randn(2, 3, requires_grad=True)
    b = Balancer({"a": 1.0, "b": 1.0})
    with pytest.raises(KeyError, match="no weight"):
        b.backward({"c": y.sum()}, y)
    with pytest.raises(ValueError, match="requires grad"):
        b.backward({"a": y.sum()}, y.detach())
    b.backward({"a": y.sum(), "b": y.square().sum()}, y)
    with pytest.raises(KeyError, match="earlier backward"):
        b.backward({"a": y.sum()}, y)
    with pytest.raises(ValueError, match="weights"):
        Balancer({})
    with pytest.raises(ValueError, match="ema_decay"):
        Balancer({"a": 1.0}, ema_decay=1.5)
    with pytest.raises(ValueError, match="sum to 0"):
        Balancer({"a": 0.0}).backward({"a": y.sum()}, y)
