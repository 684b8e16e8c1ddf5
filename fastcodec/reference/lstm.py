"""The LSTM block of SEANet, in convolutional layout, as audiocraft 1.3.0's ``StreamableLSTM``."""
from __future__ import annotations

import torch
from torch import nn


class StreamableLSTM(nn.Module):
    """``num_layers``-layer LSTM over time with ``dimension`` units and an optional skip connection.

    No state is carried between calls. x: (B, dimension, T) -> (B, dimension, T).
    ``state_dict`` keys: ``lstm.weight_ih_l{k}``, ``lstm.weight_hh_l{k}``, ``lstm.bias_ih_l{k}``, ``lstm.bias_hh_l{k}``.
    """

    def __init__(self, dimension: int, num_layers: int = 2, skip: bool = True):
        super().__init__()
        self.skip = skip
        self.lstm = nn.LSTM(dimension, dimension, num_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(2, 0, 1)
        y, _ = self.lstm(x)
        if self.skip:
            y = y + x
        return y.permute(1, 2, 0)
