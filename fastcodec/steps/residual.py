"""The residual step of a SEANet plan (``SEANetResnetBlock``): ``shortcut(x) + block(x)``.

Offline: the add fused into the block's last conv; inference on long CPU signals runs the whole block as one
``fastcodec::resblock`` (one parallel region over time tiles, each thread's buffers in its L2; each output sample
is the same sum in the same order as the three convs: bitwise equal). Streamed: the block's reflect-padded conv
starts later than the shortcut; the join slot keeps each branch's outputs not yet matched (``pend_a``, ``pend_b``,
only during start-up: afterwards both branches emit one output per input).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _backend
from ..ops import conv as conv_ops
from ..ops import resblock as resblock_ops
from .base import Step, _Slot, flush_chain, push_chain
from .conv import ConvStep, _weight

# blocks of at least this many samples run fused (csrc resblock); shorter ones as three conv1d calls. The
# 24 kHz models' shortest block (256 channels, 6000 frames per 10 s) already runs faster fused
# (measured: bench/results/design-measurements.md).
_RES_FUSED_MIN = 1024
# frames per tile of the fused block (csrc resblock); 0: chosen in C++ from the channel count (L2 budget)
_RES_TILE_FRAMES = 0


class ResStep(Step):
    """``block``: the steps of ``SEANetResnetBlock.block`` (an activation fused into each conv), ``shortcut_steps``:
    those of its shortcut (none for an identity shortcut); ``steps`` / ``shortcut`` are the same as the offline
    fused block sees them (the block's conv steps, the shortcut's conv step or None)."""

    def __init__(self, block: list[Step], shortcut: list[Step], channels: int, path: str = ""):
        self.block = self.steps = block
        self.shortcut_steps = shortcut
        self.shortcut = shortcut[0] if len(shortcut) == 1 else None
        self.in_channels, self.out_channels = channels, block[-1].out_channels if block else channels
        self.path = path
        s0, s1 = block[0], block[-1]
        convs = block + ([self.shortcut] if self.shortcut else [])
        self.tileable = (len(block) == 2 and len(shortcut) == len(convs) - 2
                         and all(isinstance(s, ConvStep) and s.act is None and isinstance(s.norm, nn.Identity)
                                 and s.stride == 1 for s in convs)
                         and s1.span == 1 and (self.shortcut is None or self.shortcut.span == 1)
                         and s0.module.pad_mode in conv_ops._PAD_CODE)

    def set_bf16(self, on: bool) -> None:
        self.bf16 = bool(on)
        for s in self.block + self.shortcut_steps:
            s.set_bf16(on)

    def _can_tile(self, x: torch.Tensor) -> bool:
        # bf16: the block's inner activation is rounded between its convs, which the fused block keeps in registers
        if not self.tileable or self.bf16 or torch.compiler.is_compiling() or x.shape[-1] < _RES_FUSED_MIN:
            return False
        if x.device.type != "cpu" or x.dtype != torch.float32 or _backend.choose("conv", x.device) != "cpp":
            return False
        if torch.is_grad_enabled():
            convs = [s.conv for s in self.steps] + ([self.shortcut.conv] if self.shortcut else [])
            if x.requires_grad or any(p.requires_grad for c in convs for p in c.parameters()):
                return False
        return True

    def _tiled(self, x: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """x: (B, C, T) -> (B, C_out, T); ``tile``: frames per tile (default ``_RES_TILE_FRAMES``)."""
        s0, s1, sc = self.steps[0], self.steps[1], self.shortcut
        left, right = s0.padding(x.shape[-1])
        return resblock_ops.resblock(
            x, _weight(s0.conv), s0.conv.bias, _weight(s1.conv), s1.conv.bias, _weight(sc.conv) if sc else None,
            sc.conv.bias if sc else None, s0.dilation, left, right, s0.pad_mode, s0.alpha, s1.alpha,
            _RES_TILE_FRAMES if tile is None else tile, backend="cpp")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._can_tile(x):
            return self._tiled(x)
        if self.shortcut is not None or not self.shortcut_steps:
            skip = x if self.shortcut is None else self.shortcut(x)
        else:
            skip = x
            for step in self.shortcut_steps:
                skip = step(skip)
        h = x
        for step in self.steps[:-1]:
            h = step(h)
        last = self.steps[-1]
        return last(h, skip) if isinstance(last, ConvStep) else last(h) + skip

    def stream_check(self) -> None:
        for s in self.block + self.shortcut_steps:
            s.stream_check()

    def describe(self):
        sc = ",".join(s.describe() for s in self.shortcut_steps) or "Identity"
        return f"Residual([{','.join(s.describe() for s in self.block)}]+[{sc}])"

    def new_slots(self, slots, batch, hint, like):
        out = hint
        for s in self.block:
            out = s.new_slots(slots, batch, out, like)
        for s in self.shortcut_steps:
            s.new_slots(slots, batch, hint, like)
        self.idx = len(slots)
        empty = like.new_zeros(batch, self.out_channels, 0)
        slots.append(_Slot(pend_a=empty, pend_b=empty.clone(), unmatched=0))
        return out

    def _join(self, a, b, slots):
        st = slots[self.idx]
        if not st.unmatched:
            if a is not None and b is not None and a.shape[-1] == b.shape[-1]:
                return b.add_(a)
            if a is None and b is None:
                return None
        A = torch.cat([st.pend_a] + ([] if a is None else [a]), -1)
        B = torch.cat([st.pend_b] + ([] if b is None else [b]), -1)
        m = min(A.shape[-1], B.shape[-1])
        st.pend_a, st.pend_b = A[:, :, m:].clone(), B[:, :, m:].clone()
        st.unmatched = st.pend_a.shape[-1] + st.pend_b.shape[-1]
        return A[:, :, :m] + B[:, :, :m] if m else None

    def push(self, x, slots):
        a = push_chain(self.shortcut_steps, x, slots) if self.shortcut_steps else x
        b = push_chain(self.block, x, slots)
        return self._join(a, b, slots)

    def flush(self, slots):
        a = flush_chain(self.shortcut_steps, slots) if self.shortcut_steps else None
        b = flush_chain(self.block, slots)
        out = self._join(a, b, slots)
        if slots[self.idx].unmatched:
            raise RuntimeError("streaming residual block: branch lengths differ at flush (internal error)")
        return out


