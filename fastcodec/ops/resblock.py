"""``fastcodec::resblock``: SEANet's residual block fused into one op for CPU inference (csrc ``resblock`` in
conv1d_cpu.cpp), ``shortcut(x) + conv1(act1(conv0(act0(pad(x)))))``; conv1 and the shortcut are k=1 convs."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import _backend, _pool
from .conv import (_PAD_CODE, _check_int, _check_tensor, _cpu_ext, _describe, _packed_weight, check_conv1d_args,
                   conv1d_output_length, conv1d_reference)



def check_resblock_args(x, w0, b0, w1, b1, wsc, bsc, dilation, pad_left, pad_right, pad_mode, alpha0, alpha1,
                        tile) -> None:
    """The block's convs: conv0 (k0, dilation, padded) then the k=1 conv1 and the optional k=1 shortcut."""
    check_conv1d_args(x, w0, b0, None, 1, dilation, pad_left, pad_right, pad_mode, alpha0)
    t0 = conv1d_output_length(x.shape[2], w0.shape[2], 1, dilation, pad_left, pad_right)
    if t0 != x.shape[2]:
        raise ValueError(f"resblock: conv0's padding ({pad_left}, {pad_right}) must keep the length {x.shape[2]}, "
                         f"got {t0}")
    for name, w, b, c_in in (("w1", w1, b1, w0.shape[0]), ("wsc", wsc, bsc, x.shape[1])):
        if w is None:
            continue
        _check_tensor(name, w)
        if w.dim() != 3 or w.shape[1] != c_in or w.shape[2] != 1:
            raise ValueError(f"{name} must be a kernel-size-1 conv weight (C_out, {c_in}, 1), got {_describe(w)}")
        if b is not None:
            _check_tensor("b1" if name == "w1" else "bsc", b)
            if tuple(b.shape) != (w.shape[0],):
                raise ValueError(f"{'b1' if name == 'w1' else 'bsc'} must be ({w.shape[0]},), got {_describe(b)}")
        if w.device != x.device or (b is not None and b.device != x.device):
            raise ValueError(f"resblock tensors are on several devices ({name} on {w.device}, x on {x.device})")
    skip_c = x.shape[1] if wsc is None else wsc.shape[0]
    if skip_c != w1.shape[0]:
        raise ValueError(f"resblock: the shortcut gives {skip_c} channels but conv1 {w1.shape[0]}")
    if alpha1 is not None and (isinstance(alpha1, bool) or not isinstance(alpha1, (int, float))):
        raise TypeError(f"alpha1 must be a float or None, got {type(alpha1).__name__}")
    _check_int("tile", tile, 0)


def resblock_reference(x, w0, b0, w1, b1, wsc=None, bsc=None, dilation=1, pad_left=0, pad_right=0,
                       pad_mode="constant", alpha0=None, alpha1=None, tile=0):
    """Plain PyTorch: three ``conv1d_reference`` calls, the add in the last one."""
    h = conv1d_reference(x, w0, b0, None, 1, dilation, pad_left, pad_right, pad_mode, alpha0)
    skip = x if wsc is None else conv1d_reference(x, wsc, bsc)
    return conv1d_reference(h, w1, b1, skip, 1, 1, 0, 0, "constant", alpha1)


def _resblock_cpp(x, w0, b0, w1, b1, wsc, bsc, dilation, pad_left, pad_right, pad_mode, alpha0, alpha1, tile):
    """One parallel region over (batch, time tile) items (csrc resblock), each thread running conv0 (with the
    halo and padding), the shortcut and conv1 (+ the add) of its tile in buffers that stay in its L2: at 32-64
    channels the k=1 convs run layer by layer are bound by memory traffic. Each output sample is the same sum
    in the same order as the three ``conv1d`` calls: bitwise equal."""
    out = _pool.empty((x.shape[0], w1.shape[0], x.shape[-1]), x)
    _cpu_ext().resblock(x, _packed_weight(w0), b0, _packed_weight(w1), b1,
                        None if wsc is None else _packed_weight(wsc), bsc, out, w0.shape[0], w0.shape[2], dilation,
                        pad_left, pad_right, _PAD_CODE[pad_mode], alpha0, alpha1, tile)
    return out


IMPLS_RES: dict[str, Callable] = {"reference": resblock_reference, "cpp": _resblock_cpp, "cuda": resblock_reference}


@torch.library.custom_op("fastcodec::resblock", mutates_args=())
def resblock_op(x: torch.Tensor, w0: torch.Tensor, b0: Optional[torch.Tensor], w1: torch.Tensor,
                b1: Optional[torch.Tensor], wsc: Optional[torch.Tensor], bsc: Optional[torch.Tensor], dilation: int,
                pad_left: int, pad_right: int, pad_mode: str, alpha0: Optional[float], alpha1: Optional[float],
                tile: int) -> torch.Tensor:
    """SEANet's residual block, inference: ``conv1d(act1(conv1d(act0(x), w0, pad)), w1) + shortcut(x)``.

    x: (B, C, T); w0: (C_h, C, K) with a padding that keeps T; w1: (C_out, C_h, 1); wsc: (C_out, C, 1) or None
    (identity shortcut, C_out = C); ``tile``: frames per time tile of the cpp kernel (0: chosen from the channel
    count) -> (B, C_out, T). No autograd: training runs the three ``fastcodec::conv1d`` calls."""
    check_resblock_args(x, w0, b0, w1, b1, wsc, bsc, dilation, pad_left, pad_right, pad_mode, alpha0, alpha1, tile)
    return IMPLS_RES[_backend.choose("conv", x.device)](x, w0, b0, w1, b1, wsc, bsc, dilation, pad_left, pad_right,
                                                        pad_mode, alpha0, alpha1, tile)


@resblock_op.register_fake
def _(x, w0, b0, w1, b1, wsc, bsc, dilation, pad_left, pad_right, pad_mode, alpha0, alpha1, tile):
    check_resblock_args(x, w0, b0, w1, b1, wsc, bsc, dilation, pad_left, pad_right, pad_mode, alpha0, alpha1, tile)
    return x.new_empty((x.shape[0], w1.shape[0], x.shape[2]))


def resblock(x, w0, b0, w1, b1, wsc, bsc, dilation, pad_left, pad_right, pad_mode, alpha0, alpha1, tile=0, *,
             backend: str | None = None):
    """``fastcodec::resblock``. Eager callers that already chose the conv ``backend`` (the SEANet step, per block
    and call) run its implementation directly, without the dispatcher's per-call cost."""
    if backend is None or torch.compiler.is_compiling():
        return resblock_op(x, w0, b0, w1, b1, wsc, bsc, dilation, pad_left, pad_right, pad_mode, alpha0, alpha1, tile)
    return IMPLS_RES[backend](x, w0, b0, w1, b1, wsc, bsc, dilation, pad_left, pad_right, pad_mode, alpha0, alpha1,
                              tile)
