"""SEANet encoder/decoder of EnCodec, as audiocraft 1.3.0's ``audiocraft.modules.seanet``.

Same constructor arguments (and defaults), attributes and ``state_dict`` keys (``model.{i}.…``).
The encoder maps audio (B, channels, T) to latents (B, dimension, ceil(T / hop_length)); the decoder maps
latents (B, dimension, T') to audio (B, channels, T' * hop_length), with ``hop_length = prod(ratios)``.
encodec 0.1.1's modules are the same network with other defaults (``n_residual_layers=1``,
``norm='weight_norm'``, ``true_skip=False``, ``lstm=2``) and no ``disable_norm_outer_blocks``.
"""
from __future__ import annotations

import math
import typing as tp

import torch
from torch import nn

from .conv import StreamableConv1d, StreamableConvTranspose1d
from .lstm import StreamableLSTM


def _activation(name: str) -> tp.Type[nn.Module]:
    act = getattr(nn, name, None) if isinstance(name, str) else None
    if not (isinstance(act, type) and issubclass(act, nn.Module)):
        raise ValueError(f"activation must name a torch.nn module (e.g. 'ELU', 'LeakyReLU', 'Tanh'), got {name!r}")
    return act


def _check_input(module: nn.Module, x: torch.Tensor, channels: int, what: str) -> None:
    """Raise TypeError/ValueError unless ``x`` is a non-empty (batch, channels, time) tensor that
    matches the module's weights in dtype and device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} expects a torch.Tensor x, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{what} expects x of shape (batch, {channels}, time), got rank {x.dim()} "
                         f"shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{what} expects a floating-point x, got dtype {x.dtype}")
    weight = next(module.parameters())
    if x.dtype != weight.dtype:
        raise TypeError(f"{what}: x has dtype {x.dtype} but the weights are {weight.dtype}; "
                        f"cast one to the other (x.to({weight.dtype}) or module.to({x.dtype}))")
    if x.device != weight.device:
        raise ValueError(f"{what}: x is on {x.device} but the weights are on {weight.device}")
    if x.shape[1] != channels:
        raise ValueError(f"{what} expects {channels} channels (x of shape (batch, {channels}, time)), "
                         f"got {x.shape[1]} (shape {tuple(x.shape)})")
    if x.shape[0] == 0 or x.shape[2] == 0:
        raise ValueError(f"{what} got an empty batch or time axis: x of shape {tuple(x.shape)}")


def _check_outer_blocks(disable_norm_outer_blocks: int, n_blocks: int) -> None:
    if not 0 <= disable_norm_outer_blocks <= n_blocks:
        raise ValueError(f"disable_norm_outer_blocks must be in [0, {n_blocks}] (the number of blocks), "
                         f"got {disable_norm_outer_blocks}")


class SEANetResnetBlock(nn.Module):
    """Residual block: ``shortcut(x) + block(x)``, ``block`` = (activation, conv) per kernel size.

    The inner convs have ``dim // compress`` channels; ``shortcut`` is the identity when ``true_skip``,
    else a 1x1 conv. x: (B, dim, T) -> (B, dim, T).
    """

    def __init__(self, dim: int, kernel_sizes: tp.Sequence[int] = (3, 1), dilations: tp.Sequence[int] = (1, 1),
                 activation: str = "ELU", activation_params: tp.Optional[dict] = None, norm: str = "none",
                 norm_params: tp.Optional[tp.Dict[str, tp.Any]] = None, causal: bool = False,
                 pad_mode: str = "reflect", compress: int = 2, true_skip: bool = True):
        super().__init__()
        if len(kernel_sizes) != len(dilations):
            raise ValueError(f"got {len(kernel_sizes)} kernel sizes but {len(dilations)} dilations")
        if compress < 1 or dim // compress < 1:
            raise ValueError(f"compress must be in [1, dim={dim}], got {compress}")
        act = _activation(activation)
        activation_params = {"alpha": 1.0} if activation_params is None else activation_params
        hidden = dim // compress
        block: tp.List[nn.Module] = []
        for i, (kernel_size, dilation) in enumerate(zip(kernel_sizes, dilations)):
            in_chs = dim if i == 0 else hidden
            out_chs = dim if i == len(kernel_sizes) - 1 else hidden
            block += [
                act(**activation_params),
                StreamableConv1d(in_chs, out_chs, kernel_size=kernel_size, dilation=dilation, norm=norm,
                                 norm_kwargs=norm_params, causal=causal, pad_mode=pad_mode),
            ]
        self.block = nn.Sequential(*block)
        self.shortcut: nn.Module
        if true_skip:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = StreamableConv1d(dim, dim, kernel_size=1, norm=norm, norm_kwargs=norm_params,
                                             causal=causal, pad_mode=pad_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.block(x)


class SEANetEncoder(nn.Module):
    """SEANet encoder: conv, then per ratio (residual blocks, activation, strided conv doubling the
    width), optional LSTM, activation, conv to ``dimension``.

    ``ratios`` are given in decoder order and used reversed (``self.ratios``). ``disable_norm_outer_blocks``
    = N turns the norm off in the first N of the ``len(ratios) + 2`` blocks.
    x: (B, channels, T) -> (B, dimension, ceil(T / hop_length)).
    """

    def __init__(self, channels: int = 1, dimension: int = 128, n_filters: int = 32, n_residual_layers: int = 3,
                 ratios: tp.Sequence[int] = (8, 5, 4, 2), activation: str = "ELU",
                 activation_params: tp.Optional[dict] = None, norm: str = "none",
                 norm_params: tp.Optional[tp.Dict[str, tp.Any]] = None, kernel_size: int = 7,
                 last_kernel_size: int = 7, residual_kernel_size: int = 3, dilation_base: int = 2,
                 causal: bool = False, pad_mode: str = "reflect", true_skip: bool = True, compress: int = 2,
                 lstm: int = 0, disable_norm_outer_blocks: int = 0):
        super().__init__()
        self.channels = channels
        self.dimension = dimension
        self.n_filters = n_filters
        self.ratios = list(reversed(ratios))
        self.n_residual_layers = n_residual_layers
        self.hop_length = math.prod(self.ratios)
        self.n_blocks = len(self.ratios) + 2
        _check_outer_blocks(disable_norm_outer_blocks, self.n_blocks)
        self.disable_norm_outer_blocks = disable_norm_outer_blocks
        act = _activation(activation)
        activation_params = {"alpha": 1.0} if activation_params is None else activation_params

        mult = 1
        model: tp.List[nn.Module] = [
            StreamableConv1d(channels, mult * n_filters, kernel_size,
                             norm="none" if disable_norm_outer_blocks >= 1 else norm,
                             norm_kwargs=norm_params, causal=causal, pad_mode=pad_mode)
        ]
        for i, ratio in enumerate(self.ratios):
            block_norm = "none" if disable_norm_outer_blocks >= i + 2 else norm
            for j in range(n_residual_layers):
                model += [SEANetResnetBlock(mult * n_filters, kernel_sizes=[residual_kernel_size, 1],
                                            dilations=[dilation_base ** j, 1], norm=block_norm,
                                            norm_params=norm_params, activation=activation,
                                            activation_params=activation_params, causal=causal,
                                            pad_mode=pad_mode, compress=compress, true_skip=true_skip)]
            model += [
                act(**activation_params),
                StreamableConv1d(mult * n_filters, mult * n_filters * 2, kernel_size=ratio * 2, stride=ratio,
                                 norm=block_norm, norm_kwargs=norm_params, causal=causal, pad_mode=pad_mode),
            ]
            mult *= 2
        if lstm:
            model += [StreamableLSTM(mult * n_filters, num_layers=lstm)]
        model += [
            act(**activation_params),
            StreamableConv1d(mult * n_filters, dimension, last_kernel_size,
                             norm="none" if disable_norm_outer_blocks == self.n_blocks else norm,
                             norm_kwargs=norm_params, causal=causal, pad_mode=pad_mode),
        ]
        self.model = nn.Sequential(*model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, channels, T) -> (B, dimension, ceil(T / hop_length))."""
        _check_input(self, x, self.channels, "SEANetEncoder")
        return self.model(x)


