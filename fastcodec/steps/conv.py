"""The conv step of a SEANet plan: ``[activation ->] StreamableConv1d [-> norm] [+ skip]``, offline and streamed,
with the one weight handle both modes read, and the ATen GEMMs the streamed conv runs where the streaming kernels
do not (float64, CUDA, the reference backend, activations other than the ELU, start-up and flush).

Offline: one ``fastcodec::conv1d`` call (padding and ELU inside the kernel, no padded copy; the shortcut of a
residual block added in its epilogue). Streamed (causal convs only): the slot ``buf`` (B, C_in, cap), time-major,
holds the valid samples at ``[start, start + n)``; before ``warm`` they are raw inputs from index 0, after it
padded samples from ``emitted * stride`` on; ``total`` inputs seen. A chunk is one ``fastcodec::conv1d_update``
where the kernels run, else an im2col GEMM on a view of the buffer (``conv1d_step``, the seam a step may
replace).
"""
from __future__ import annotations

import typing as tp

import torch
import torch.nn.functional as F
from torch import nn

from .. import _cache
from ..ops import conv as conv_ops
from ..ops import stream as stream_ops
from ..precision import round_bf16
from ..reference.conv import StreamableConv1d, pad1d
from .base import (NotStreamableError, Step, _out_view, _pointwise_into, _Slot, _time_major, _tm, bf16_of,
                   bf16_operand)


# Reductions longer than this are split into blocks of this many terms: MKL's float32 GEMV over K = 4096
# loses 9.7e-7 relative to float64, in 1024-term blocks 3.5e-7 (the offline oneDNN conv's level, 3e-7);
# it costs a little time on those two layers (measured: bench/results/design-measurements.md) and
# brings the streamed encoder's error to <= 1.41x the offline float32 error (60 random splits) from up to 2.85x.
_K_BLOCK = 1024


