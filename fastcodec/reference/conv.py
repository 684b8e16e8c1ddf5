"""Conv wrappers of SEANet: weight_norm / time_group_norm, causal or centred padding, reflect on short inputs.

Same classes, constructor arguments, attributes and ``state_dict`` keys as audiocraft 1.3.0's
``audiocraft.modules.conv`` (``model.0.conv.conv.weight_g`` / ``weight_v`` / ``bias`` for weight_norm,
``model.0.conv.norm.weight`` / ``bias`` for time_group_norm); the streaming machinery is left out.
All tensors are ``(batch, channels, time)``.
"""
from __future__ import annotations

import math
import typing as tp
import warnings

import torch
from torch import nn
from torch.nn import functional as F

CONV_NORMALIZATIONS = frozenset(["none", "weight_norm", "time_group_norm"])
PAD_MODES = frozenset(["constant", "reflect", "replicate", "circular"])

# Keys written by torch.nn.utils.parametrizations.weight_norm (recent Hugging Face checkpoints).
_PARAMETRIZATION_KEYS = (("weight_g", "parametrizations.weight.original0"),
                         ("weight_v", "parametrizations.weight.original1"))


class _WeightNorm:
    """Weight normalisation over all dims but 0: ``weight = weight_g * weight_v / ||weight_v||``.

    Mixed into a conv class in front of it. Parameters ``weight_g`` (``weight.shape[0]``, 1, 1) and
    ``weight_v`` (``weight.shape``) replace ``weight`` in that order, as the old
    ``torch.nn.utils.weight_norm`` did, so keys and initial values are audiocraft's; ``weight`` is
    recomputed on every access (the conv's own forward reads it). Loading also accepts the
    parametrization layout (``parametrizations.weight.original0`` = g, ``original1`` = v).
    """

    def _init_weight_norm(self) -> None:
        weight = self._parameters.pop("weight").detach()
        self.weight_g = nn.Parameter(torch.norm_except_dim(weight, 2, 0))
        self.weight_v = nn.Parameter(weight)

    def __getattr__(self, name: str):
        if name == "weight":
            params = self.__dict__.get("_parameters", {})
            if "weight_v" in params:
                # The ATen op the old weight_norm hook calls: a composite v * (g / v.norm()) differs by
                # up to 1 ulp (4.5e-8 measured on a (1024, 128, 3) weight), this is bitwise audiocraft's.
                return torch._weight_norm(params["weight_v"], params["weight_g"], 0)
        return super().__getattr__(name)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for ours, theirs in _PARAMETRIZATION_KEYS:
            if prefix + theirs in state_dict and prefix + ours not in state_dict:
                state_dict[prefix + ours] = state_dict.pop(prefix + theirs)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class WeightNormConv1d(_WeightNorm, nn.Conv1d):
    """``nn.Conv1d`` with weight normalisation (``weight_g``: (out, 1, 1), ``weight_v``: (out, in/groups, k))."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_weight_norm()


class WeightNormConvTranspose1d(_WeightNorm, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` with weight normalisation over dim 0, the input channels
    (``weight_g``: (in, 1, 1), ``weight_v``: (in, out/groups, k)), as ``weight_norm(module)`` does."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_weight_norm()


def _check_norm(norm: str) -> None:
    if norm not in CONV_NORMALIZATIONS:
        raise ValueError(f"norm must be one of {sorted(CONV_NORMALIZATIONS)}, got {norm!r}")


def get_norm_module(module: nn.Module, causal: bool = False, norm: str = "none", **norm_kwargs) -> nn.Module:
    """The normalisation applied after the conv: ``GroupNorm(1, out_channels)`` for time_group_norm
    (not causal: it normalises over the whole time axis), ``Identity`` otherwise."""
    _check_norm(norm)
    if norm == "time_group_norm":
        if causal:
            raise ValueError("GroupNorm doesn't support causal evaluation: norm='time_group_norm' needs causal=False")
        return nn.GroupNorm(1, module.out_channels, **norm_kwargs)
    return nn.Identity()


def get_extra_padding_for_conv1d(x: torch.Tensor, kernel_size: int, stride: int, padding_total: int = 0) -> int:
    """Right padding that makes the last window of a strided conv full, so a transposed conv can
    rebuild ``ceil(length / stride) * stride`` samples. ``x``: (..., time)."""
    length = x.shape[-1]
    n_frames = (length - kernel_size + padding_total) / stride + 1
    ideal_length = (math.ceil(n_frames) - 1) * stride + (kernel_size - padding_total)
    return ideal_length - length


def pad_for_conv1d(x: torch.Tensor, kernel_size: int, stride: int, padding_total: int = 0) -> torch.Tensor:
    """Zero-pad ``x`` (..., time) on the right by ``get_extra_padding_for_conv1d``."""
    return F.pad(x, (0, get_extra_padding_for_conv1d(x, kernel_size, stride, padding_total)))


def pad1d(x: torch.Tensor, paddings: tp.Tuple[int, int], mode: str = "constant", value: float = 0.0) -> torch.Tensor:
    """``F.pad`` on the time axis of ``x`` (..., time) that also reflects inputs shorter than the pad.

    Reflect needs ``length > pad``: shorter inputs are first zero-padded on the right to
    ``max(paddings) + 1`` samples, reflected, and those zeros cut off again (audiocraft's rule, so the
    reflection of a short input includes zeros).
    """
    padding_left, padding_right = paddings
    if padding_left < 0 or padding_right < 0:
        raise ValueError(f"paddings must be non-negative, got {paddings}")
    if mode != "reflect":
        return F.pad(x, paddings, mode, value)
    length = x.shape[-1]
    max_pad = max(padding_left, padding_right)
    extra_pad = 0
    if length <= max_pad:
        extra_pad = max_pad - length + 1
        x = F.pad(x, (0, extra_pad))
    padded = F.pad(x, paddings, mode, value)
    return padded[..., : padded.shape[-1] - extra_pad]


def unpad1d(x: torch.Tensor, paddings: tp.Tuple[int, int]) -> torch.Tensor:
    """Remove ``paddings`` (left, right) from the time axis of ``x`` (..., time)."""
    padding_left, padding_right = paddings
    if padding_left < 0 or padding_right < 0:
        raise ValueError(f"paddings must be non-negative, got {paddings}")
    if padding_left + padding_right > x.shape[-1]:
        raise ValueError(f"cannot remove paddings {paddings} from a time axis of length {x.shape[-1]}")
    return x[..., padding_left: x.shape[-1] - padding_right]


class NormConv1d(nn.Module):
    """``Conv1d`` (attribute ``conv``) followed by its normalisation (attribute ``norm``).

    Positional/keyword arguments other than ``causal``, ``norm``, ``norm_kwargs`` go to ``nn.Conv1d``.
    x: (B, in_channels, T) -> (B, out_channels, T_out).
    """

    def __init__(self, *args, causal: bool = False, norm: str = "none",
                 norm_kwargs: tp.Optional[tp.Dict[str, tp.Any]] = None, **kwargs):
        super().__init__()
        _check_norm(norm)
        self.conv = (WeightNormConv1d if norm == "weight_norm" else nn.Conv1d)(*args, **kwargs)
        self.norm = get_norm_module(self.conv, causal, norm, **(norm_kwargs or {}))
        self.norm_type = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class NormConvTranspose1d(nn.Module):
    """``ConvTranspose1d`` (attribute ``convtr``) followed by its normalisation (attribute ``norm``).

    x: (B, in_channels, T) -> (B, out_channels, T_out).
    """

    def __init__(self, *args, causal: bool = False, norm: str = "none",
                 norm_kwargs: tp.Optional[tp.Dict[str, tp.Any]] = None, **kwargs):
        super().__init__()
        _check_norm(norm)
        self.convtr = (WeightNormConvTranspose1d if norm == "weight_norm" else nn.ConvTranspose1d)(*args, **kwargs)
        self.norm = get_norm_module(self.convtr, causal, norm, **(norm_kwargs or {}))
        self.norm_type = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.convtr(x))


class StreamableConv1d(nn.Module):
    """Conv1d padded so that the output has ``ceil(T / stride)`` frames.

    The total padding ``(kernel_size - 1) * dilation + 1 - stride`` goes on the left when ``causal``,
    otherwise is split with the larger half on the left; extra right padding fills the last window.
    x: (B, in_channels, T) -> (B, out_channels, ceil(T / stride)).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True, causal: bool = False,
                 norm: str = "none", norm_kwargs: tp.Optional[tp.Dict[str, tp.Any]] = None,
                 pad_mode: str = "reflect"):
        super().__init__()
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {sorted(PAD_MODES)}, got {pad_mode!r}")
        if stride > 1 and dilation > 1:
            warnings.warn("StreamableConv1d has been initialized with stride > 1 and dilation > 1"
                          f" (kernel_size={kernel_size} stride={stride}, dilation={dilation}).")
        self.conv = NormConv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation,
                               groups=groups, bias=bias, causal=causal, norm=norm, norm_kwargs=norm_kwargs)
        self.causal = causal
        self.pad_mode = pad_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv.conv
        stride = conv.stride[0]
        kernel_size = (conv.kernel_size[0] - 1) * conv.dilation[0] + 1
        padding_total = kernel_size - stride
        extra_padding = get_extra_padding_for_conv1d(x, kernel_size, stride, padding_total)
        if self.causal:
            x = pad1d(x, (padding_total, extra_padding), mode=self.pad_mode)
        else:
            padding_right = padding_total // 2
            padding_left = padding_total - padding_right
            x = pad1d(x, (padding_left, padding_right + extra_padding), mode=self.pad_mode)
        return self.conv(x)


