"""What every step of a SEANet plan shares: the streaming state slot, output buffers, the pointwise steps.

A step (``Step``) is one layer of a compiled plan. Offline: ``step(x)`` (``forward``), x: (B, C, T) -> (B, C', T').
Streaming: ``new_slots(slots, batch, hint, like)`` appends its state to a stream's slot list (``init_state``),
``push(x, slots)`` runs a chunk (``step``: the output it completes, or None) and ``flush(slots)`` the end of the
stream (the outputs the offline pass computes from its end padding). A step returns tensors it owns (never a
view of the state or of its input), so the caller may write into them.
"""
from __future__ import annotations

import typing as tp

import torch
import torch.nn.functional as F
from torch import nn

from .. import _cache
from ..precision import round_bf16


class NotStreamableError(ValueError):
    """The module cannot be streamed exactly; the message names the sub-module and the reason."""


class _Slot:
    """One step's state: tensors (batch first) and int counters, as attributes."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def copy(self, fn=lambda t: t.clone()) -> "_Slot":
        return _Slot(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in self.__dict__.items()})


_BF16 = _cache.TensorCache()


def bf16_of(w: torch.Tensor) -> torch.Tensor:
    """A weight rounded to bf16 (``precision.round_bf16``): per call when autograd needs it or inside
    ``torch.compile``, else once per change of ``w`` (the one cache rule)."""
    if (torch.is_grad_enabled() and w.requires_grad) or torch.compiler.is_compiling():
        return round_bf16(w)

    def make():
        with torch.no_grad(), torch.inference_mode(False):
            return round_bf16(w.detach())

    return _BF16.get((w,), make, ("bf16",))


def bf16_operand(x: torch.Tensor, act: nn.Module | None, alpha: float | None) -> torch.Tensor:
    """precision="bf16": a conv's input as it multiplies: through its activation (a module, or the ELU of
    ``alpha`` the float32 kernels fuse) and rounded to bf16. Padding copies or adds zeros, so the padded input is
    rounded too."""
    if act is not None:
        x = act(x)
    elif alpha is not None:
        x = F.elu(x, alpha)
    return round_bf16(x)


def _tm(t: torch.Tensor) -> torch.Tensor:
    """Swap the last two axes of a 3-d state tensor (its own inverse): batch-axis ops on ``_tm(t)`` keep a
    time-major buffer time-major."""
    return t.transpose(1, 2) if t.dim() == 3 else t


class _Slots(list):
    """``StreamState.slots``: the steps' ``_Slot`` list, plus what is not state: ``kernels`` (True when this
    chunk may run the streaming kernels, ``fastcodec::conv1d_update`` and friends; set per call), ``fused_lstm``
    (likewise the C++ LSTM step) and ``outs`` (per step: its reusable output buffer). Copies of a state start
    with fresh ones."""

    def __init__(self, slots=()):
        super().__init__(slots)
        self.kernels = None
        self.fused_lstm = False
        self.outs: dict[int, tuple] = {}


def _out_view(slots: _Slots, idx: int, like: torch.Tensor, channels: int, frames: int) -> torch.Tensor:
    """Step ``idx``'s output (batch, channels, frames), time-major in a buffer reused across chunks (grown when a
    chunk needs more frames; the same view while the frame count repeats)."""
    entry = slots.outs.get(idx)
    if entry is not None and entry[0] == frames:
        return entry[1]
    if entry is None or entry[2].shape[1] < frames:
        store = torch.empty(like.shape[0], frames, channels, dtype=like.dtype, device=like.device)
    else:
        store = entry[2]
    view = store[:, :frames].transpose(1, 2)
    slots.outs[idx] = (frames, view, store)
    return view


def _time_major(like: torch.Tensor, batch: int, channels: int, length: int) -> torch.Tensor:
    """Zeros (batch, channels, length) stored time-major: a window of frames is one contiguous run for batch 1."""
    return like.new_zeros(batch, length, channels).transpose(1, 2)


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return torch.cat([a, b], dim=-1)


def _pointwise_into(module: nn.Module) -> tp.Callable[[torch.Tensor, torch.Tensor], None]:
    """``fn(x, out)`` writing ``module(x)`` into ``out`` (an ELU or LeakyReLU writes there directly)."""
    if type(module) is nn.ELU:
        alpha = float(module.alpha)
        return lambda x, out: torch._C._nn.elu(x, alpha, 1.0, 1.0, out=out)
    if type(module) is nn.LeakyReLU:
        slope = float(module.negative_slope)
        return lambda x, out: torch._C._nn.leaky_relu(x, slope, out=out)
    return lambda x, out: out.copy_(module(x))


def _pointwise(module: nn.Module) -> tp.Callable[[torch.Tensor], torch.Tensor]:
    if type(module) is nn.ELU:
        alpha = float(module.alpha)
        return lambda x: F.elu(x, alpha)
    return module


# Modules that act on each sample alone (the activations SEANet builds from its `activation` name).
POINTWISE = (nn.ELU, nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.Mish,
             nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.CELU, nn.SELU,
             nn.Tanhshrink, nn.Identity)


class Step:
    """One layer of a plan (see the module docstring). ``stream_check(path)`` raises ``NotStreamableError``
    where the layer cannot be streamed exactly; ``describe()`` is its part of a stream state's signature."""

    idx = -1
    in_channels = 0
    out_channels = 0
    path = ""
    bf16 = False  # precision="bf16": the GEMM operands rounded to bf16 (fastcodec/precision.py)

    def set_bf16(self, on: bool) -> None:
        """Switch this step between float32 and bf16 operands (``fastcodec.steps.set_precision``)."""
        self.bf16 = bool(on)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stream_check(self) -> None:
        """Raise ``NotStreamableError`` naming the layer when it cannot be streamed exactly."""

    def new_slots(self, slots: list, batch: int, hint: int, like: torch.Tensor) -> int:
        """Append this step's slot(s); return the output length hint for an input chunk of ``hint``."""
        raise NotImplementedError

    def push(self, x: torch.Tensor, slots) -> torch.Tensor | None:
        raise NotImplementedError

    def flush(self, slots) -> torch.Tensor | None:
        return None

    def describe(self) -> str:
        raise NotImplementedError


class PointwiseStep(Step):
    """An activation not fused into a conv (before an LSTM or a residual block, or the last layer)."""

    def __init__(self, module: nn.Module, channels: int, path: str = ""):
        self.module = module
        self.fn = _pointwise(module)
        self.name = type(module).__name__
        self.in_channels = self.out_channels = channels
        self.path = path

    def forward(self, x):
        return self.module(x)

    def new_slots(self, slots, batch, hint, like):
        return hint

    def push(self, x, slots):
        return self.fn(x)

    def describe(self):
        return self.name


class ModuleStep(Step):
    """A module the plan does not know: run as it is offline; not streamable."""

    def __init__(self, module: nn.Module, channels: int, path: str = ""):
        self.module = module
        self.in_channels = self.out_channels = channels
        self.path = path

    def forward(self, x):
        return self.module(x)

    def stream_check(self):
        raise NotStreamableError(f"{self.path or 'module'}: {type(self.module).__name__} is not a module the streaming "
                                 f"planner knows (register_step_builder teaches it)")


def push_chain(steps, x, slots):
    for step in steps:
        x = step.push(x, slots)
        if x is None:
            return None
    return x


def flush_chain(steps, slots):
    carry = None
    for step in steps:
        y = None if carry is None else step.push(carry, slots)
        carry = _cat(y, step.flush(slots))
    return carry
