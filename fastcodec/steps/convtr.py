"""The transposed-conv step of a SEANet plan: ``[activation ->] StreamableConvTranspose1d [-> norm] -> trim``.

Offline: one ``fastcodec::conv_transpose1d`` call (ELU and trim inside). Streamed (causal only): a frame adds
``kernel`` samples, ``stride`` of which are complete; the slot keeps the other ``kernel - stride`` as ``pending``
(B, C_out, kernel - stride, no bias), ``skip`` output samples still to drop for the left trim and ``total`` input
frames seen. At flush the pending overlap is dropped exactly as the offline causal trim drops it
(``trim_right_ratio``); the rest of the trim is kept. A chunk is one ``fastcodec::conv_transpose1d_update`` where
the kernels run, else one GEMM overlap-added with stride (``conv_transpose1d_step``).
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops import conv as conv_ops
from ..ops import stream as stream_ops
from ..reference.conv import StreamableConvTranspose1d
from .base import NotStreamableError, Step, _out_view, _pointwise, _Slot, _time_major, _tm, bf16_operand
from .conv import ConvWeight, conv_transpose1d_step, elu_alpha


class ConvTrStep(Step):
    """[activation ->] StreamableConvTranspose1d [-> norm] -> trim (see the module docstring)."""

    def __init__(self, module: StreamableConvTranspose1d, act: nn.Module | None = None, path: str = ""):
        convtr = module.convtr.convtr
        self.module, self.convtr, self.norm, self.path = module, convtr, module.convtr.norm, path
        self.kernel_size, self.stride, self.groups = convtr.kernel_size[0], convtr.stride[0], convtr.groups
        self.causal = module.causal
        self.overlap = self.kernel_size - self.stride
        self.trim = conv_ops.streamable_trim(self.kernel_size, self.stride, module.causal, module.trim_right_ratio) \
            if self.overlap >= 0 else (0, 0)
        self.trim_left = self.trim[0]
        self.in_channels, self.out_channels = convtr.in_channels, convtr.out_channels
        self.weight = ConvWeight(convtr, stream_ops.pack_conv_transpose1d_weight)
        self.conv_params = convtr._parameters
        # offline: the kernels fuse an ELU that is not in-place; another activation runs as its module
        self.alpha = elu_alpha(act)
        self.act = act if (act is not None and self.alpha is None) else None
        # streamed
        self.act_fn = None if act is None else _pointwise(act)
        self.act_name = None if act is None else type(act).__name__
        self.conv_step = conv_transpose1d_step  # the seam of the streamed ATen GEMM
        self.fast = self.groups == 1 and (act is None or type(act) is nn.ELU)
        self.stream_alpha = float(act.alpha) if type(act) is nn.ELU else None

    def set_bf16(self, on: bool) -> None:
        self.bf16 = bool(on)
        self.weight.set_bf16(on)

    def operand(self, x: torch.Tensor) -> torch.Tensor:
        return bf16_operand(x, self.act, self.alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        convtr = self.convtr
        if self.groups != 1 or convtr.dilation[0] != 1 or convtr.output_padding[0] != 0:
            raise NotImplementedError("SEANet's transposed convs have groups 1, dilation 1, no output_padding")
        alpha = self.alpha
        if self.bf16:
            x, alpha = self.operand(x), None
        elif self.act is not None:
            x = self.act(x)
        w = self.weight.offline()
        if isinstance(self.norm, nn.Identity):
            return conv_ops.conv_transpose1d(x, w, convtr.bias, self.stride, self.trim[0], self.trim[1], alpha)
        # audiocraft normalises before trimming (time_group_norm statistics include the trimmed edges)
        y = self.norm(conv_ops.conv_transpose1d(x, w, convtr.bias, self.stride, 0, 0, alpha))
        return y[..., self.trim[0]: y.shape[-1] - self.trim[1]]

    def stream_check(self) -> None:
        path, convtr = self.path, self.convtr
        if not self.causal:
            raise NotStreamableError(
                f"{path}: non-causal StreamableConvTranspose1d (causal=False) trims its output symmetrically, "
                f"so it needs the end of the signal: streaming needs a causal model such as encodec_model_24khz")
        if not isinstance(self.norm, nn.Identity):
            raise NotStreamableError(f"{path}: norm {type(self.norm).__name__} (time_group_norm) "
                                     f"normalises over the whole time axis: not streamable")
        if convtr.padding[0] or convtr.output_padding[0] or convtr.dilation[0] != 1:
            raise NotStreamableError(f"{path}: ConvTranspose1d with padding/output_padding/dilation is not "
                                     f"SEANet's and is not supported for streaming")
        if self.overlap < 0:
            raise NotStreamableError(f"{path}: kernel {self.kernel_size} < stride {self.stride}")

    def describe(self):
        a = f"{self.act_name}+" if self.act_name else ""
        return (f"{a}ConvTr({self.in_channels}->{self.out_channels},k{self.kernel_size},s{self.stride},"
                f"g{self.groups},trim{self.trim_left})")

    def new_slots(self, slots, batch, hint, like):
        self.idx = len(slots)
        slots.append(_Slot(pending=_time_major(like, batch, self.out_channels, self.overlap), skip=self.trim_left,
                           total=0))
        return hint * self.stride

    def push(self, x, slots):
        st = slots[self.idx]
        T = x.shape[-1]
        act_fn, alpha = self.act_fn, self.stream_alpha
        if self.bf16:
            x, act_fn, alpha = self.operand(x), None, None
        # past the left trim (none in the 24 kHz model) every input frame completes `stride` outputs
        if slots.kernels and not st.skip and self.fast and self.conv_step is conv_transpose1d_step:
            if self.overlap > 1 and st.pending.stride(2) != self.out_channels:
                st.pending = _tm(_tm(st.pending).contiguous())
            out = _out_view(slots, self.idx, x, self.out_channels, T * self.stride)
            stream_ops.conv_transpose1d_update(x, self.weight.panels(), self.conv_params["bias"], st.pending, 0,
                                               self.kernel_size, self.stride, alpha, out)
            st.total += T
            return out
        if act_fn is not None:
            x = act_fn(x)
        w, packed = self.weight.get()
        y = self.conv_step(x, w, self.stride, self.groups, packed)
        ov, done = self.overlap, T * self.stride
        if ov:
            y[:, :, :ov].add_(st.pending)
            st.pending.copy_(y[:, :, done:])
        out = y[:, :, :done]
        bias = self.conv_params["bias"]
        if bias is not None:
            out.add_(bias.unsqueeze(-1))
        st.total += T
        if st.skip:
            drop = min(st.skip, done)
            st.skip -= drop
            if drop == done:
                return None
            out = out[:, :, drop:]
        return out

    def flush(self, slots):
        st = slots[self.idx]
        if st.total == 0 or self.trim_left == 0:
            return None
        # the offline output ends trim_left samples into the overlap (the rest is the causal right trim);
        # skip > 0 when the whole stream is shorter than the left trim
        tail = st.pending[:, :, st.skip:self.trim_left].clone()
        bias = self.conv_params["bias"]
        if bias is not None:
            tail.add_(bias.unsqueeze(-1))
        st.skip = 0
        return tail