class StreamableConvTranspose1d(nn.Module):
    """ConvTranspose1d that trims its ``kernel_size - stride`` padding from the output.

    Causal: ``ceil(padding * trim_right_ratio)`` on the right, the rest on the left; otherwise the larger
    half on the left. x: (B, in_channels, T) -> (B, out_channels, T * stride).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 causal: bool = False, norm: str = "none", trim_right_ratio: float = 1.0,
                 norm_kwargs: tp.Optional[tp.Dict[str, tp.Any]] = None):
        super().__init__()
        if not causal and trim_right_ratio != 1.0:
            raise ValueError(f"trim_right_ratio != 1.0 only makes sense for causal convolutions, "
                             f"got {trim_right_ratio}")
        if not 0.0 <= trim_right_ratio <= 1.0:
            raise ValueError(f"trim_right_ratio must be in [0, 1], got {trim_right_ratio}")
        self.convtr = NormConvTranspose1d(in_channels, out_channels, kernel_size, stride,
                                          causal=causal, norm=norm, norm_kwargs=norm_kwargs)
        self.causal = causal
        self.trim_right_ratio = trim_right_ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        convtr = self.convtr.convtr
        padding_total = convtr.kernel_size[0] - convtr.stride[0]
        y = self.convtr(x)
        if self.causal:
            padding_right = math.ceil(padding_total * self.trim_right_ratio)
        else:
            padding_right = padding_total // 2
        return unpad1d(y, (padding_total - padding_right, padding_right))
