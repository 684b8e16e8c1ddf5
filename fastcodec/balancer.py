"""EnCodec's loss balancer (audiocraft 1.3.0's ``audiocraft/losses/balancer.py``, encodec's ``balancer.py``).

Given the model output ``y`` and losses ``l_i(y)``, the balancer backpropagates

    G = sum_i total_norm * w_i / sum(w) * g_i / avg(||g_i||)        g_i = d l_i / d y

into the model, with ``avg`` an exponential moving average (bias-corrected, flashy's ``averager``) of
the gradient norms (per batch item, then averaged, when ``per_batch_item``). So a weight is the share
of the gradient a loss gets, whatever its scale. ``balance_grads=False`` backpropagates
``sum_i w_i g_i`` instead. In a torch.distributed run the averaged norms are averaged over workers, as
flashy's ``distrib.average_metrics`` does. Same arguments and numbers as audiocraft's ``Balancer``;
``rescale_grads`` is accepted as encodec's name for ``balance_grads``.
"""
from __future__ import annotations

import typing as tp
from collections import defaultdict

import torch
from torch import autograd

__all__ = ["Balancer", "averager"]


def averager(beta: float = 1):
    """Bias-corrected exponential moving average of dicts of numbers (flashy's ``averager``):
    ``update(metrics, weight=1) -> {key: average}`` over every key seen so far."""
    fix: tp.Dict[str, float] = defaultdict(float)
    total: tp.Dict[str, float] = defaultdict(float)

    def _update(metrics: tp.Dict[str, tp.Any], weight: float = 1) -> tp.Dict[str, float]:
        for key, value in metrics.items():
            total[key] = total[key] * beta + weight * float(value)
            fix[key] = fix[key] * beta + weight
        return {key: tot / fix[key] for key, tot in total.items()}

    return _update


def _average_metrics(metrics: tp.Dict[str, float], count: float = 1.) -> tp.Dict[str, float]:
    """flashy's ``distrib.average_metrics``: the count-weighted average over torch.distributed workers."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return metrics
    keys, values = zip(*metrics.items())
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(list(values) + [1], device=device, dtype=torch.float32)
    tensor *= count
    dist.all_reduce(tensor)
    averaged = (tensor[:-1] / tensor[-1]).cpu().tolist()
    return dict(zip(keys, averaged))


class Balancer:
    """Loss balancer. ``backward(losses, input)`` backpropagates the balanced gradient of ``losses``
    (a dict whose keys are in ``weights``) through ``input`` (the model output every loss depends on)
    and returns the effective loss ``sum_i scale_i * loss_i`` (detached). ``metrics`` holds
    ``ratio_<name>`` (each loss's share of the summed gradient norms) when ``monitor``.
    """

    def __init__(self, weights: tp.Dict[str, float], balance_grads: bool = True, total_norm: float = 1.,
                 ema_decay: float = 0.999, per_batch_item: bool = True, epsilon: float = 1e-12,
                 monitor: bool = False, rescale_grads: tp.Optional[bool] = None):
        if not isinstance(weights, dict) or not weights:
            raise ValueError(f"weights must be a non-empty dict of loss name -> weight, got {weights!r}")
        for k, w in weights.items():
            if not isinstance(w, (int, float)) or w < 0:
                raise ValueError(f"weights[{k!r}] must be a number >= 0, got {w!r}")
        if ema_decay is not None and not 0 <= ema_decay <= 1:
            raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay}")
        self.weights = weights
        self.per_batch_item = per_batch_item
        self.total_norm = total_norm or 1.
        self.averager = averager(ema_decay or 1.)
        self.epsilon = epsilon
        self.monitor = monitor
        self.balance_grads = balance_grads if rescale_grads is None else rescale_grads
        self._metrics: tp.Dict[str, tp.Any] = {}

    @property
    def metrics(self):
        return self._metrics

    def backward(self, losses: tp.Dict[str, torch.Tensor], input: torch.Tensor,
                 other: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
        """``other``: a scalar loss outside the balance (EnCodec's commitment penalty), backpropagated in
        the same backward pass as the balanced gradient. audiocraft backpropagates it just before, on
        its own; the gradients are the same, and one pass is what DistributedDataParallel allows."""
        if not losses:
            raise ValueError("losses is empty")
        unknown = [k for k in losses if k not in self.weights]
        if unknown:
            raise KeyError(f"losses {unknown} have no weight; the balancer's weights are {sorted(self.weights)}")
        if not isinstance(input, torch.Tensor) or not input.requires_grad:
            raise ValueError("input must be a tensor that requires grad (the model output the losses depend on)")
        norms = {}
        grads = {}
        for name, loss in losses.items():
            grad, = autograd.grad(loss, [input], retain_graph=True)
            if self.per_batch_item:
                norm = grad.norm(dim=tuple(range(1, grad.dim())), p=2).mean()
            else:
                norm = grad.norm(p=2)
            norms[name] = norm
            grads[name] = grad

        missing = [k for k in self.averager({}) if k not in losses]
        if missing:  # audiocraft fails with a bare KeyError here
            raise KeyError(f"losses {missing} were given to an earlier backward() but not to this one; "
                           "the balancer needs the same losses at every call")
        count = len(input) if self.per_batch_item else 1
        avg_norms = _average_metrics(self.averager(norms), count)
        total = sum(avg_norms.values())
        self._metrics = {}
        if self.monitor:
            for k, v in avg_norms.items():
                self._metrics[f"ratio_{k}"] = v / total
        total_weights = sum([self.weights[k] for k in avg_norms])
        if not total_weights > 0:
            raise ValueError(f"the weights of the losses seen so far ({sorted(avg_norms)}) sum to 0")
        desired_ratios = {k: w / total_weights for k, w in self.weights.items()}

        out_grad = torch.zeros_like(input)
        effective_loss = torch.tensor(0., device=input.device, dtype=input.dtype)
        for name, avg_norm in avg_norms.items():
            if self.balance_grads:
                scale = desired_ratios[name] * self.total_norm / (self.epsilon + avg_norm)
            else:
                scale = self.weights[name]
            out_grad.add_(grads[name], alpha=scale)
            effective_loss += scale * losses[name].detach()
        if other is None:
            input.backward(out_grad)
        else:
            if not isinstance(other, torch.Tensor) or other.numel() != 1:
                raise ValueError("other must be a scalar tensor (a loss outside the balance)")
            if other.requires_grad:
                torch.autograd.backward([input, other], [out_grad, torch.ones_like(other)])
            else:
                input.backward(out_grad)
        return effective_loss
