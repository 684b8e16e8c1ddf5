"""Shapes, paddings and argument checks of the conv ops (``fastcodec.ops.conv``, ``fastcodec.ops.resblock``):
audiocraft's padding and trim rules, output lengths, the gradient of the padding, and the checks that raise a
clear TypeError/ValueError before any kernel runs. No kernels and no op registrations here; every name is also
importable from ``fastcodec.ops.conv``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._checks import MAX_GEOMETRY

PAD_MODES = ("constant", "reflect", "replicate")
_PAD_CODE = {"constant": 0, "reflect": 1, "replicate": 2}  # FC_PAD_* in csrc/conv1d_params.h


def conv1d_output_length(length: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                         pad_left: int = 0, pad_right: int = 0) -> int:
    """Frames produced from ``length`` samples (``T_out`` in the module docstring)."""
    return (pad_left + length + pad_right - ((kernel_size - 1) * dilation + 1)) // stride + 1


def streamable_padding(length: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                       causal: bool = False) -> tuple[int, int]:
    """audiocraft's ``StreamableConv1d`` paddings ``(left, right)`` for an input of ``length`` samples.

    Total ``(kernel_size - 1) * dilation + 1 - stride``, all left when causal, else the larger half left;
    plus the extra right padding that makes the last window full (``get_extra_padding_for_conv1d``),
    so the output has ``ceil(length / stride)`` frames.
    """
    span = (kernel_size - 1) * dilation + 1
    total = span - stride
    if total < 0:
        raise ValueError(f"kernel span {span} is shorter than the stride {stride}: audiocraft's padding would be negative")
    n_frames = (length - span + total) / stride + 1
    extra = (math.ceil(n_frames) - 1) * stride + (span - total) - length
    right = 0 if causal else total // 2
    return total - right, right + extra


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")


def _check_int(name: str, v, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")
    if v > MAX_GEOMETRY:  # work buffers are sized by these integers: bound them before any kernel runs
        raise ValueError(f"{name} must be <= {MAX_GEOMETRY} (fastcodec's geometry limit), got {v}")


def _check_x_weight(x, weight, in_axis: int, layout: str) -> None:
    """x: (B, C_in, T) non-empty; weight: non-empty ``layout`` with C_in on ``in_axis`` (groups=1)."""
    _check_tensor("x", x)
    _check_tensor("weight", weight)
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, channels, time), got {_describe(x)}")
    if x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"x is empty: {_describe(x)} (batch, channels and time must be >= 1)")
    if weight.dim() != 3 or 0 in weight.shape:
        raise ValueError(f"weight must be a non-empty {layout}, got {_describe(weight)}")
    if weight.shape[in_axis] != x.shape[1]:
        raise ValueError(f"x has {x.shape[1]} channels but weight expects {weight.shape[in_axis]} (groups=1)")


def _check_elu_alpha(elu_alpha) -> None:
    if elu_alpha is not None:
        if isinstance(elu_alpha, bool) or not isinstance(elu_alpha, (int, float)):
            raise TypeError(f"elu_alpha must be a float or None, got {type(elu_alpha).__name__}")
        if not math.isfinite(elu_alpha):
            raise ValueError(f"elu_alpha must be finite, got {elu_alpha}")


def _devices_named(**tensors) -> str:
    return ", ".join(f"{k} on {v.device}" for k, v in tensors.items() if v is not None)


def check_conv1d_args(x, weight, bias, skip, stride, dilation, pad_left, pad_right, pad_mode, elu_alpha) -> None:
    """Raise TypeError/ValueError naming the problem; shapes only, so it also runs on fake tensors."""
    _check_x_weight(x, weight, in_axis=1, layout="(out_channels, in_channels, kernel_size)")
    for name, v, low in (("stride", stride, 1), ("dilation", dilation, 1), ("pad_left", pad_left, 0),
                         ("pad_right", pad_right, 0)):
        _check_int(name, v, low)
    if not isinstance(pad_mode, str) or pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    _check_elu_alpha(elu_alpha)
    c_out, _, k = weight.shape
    span = (k - 1) * dilation + 1
    if span > MAX_GEOMETRY:
        raise ValueError(f"kernel span (kernel_size - 1) * dilation + 1 = {span} exceeds fastcodec's geometry "
                         f"limit {MAX_GEOMETRY} (kernel_size {k}, dilation {dilation})")
    padded = pad_left + x.shape[2] + pad_right
    if span > padded:
        raise ValueError(
            f"kernel span (kernel_size - 1) * dilation + 1 = {span} is longer than the padded input "
            f"({pad_left} + {x.shape[2]} + {pad_right} = {padded} samples)"
        )
    devices = {x.device, weight.device}
    if bias is not None:
        _check_tensor("bias", bias)
        if tuple(bias.shape) != (c_out,):
            raise ValueError(f"bias must be ({c_out},), got {_describe(bias)}")
        devices.add(bias.device)
    if skip is not None:
        _check_tensor("skip", skip)
        want = (x.shape[0], c_out, (padded - span) // stride + 1)
        if tuple(skip.shape) != want:
            raise ValueError(f"skip must have the output's shape {want}, got {_describe(skip)}")
        devices.add(skip.device)
    if len(devices) != 1:
        raise ValueError(f"conv1d tensors are on several devices: {sorted(map(str, devices))} "
                         f"({_devices_named(x=x, weight=weight, bias=bias, skip=skip)})")


def _effective_stride(length: int, kernel_size: int, stride: int, dilation: int, pad_left: int, pad_right: int) -> int:
    """A stride past the last window start gives one frame, as does ``padded - span + 1``: pass that instead, so
    the kernel's per-phase tables are sized by the input, not by a huge stride."""
    return min(stride, pad_left + length + pad_right - (kernel_size - 1) * dilation)