def linear_step(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``a @ weight^T + bias`` with the reduction split in ``_K_BLOCK`` blocks when K > 2 * _K_BLOCK.
    a: (M, K), any strides; weight: (N, K); bias: (N,) or None -> (M, N)."""
    K = a.shape[1]
    if K <= 2 * _K_BLOCK:
        return F.linear(a, weight, bias)
    y = F.linear(a[:, :_K_BLOCK], weight[:, :_K_BLOCK], bias)
    for j in range(_K_BLOCK, K, _K_BLOCK):
        y.add_(F.linear(a[:, j:j + _K_BLOCK], weight[:, j:j + _K_BLOCK]))
    return y


# Above this many frames (a large chunk) F.conv1d is as accurate (2.7e-7 relative at 2000 frames) and
# needs no k-times larger im2col copy; below it, im2col keeps the time-major layout end to end.
_IM2COL_MAX_FRAMES = 2048


def conv1d_step(window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int,
                dilation: int, groups: int, packed: torch.Tensor | None = None) -> torch.Tensor:
    """One streaming conv on an already padded window. window: (B, C_in, L), any strides (the state keeps
    it time-major); weight: (C_out, C_in / groups, k); packed: ``pack_conv1d(weight)`` or None
    -> (B, C_out, (L - (k - 1) * dilation - 1) // stride + 1), time-major underneath.

    With ``packed`` (groups 1) it is an im2col GEMM with the few frames as rows (``linear_step``): a
    (2..8 frames) x 4096 x 512 conv through ``F.conv1d`` (MKL's small-N GEMM) is about ten times slower and
    loses 3.4e-6 relative, against 8e-7 as frames x weight^T (measured: bench/results/design-measurements.md).
    """
    B, C, L = window.shape
    k = weight.shape[-1]
    frames = (L - (k - 1) * dilation - 1) // stride + 1
    if packed is None or groups != 1 or frames > _IM2COL_MAX_FRAMES:
        return F.conv1d(window, weight, bias, stride, 0, dilation, groups)
    sb, sc, st = window.stride()
    cols = window.as_strided((B, frames, k, C), (sb, stride * st, dilation * st, sc), window.storage_offset())
    y = linear_step(cols.reshape(B * frames, k * C), packed, bias)
    return y.view(B, frames, -1).transpose(1, 2)


def conv_transpose1d_step(x: torch.Tensor, weight: torch.Tensor, stride: int, groups: int,
                          packed: torch.Tensor | None = None) -> torch.Tensor:
    """One streaming transposed conv without bias (added once the overlap is complete).
    x: (B, C_in, T), any strides; weight: (C_in, C_out / groups, k); packed: ``pack_conv_transpose1d(weight)``
    -> (B, C_out, (T - 1) * stride + k), time-major underneath.

    With ``packed`` (groups 1): one GEMM gives each frame's k output samples, overlap-added with stride.
    """
    if packed is None or groups != 1:
        return F.conv_transpose1d(x, weight, None, stride, 0, 0, groups)
    B, C, T = x.shape
    k = weight.shape[-1]
    contrib = torch.mm(x.transpose(1, 2).reshape(B * T, C), packed)  # [B * T, k * C_out]
    c_out = contrib.shape[-1] // k
    contrib = contrib.view(B, T, k, c_out)
    out = contrib.new_zeros(B, (T - 1) * stride + k, c_out)
    for j in range(0, k, stride):
        w = min(stride, k - j)
        # frame t's taps [j, j + w) land on samples t * stride + j + [0, w): disjoint for one j
        out.as_strided((B, T, w, c_out), (out.stride(0), stride * c_out, c_out, 1),
                       out.storage_offset() + j * c_out).add_(contrib[:, :, j:j + w])
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# the weight handle
# ---------------------------------------------------------------------------------------------


def _weight(conv: nn.Module) -> torch.Tensor:
    """The conv's weight for the offline ops: weight norm folded once per change (``weight_norm_weight``), per
    call when autograd needs it or inside ``torch.compile``."""
    params = conv._parameters
    if "weight_v" in params:
        if torch.compiler.is_compiling():
            return torch._weight_norm(params["weight_v"], params["weight_g"], 0)
        return conv_ops.weight_norm_weight(params["weight_v"], params["weight_g"])
    return conv.weight


_PACKED = _cache.TensorCache()


class ConvWeight:
    """A conv's weight as every mode reads it: ``offline()`` for the offline ops; ``get()`` the folded weight and its
    im2col packing ``pack(w)`` for the ATen streaming GEMMs; ``panels()`` that packing in the streaming kernels'
    layout. Folded once (``fastcodec.ops.conv.weight_norm_weight``, bitwise the module's own ``.weight``) and
    packed once per change, under the one cache rule (``fastcodec._cache``), with per-stream memos in front."""

    __slots__ = ("conv", "params", "pack", "memo", "panel_memo", "panel_of", "bf16")

    def __init__(self, conv: nn.Module, pack: tp.Callable[[torch.Tensor], torch.Tensor]):
        self.conv = conv
        self.params = conv._parameters  # the dict itself: load_state_dict(assign=True) replaces its entries
        self.pack = pack
        self.memo = _cache.Memo()
        self.panel_memo = _cache.Memo()
        self.panel_of: tuple | None = None  # (packed, panels): panels of that private packed tensor
        self.bf16 = False  # every mode reads the weight rounded to bf16 (precision="bf16")

    def set_bf16(self, on: bool) -> None:
        if bool(on) != self.bf16:
            self.bf16 = bool(on)
            self.memo, self.panel_memo, self.panel_of = _cache.Memo(), _cache.Memo(), None

    def offline(self) -> torch.Tensor:
        w = _weight(self.conv)
        return bf16_of(w) if self.bf16 else w

    def _sources(self) -> tuple:
        params = self.params
        v = params.get("weight_v")
        return (params["weight"],) if v is None else (v, params["weight_g"])

    def _make(self, src: tuple):
        bf16 = self.bf16

        def make():
            with torch.no_grad(), torch.inference_mode(False):
                w = src[0].detach().clone() if len(src) == 1 else conv_ops.weight_norm_weight(src[0], src[1])
                if bf16:
                    w = round_bf16(w)
                return (w, self.pack(w))

        return make

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (weight, packed weight)."""
        src = self._sources()
        return self.memo.get(_PACKED, src, self._make(src), (self.pack, self.bf16))

    def panels(self) -> torch.Tensor:
        """The packed weight (K, N) = ``pack(w)`` as (N, K) transposed, in ``stream_ops.pack_panels``' layout."""
        src = self._sources()
        hit = self.panel_memo.hit(src)
        if hit is not None:
            return hit
        packed = self.get()[1]
        memo = self.panel_of
        if memo is None or memo[0] is not packed:  # packed is private and rebuilt on any change
            p = packed.t() if self.pack is stream_ops.pack_conv1d_weight else packed
            memo = self.panel_of = (packed, stream_ops.pack_panels(p))
        return self.panel_memo.store(src, memo[1])


def elu_alpha(act: nn.Module | None) -> float | None:
    """The alpha of an ELU the offline kernels fuse (not an in-place one), else None."""
    return float(act.alpha) if isinstance(act, nn.ELU) and not act.inplace else None


# ---------------------------------------------------------------------------------------------
# the step
# ---------------------------------------------------------------------------------------------


class ConvStep(Step):
    """[activation ->] StreamableConv1d [-> norm] [+ skip] (see the module docstring)."""

    def __init__(self, module: StreamableConv1d, act: nn.Module | None = None, path: str = ""):
        conv = module.conv.conv
        self.module, self.conv, self.norm, self.path = module, conv, module.conv.norm, path
        self.kernel_size, self.stride, self.dilation = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
        self.groups = conv.groups
        self.span = (self.kernel_size - 1) * self.dilation + 1
        self.padding_total = self.pad = self.span - self.stride
        self.causal, self.pad_mode = module.causal, module.pad_mode
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.weight = ConvWeight(conv, stream_ops.pack_conv1d_weight)
        self.conv_params = conv._parameters
        # offline: the kernels fuse an ELU that is not in-place; another activation runs as its module
        self.alpha = elu_alpha(act)
        self.act = act if (act is not None and self.alpha is None) else None
        self.fuse_skip = isinstance(self.norm, nn.Identity)
        # streamed: the activation written into the state buffer; the kernels fuse the ELU only, and no groups
        self.act_into = None if act is None else _pointwise_into(act)
        self.act_name = None if act is None else type(act).__name__
        self.conv_step = conv1d_step  # the seam of the streamed ATen GEMM (a registered step may replace it)
        self.fast = self.groups == 1 and (act is None or type(act) is nn.ELU)
        self.stream_alpha = float(act.alpha) if type(act) is nn.ELU else None
        # inputs needed before the left padding is known
        self.warm_at = {"constant": 0, "replicate": 1, "reflect": self.pad + 1}.get(self.pad_mode, 0) \
            if self.pad > 0 else 0

    def padding(self, length: int) -> tuple[int, int]:
        """audiocraft's (left, right) padding for an input of ``length`` samples (``streamable_padding``)."""
        return conv_ops.streamable_padding(length, self.kernel_size, self.stride, self.dilation, self.causal)

    def set_bf16(self, on: bool) -> None:
        self.bf16 = bool(on)
        self.weight.set_bf16(on)

    def operand(self, x: torch.Tensor) -> torch.Tensor:
        return bf16_operand(x, self.act, self.alpha)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.groups != 1:
            raise NotImplementedError("grouped convs are not part of SEANet")
        alpha = self.alpha
        if self.bf16:
            x, alpha = self.operand(x), None
        elif self.act is not None:
            x = self.act(x)
        left, right = self.padding(x.shape[-1])
        fused_skip = skip if self.fuse_skip else None
        y = conv_ops.conv1d(x, self.weight.offline(), self.conv.bias, fused_skip, self.stride, self.dilation,
                            left, right, self.pad_mode, alpha)
        y = self.norm(y)
        if skip is not None and fused_skip is None:
            y = y + skip
        return y

    def __call__(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward(x, skip)

    def stream_check(self) -> None:
        path = self.path
        if not self.causal:
            right = (self.span - self.stride) // 2
            raise NotStreamableError(
                f"{path}: non-causal StreamableConv1d (causal=False) centres its padding, so each output reads "
                f"{right} future sample(s) plus the end of the signal; streaming needs a causal model such as "
                f"encodec_model_24khz (the 48 kHz EnCodec and MusicGen's 32 kHz codec are non-causal)")
        if not isinstance(self.norm, nn.Identity):
            raise NotStreamableError(f"{path}: norm {type(self.norm).__name__} (time_group_norm) "
                                     f"normalises over the whole time axis: not streamable")
        if self.pad_mode not in ("constant", "reflect", "replicate"):
            raise NotStreamableError(f"{path}: pad_mode {self.pad_mode!r} needs the end of the signal for its "
                                     f"left padding: not streamable")
        if self.pad < 0:
            raise NotStreamableError(f"{path}: kernel span {self.span} < stride {self.stride}: audiocraft's "
                                     f"padding would be negative")
        if self.pad_mode == "reflect" and self.stride > 1 and self.pad < self.stride - 1:
            # the last frame's right reflection reads s - r + 1 samples that the state no longer holds
            raise NotStreamableError(f"{path}: reflect padding with kernel span {self.span} < 2 * stride - 1 "
                                     f"(stride {self.stride}) is not supported for streaming")

    def describe(self):
        a = f"{self.act_name}+" if self.act_name else ""
        return (f"{a}Conv({self.in_channels}->{self.out_channels},k{self.kernel_size},s{self.stride},"
                f"d{self.dilation},g{self.groups},{self.pad_mode})")

    def new_slots(self, slots, batch, hint, like):
        self.idx = len(slots)
        cap = 2 * self.span + hint
        buf = _time_major(like, batch, self.in_channels, cap)
        warm = self.warm_at == 0
        # constant padding: the P zeros are known from the start (the buffer is zeros)
        n = self.pad if self.pad_mode == "constant" else 0
        slots.append(_Slot(buf=buf, start=0, n=n, total=0, emitted=0, warm=warm))
        return hint // self.stride + 1

    def _reserve(self, st: _Slot, free: int) -> None:
        """Make ``free`` samples of room after the valid ones: compact in place, or grow."""
        buf, start, n = st.buf, st.start, st.n
        cap = buf.shape[-1]
        if n + free <= cap and start >= n:  # source and destination of the compaction do not overlap
            if n:
                buf[:, :, :n].copy_(buf[:, :, start:start + n])
            st.start = 0
            return
        # the compaction of any later chunk of up to ``free`` samples will not overlap (n < span then)
        new = _time_major(buf, buf.shape[0], buf.shape[1], max(2 * self.span + free, n + free + self.span))
        new[:, :, :n].copy_(buf[:, :, start:start + n])
        st.buf, st.start = new, 0

    def _warm_up(self, st: _Slot) -> None:
        raw = st.buf[:, :, st.start:st.start + st.n].clone()
        padded = pad1d(raw, (self.pad, 0), self.pad_mode)
        st.n = 0
        st.start = 0
        self._reserve(st, padded.shape[-1])
        st.buf[:, :, :padded.shape[-1]].copy_(padded)
        st.n = padded.shape[-1]
        st.warm = True

    def _push_fast(self, x, slots, st, alpha):
        """One ``fastcodec::conv1d_update``: the chunk through the ELU into the buffer, the frames it completes into
        the step's reused output buffer."""
        T = x.shape[-1]
        n = st.n
        if n + T > st.buf.shape[-1]:
            self._reserve(st, T)
        if st.buf.stride(2) != self.in_channels:  # a state loaded or built elsewhere: back to time-major
            st.buf = _tm(_tm(st.buf).contiguous())
        total = n + T
        frames = (total - self.span) // self.stride + 1 if total >= self.span else 0
        out = _out_view(slots, self.idx, x, self.out_channels, frames) if frames else None
        start = stream_ops.conv1d_update(x, st.buf, self.weight.panels(), self.conv_params["bias"], st.start, n,
                                         frames, self.kernel_size, self.stride, self.dilation, alpha, out)
        consumed = frames * self.stride
        st.start = start + consumed
        st.n = total - consumed
        st.total += T
        st.emitted += frames
        return out

    def push(self, x, slots):
        st = slots[self.idx]
        act_into, alpha = self.act_into, self.stream_alpha
        if self.bf16:
            x, act_into, alpha = self.operand(x), None, None
        if slots.kernels and st.warm and self.fast and self.conv_step is conv1d_step:
            return self._push_fast(x, slots, st, alpha)
        T = x.shape[-1]
        end = st.start + st.n
        if end + T > st.buf.shape[-1]:
            self._reserve(st, T)
            end = st.start + st.n
        dst = st.buf[:, :, end:end + T]
        if act_into is None:
            dst.copy_(x)
        else:
            act_into(x, dst)
        st.n += T
        st.total += T
        if not st.warm:
            if st.total < self.warm_at:
                return None
            self._warm_up(st)
        n = st.n
        if n < self.span:
            return None
        s = self.stride
        frames = (n - self.span) // s + 1
        start = st.start
        w, packed = self.weight.get()
        y = self.conv_step(st.buf[:, :, start:start + (frames - 1) * s + self.span], w, self.conv_params["bias"],
                           s, self.dilation, self.groups, packed)
        st.start = start + frames * s
        st.n = n - frames * s
        st.emitted += frames
        return y

    def flush(self, slots):
        st = slots[self.idx]
        T, s = st.total, self.stride
        if T == 0 or -(-T // s) <= st.emitted:
            return None
        extra = self.padding(T)[1]  # causal: all of the right padding is the extra that fills the last stride
        window = st.buf[:, :, st.start:st.start + st.n]
        if st.warm:
            window = F.pad(window, (0, extra), self.pad_mode) if extra else window
        else:
            # never started: the whole input is here; the reference pad1d applies its short-input rule
            window = pad1d(window, (self.pad, extra), self.pad_mode)
        w, packed = self.weight.get()
        y = self.conv_step(window, w, self.conv_params["bias"], s, self.dilation, self.groups, packed)
        st.emitted += y.shape[-1]
        st.n = 0
        return y


