"""A SEANet compiled once into one plan of typed steps, run offline and streamed.

    plan = compile_plan(model)          # model: a SEANet's ``model`` Sequential (or any module of its structure)
    y = plan_forward(plan, x)           # offline: each step's forward
    stream: fastcodec.streaming walks the same steps' new_slots / push / flush with an explicit state

Step types (one class each, offline ``forward`` and streaming ``new_slots`` / ``push`` / ``flush`` side by side,
both calling ``fastcodec::`` ops; padding, trim, weight folding and the LSTM checks are each written once):

- ``ConvStep`` (steps/conv.py): ``[activation ->] StreamableConv1d [-> norm] [+ skip]``;
- ``ConvTrStep`` (steps/convtr.py): ``[activation ->] StreamableConvTranspose1d [-> norm] -> trim``;
- ``ResStep`` (steps/residual.py): ``SEANetResnetBlock``, a list of steps plus a shortcut;
- ``LSTMStep`` (steps/lstm.py): ``StreamableLSTM``;
- ``PointwiseStep`` / ``ModuleStep`` (steps/base.py): an activation not fused into a conv; a module the plan does
  not know (offline only).

A new layer type is one ``Step`` subclass here plus a line in ``build`` (or ``register_step_builder`` from
outside). Streaming refuses what it cannot stream exactly (``stream_check``, ``NotStreamableError``).
"""
from __future__ import annotations

import typing as tp

from torch import nn

from ..precision import check_precision
from ..reference.conv import StreamableConv1d, StreamableConvTranspose1d
from ..reference.lstm import StreamableLSTM
from ..reference.seanet import SEANetResnetBlock
from .base import POINTWISE, ModuleStep, NotStreamableError, PointwiseStep, Step  # noqa: F401
from .conv import ConvStep, ConvWeight, conv1d_step, conv_transpose1d_step, linear_step  # noqa: F401
from .convtr import ConvTrStep
from .lstm import LSTMStep
from .residual import ResStep

_STEP_BUILDERS: dict[type, tp.Callable] = {}


def register_step_builder(cls: type, builder: tp.Callable) -> None:
    """Teach the planner a module class: ``builder(module, path, act) -> list of steps`` (``act`` is the
    pointwise module right before it in a Sequential, or None). Looked up along the class's MRO, before the
    reference classes, so fast modules can bring their own steps."""
    _STEP_BUILDERS[cls] = builder


def _channels_of(steps: list[Step], default: int) -> int:
    return steps[-1].out_channels if steps else default


def build(module: nn.Module, path: str, act: nn.Module | None, channels: int) -> list[Step]:
    """The steps of ``module`` (``act``: the activation before it, fused into a conv; ``channels``: its input's)."""
    for cls in type(module).__mro__:
        if cls in _STEP_BUILDERS:
            return list(_STEP_BUILDERS[cls](module, path, act))
    pre = [] if act is None else [PointwiseStep(act, channels, path)]
    if isinstance(module, StreamableConv1d):
        return [ConvStep(module, act, path)]
    if isinstance(module, StreamableConvTranspose1d):
        return [ConvTrStep(module, act, path)]
    if isinstance(module, StreamableLSTM):
        return pre + [LSTMStep(module, path)]
    if isinstance(module, SEANetResnetBlock):
        block = build_sequence(module.block, f"{path}.block", channels)
        shortcut = [] if isinstance(module.shortcut, nn.Identity) else \
            build(module.shortcut, f"{path}.shortcut", None, channels)
        return pre + [ResStep(block, shortcut, channels, path)]
    if isinstance(module, nn.Sequential):
        return pre + build_sequence(module, path, channels)
    if isinstance(getattr(module, "model", None), nn.Sequential):  # SEANetEncoder / SEANetDecoder
        return pre + build_sequence(module.model, f"{path}.model" if path else "model", channels)
    if isinstance(module, POINTWISE):
        return pre + ([] if isinstance(module, nn.Identity) else [PointwiseStep(module, channels, path)])
    return pre + [ModuleStep(module, channels, path)]


def build_sequence(seq: nn.Sequential, path: str, channels: int) -> list[Step]:
    steps: list[Step] = []
    act = None
    for name, child in seq.named_children():
        if isinstance(child, POINTWISE) and not isinstance(child, nn.Identity) and not any(
                cls in _STEP_BUILDERS for cls in type(child).__mro__):
            if act is not None:
                steps.append(PointwiseStep(act, channels, path))
            act = child
            continue
        new = build(child, f"{path}.{name}", act, channels)
        act = None
        channels = _channels_of(new, channels)
        steps += new
    if act is not None:
        steps.append(PointwiseStep(act, channels, path))
    return steps


def compile_plan(model: nn.Sequential, precision: str = "float32") -> list[Step]:
    """The steps of a SEANet ``model`` Sequential (activations fused into the next conv), computing at
    ``precision`` (``fastcodec.precision``)."""
    plan = build_sequence(model, "model", 0)
    set_precision(plan, precision)
    return plan


def set_precision(steps: list[Step], precision: str) -> None:
    """Switch a plan's conv, transposed-conv and LSTM steps to ``precision`` ("float32" or "bf16")."""
    on = check_precision(precision) == "bf16"
    for s in steps:
        s.set_bf16(on)


def stream_check(steps: list[Step]) -> None:
    """Raise ``NotStreamableError`` at the first step that cannot be streamed exactly."""
    for s in steps:
        s.stream_check()
