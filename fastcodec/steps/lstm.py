"""The LSTM step of a SEANet plan (``StreamableLSTM``): offline ``fastcodec::lstm`` on the whole sequence (an opaque
op: dynamo cannot trace ``nn.LSTM``), streamed ``fastcodec::lstm_step`` with the slot ``h``, ``c`` (B, layers, H)
updated in place; with the C++ kernel the output goes into the step's reused buffer. Both read one weight handle
(``fastcodec.ops.lstm.PackedLSTMWeights``)."""
from __future__ import annotations

import torch

from ..ops import lstm as lstm_ops
from ..precision import round_bf16
from ..reference.lstm import StreamableLSTM
from .base import NotStreamableError, Step, _Slot, bf16_of


class LSTMStep(Step):
    def __init__(self, module: StreamableLSTM, path: str = ""):
        lstm = module.lstm
        self.path = path
        self.reason = lstm_ops.unsupported_reason(lstm)
        # the parameter dict, read at every call (load_state_dict(assign=True) puts new Parameter objects in
        # it), not the nn.LSTM: dynamo refuses to trace any access to an nn.LSTM module
        self.params = lstm._parameters
        self.names = list(lstm._flat_weights_names)
        self.num_layers = self.layers = lstm.num_layers
        self.skip = module.skip
        self.in_channels, self.out_channels = lstm.input_size, lstm.hidden_size
        self.weights = lstm_ops.PackedLSTMWeights(lstm) if self.reason is None else None

    def set_bf16(self, on: bool) -> None:
        """precision="bf16": the input and the weight matrices rounded to bf16; biases, the hidden and cell
        state (and what a layer passes to the next) stay float32."""
        self.bf16 = bool(on)
        if self.weights is not None:
            self.weights.set_bf16(on)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reason is not None:
            raise NotImplementedError(self.reason)
        xt = x.permute(2, 0, 1)
        weights = [self.params[n] for n in self.names]
        xin = xt
        if self.bf16:
            xin = round_bf16(xt)
            weights = [bf16_of(w) if i % 4 < 2 else w for i, w in enumerate(weights)]
        y = lstm_ops.lstm_op(xin.contiguous(), weights, self.num_layers)
        if self.skip:
            y = y + xt
        return y.permute(1, 2, 0)

    def stream_check(self) -> None:
        if self.reason is not None:
            raise NotStreamableError(f"{self.path}: {self.reason}")

    def describe(self):
        return f"LSTM({self.in_channels},{self.layers}{',skip' if self.skip else ''})"

    def new_slots(self, slots, batch, hint, like):
        self.idx = len(slots)
        slots.append(_Slot(h=like.new_zeros(batch, self.layers, self.out_channels),
                           c=like.new_zeros(batch, self.layers, self.out_channels)))
        return hint

    def push(self, x, slots):
        st = slots[self.idx]
        T = x.shape[-1]
        xt = x.permute(2, 0, 1)  # (T, B, C): unit stride along C from a time-major step output
        if self.bf16:
            xt = round_bf16(xt)  # the skip below adds the float32 x
        if not slots.fused_lstm:
            y = lstm_ops.lstm_step(xt, self.weights, st.h.transpose(0, 1), st.c.transpose(0, 1), None, False)
            y = y.permute(1, 2, 0)  # fresh: the last layer's h (also copied into the state)
        else:
            if xt.stride(2) != 1:
                xt = xt.contiguous()
            entry = slots.outs.get(self.idx)
            if entry is None or entry[0] != T:
                store = entry[2] if entry is not None and entry[2].shape[0] >= T else \
                    torch.empty(T, x.shape[0], self.out_channels, dtype=x.dtype, device=x.device)
                entry = slots.outs[self.idx] = (T, (store[:T], store[:T].permute(1, 2, 0)), store)
            out, y = entry[1]
            if st.h.stride(2) != 1 or st.c.stride(2) != 1:  # StreamState.cat/select keep the other layout
                st.h, st.c = st.h.contiguous(), st.c.contiguous()
            lstm_ops.lstm_step(xt, self.weights, st.h.transpose(0, 1), st.c.transpose(0, 1), out, True)
        if self.skip:
            y.add_(x)
        return y

    def flush(self, slots):
        return None