class SEANetDecoder(nn.Module):
    """SEANet decoder: conv from ``dimension``, optional LSTM, per ratio (activation, transposed conv
    halving the width, residual blocks), activation, conv to ``channels``, optional final activation.

    ``disable_norm_outer_blocks`` = N turns the norm off in the last N of the ``len(ratios) + 2`` blocks.
    z: (B, dimension, T') -> (B, channels, T' * hop_length).
    """

    def __init__(self, channels: int = 1, dimension: int = 128, n_filters: int = 32, n_residual_layers: int = 3,
                 ratios: tp.Sequence[int] = (8, 5, 4, 2), activation: str = "ELU",
                 activation_params: tp.Optional[dict] = None, final_activation: tp.Optional[str] = None,
                 final_activation_params: tp.Optional[dict] = None, norm: str = "none",
                 norm_params: tp.Optional[tp.Dict[str, tp.Any]] = None, kernel_size: int = 7,
                 last_kernel_size: int = 7, residual_kernel_size: int = 3, dilation_base: int = 2,
                 causal: bool = False, pad_mode: str = "reflect", true_skip: bool = True, compress: int = 2,
                 lstm: int = 0, disable_norm_outer_blocks: int = 0, trim_right_ratio: float = 1.0):
        super().__init__()
        self.dimension = dimension
        self.channels = channels
        self.n_filters = n_filters
        self.ratios = list(ratios)
        self.n_residual_layers = n_residual_layers
        self.hop_length = math.prod(self.ratios)
        self.n_blocks = len(self.ratios) + 2
        _check_outer_blocks(disable_norm_outer_blocks, self.n_blocks)
        self.disable_norm_outer_blocks = disable_norm_outer_blocks
        act = _activation(activation)
        activation_params = {"alpha": 1.0} if activation_params is None else activation_params

        mult = 2 ** len(self.ratios)
        model: tp.List[nn.Module] = [
            StreamableConv1d(dimension, mult * n_filters, kernel_size,
                             norm="none" if disable_norm_outer_blocks == self.n_blocks else norm,
                             norm_kwargs=norm_params, causal=causal, pad_mode=pad_mode)
        ]
        if lstm:
            model += [StreamableLSTM(mult * n_filters, num_layers=lstm)]
        for i, ratio in enumerate(self.ratios):
            block_norm = "none" if disable_norm_outer_blocks >= self.n_blocks - (i + 1) else norm
            model += [
                act(**activation_params),
                StreamableConvTranspose1d(mult * n_filters, mult * n_filters // 2, kernel_size=ratio * 2,
                                          stride=ratio, norm=block_norm, norm_kwargs=norm_params,
                                          causal=causal, trim_right_ratio=trim_right_ratio),
            ]
            for j in range(n_residual_layers):
                model += [SEANetResnetBlock(mult * n_filters // 2, kernel_sizes=[residual_kernel_size, 1],
                                            dilations=[dilation_base ** j, 1], activation=activation,
                                            activation_params=activation_params, norm=block_norm,
                                            norm_params=norm_params, causal=causal, pad_mode=pad_mode,
                                            compress=compress, true_skip=true_skip)]
            mult //= 2
        model += [
            act(**activation_params),
            StreamableConv1d(n_filters, channels, last_kernel_size,
                             norm="none" if disable_norm_outer_blocks >= 1 else norm,
                             norm_kwargs=norm_params, causal=causal, pad_mode=pad_mode),
        ]
        if final_activation is not None:
            model += [_activation(final_activation)(**(final_activation_params or {}))]
        self.model = nn.Sequential(*model)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, dimension, T') -> (B, channels, T' * hop_length)."""
        _check_input(self, z, self.dimension, "SEANetDecoder")
        return self.model(z)