def _pad1d_backward(grad: torch.Tensor, length: int, pad_left: int, pad_right: int, pad_mode: str) -> torch.Tensor:
    """Gradient of ``pad1d(x, (pad_left, pad_right), pad_mode)`` wrt x (..., length) given grad of its output."""
    if pad_mode == "constant":
        return grad[..., pad_left:pad_left + length]
    if pad_mode == "replicate":
        shape = grad.new_empty(grad.shape[:-1] + (length,))
        return torch.ops.aten.replication_pad1d_backward(grad, shape, [pad_left, pad_right])
    extra = max(0, max(pad_left, pad_right) - length + 1)  # audiocraft's zero-extension of short inputs
    if extra:
        grad = F.pad(grad, (0, extra))
    shape = grad.new_empty(grad.shape[:-1] + (length + extra,))
    g = torch.ops.aten.reflection_pad1d_backward(grad, shape, [pad_left, pad_right])
    return g[..., :length]


def streamable_trim(kernel_size: int, stride: int, causal: bool = False, trim_right_ratio: float = 1.0) -> tuple[int, int]:
    """audiocraft's ``StreamableConvTranspose1d`` trims ``(left, right)`` of the ``kernel_size - stride`` padding."""
    total = kernel_size - stride
    if total < 0:
        raise ValueError(f"kernel_size {kernel_size} is shorter than the stride {stride}: nothing to trim")
    right = math.ceil(total * trim_right_ratio) if causal else total // 2
    return total - right, right


def conv_transpose1d_output_length(length: int, kernel_size: int, stride: int = 1, trim_left: int = 0,
                                   trim_right: int = 0) -> int:
    return (length - 1) * stride + kernel_size - trim_left - trim_right


def check_conv_transpose1d_args(x, weight, bias, stride, trim_left, trim_right, elu_alpha) -> None:
    """Raise TypeError/ValueError naming the problem; shapes only, so it also runs on fake tensors."""
    _check_x_weight(x, weight, in_axis=0, layout="(in_channels, out_channels, kernel_size)")
    for name, v, low in (("stride", stride, 1), ("trim_left", trim_left, 0), ("trim_right", trim_right, 0)):
        _check_int(name, v, low)
    _check_elu_alpha(elu_alpha)
    full = (x.shape[2] - 1) * stride + weight.shape[2]
    if trim_left + trim_right >= full:
        raise ValueError(f"trims ({trim_left}, {trim_right}) leave nothing of the {full} output samples")
    devices = {x.device, weight.device}
    if bias is not None:
        _check_tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[1],):
            raise ValueError(f"bias must be ({weight.shape[1]},), got {_describe(bias)}")
        devices.add(bias.device)
    if len(devices) != 1:
        raise ValueError(f"conv_transpose1d tensors are on several devices: {sorted(map(str, devices))} "
                         f"({_devices_named(x=x, weight=weight, bias=bias)})")
