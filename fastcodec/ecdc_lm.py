"""The entropy-coded ``.ecdc`` mode (``"lm": true``): encodec 0.1.1's arithmetic coder driven by its small
streaming transformer language model, ported from ``encodec/quantization/ac.py``, ``encodec/model.py``
(``LMModel``) and ``encodec/modules/transformer.py`` (MIT licence, Meta Platforms), same modules, same
``state_dict`` keys and the same float32 ops in the same order: the probabilities, hence the bytes, are
encodec's on the same machine. An arithmetic-coded stream decodes only with bitwise the same probabilities,
so encode and decode with the same LM weights on the same kind of CPU (encodec rounds the pdf to 1e-8 for
some tolerance across architectures; so do we).

The LM weights are encodec's ``encodec_lm_24khz-1608e3c0.th`` / ``encodec_lm_48khz-7add9fc3.th``: not
downloaded here; ``load_lm(model, path)`` loads them.
"""
from __future__ import annotations

import math
import os
import typing as tp

import torch
import torch.nn as nn
import torch.nn.functional as F

TOTAL_RANGE_BITS = 24


# -- the language model ---------------------------------------------------------------------------------
def _sin_embedding(positions: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
    half = dim // 2
    adim = torch.arange(half, device=positions.device).view(1, 1, -1)
    phase = positions / (max_period ** (adim / (half - 1)))
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)


class _Layer(nn.TransformerEncoderLayer):
    def forward(self, x, x_past, past_context):  # type: ignore[override]
        if self.norm_first:
            sa_input = self.norm1(x)
            x = x + self._sa(sa_input, x_past, past_context)
            x = x + self._ff_block(self.norm2(x))
        else:
            sa_input = x
            x = self.norm1(x + self._sa(sa_input, x_past, past_context))
            x = self.norm2(x + self._ff_block(x))
        return x, sa_input

    def _sa(self, x, x_past, past_context):
        _, T, _ = x.shape
        _, H, _ = x_past.shape
        keys = torch.cat([x_past, x], dim=1)
        delta = torch.arange(H, T + H, device=x.device).view(-1, 1) - torch.arange(T + H, device=x.device).view(1, -1)
        valid = (delta >= 0) & (delta <= past_context)
        return self.dropout1(self.self_attn(x, keys, keys, attn_mask=~valid, need_weights=False)[0])


class _Transformer(nn.Module):
    def __init__(self, dim, hidden_scale=4.0, num_heads=8, num_layers=5, max_period=10000, past_context=1000):
        super().__init__()
        self.max_period, self.past_context = max_period, past_context
        self.norm_in = nn.LayerNorm(dim)
        self.layers = nn.ModuleList([_Layer(dim, num_heads, int(dim * hidden_scale), activation=F.gelu,
                                            batch_first=True, dropout=0.0) for _ in range(num_layers)])

    def forward(self, x, states=None, offset=0):
        B, T, C = x.shape
        if states is None:
            states = [torch.zeros_like(x[:, :1]) for _ in range(1 + len(self.layers))]
        positions = torch.arange(T, device=x.device).view(1, -1, 1) + offset
        x = self.norm_in(x) + _sin_embedding(positions, C, self.max_period)
        new = []
        for state, layer in zip(states, self.layers):
            x, s = layer(x, state, self.past_context)
            new.append(torch.cat([state, s], dim=1)[:, -self.past_context:, :])
        return x, new, offset + T


class LMModel(nn.Module):
    """encodec's ``LMModel``: the probabilities of every codebook's next code given the previous step's."""

    def __init__(self, n_q: int = 32, card: int = 1024, dim: int = 200, **kwargs):
        super().__init__()
        self.card, self.n_q, self.dim = card, n_q, dim
        self.transformer = _Transformer(dim=dim, **kwargs)
        self.emb = nn.ModuleList([nn.Embedding(card + 1, dim) for _ in range(n_q)])
        self.linears = nn.ModuleList([nn.Linear(dim, card) for _ in range(n_q)])

    def forward(self, indices, states=None, offset=0):
        B, K, T = indices.shape
        input_ = sum([self.emb[k](indices[:, k]) for k in range(K)])
        out, states, offset = self.transformer(input_, states, offset)
        logits = torch.stack([self.linears[k](out) for k in range(K)], dim=1).permute(0, 3, 1, 2)
        return torch.softmax(logits, dim=1), states, offset


def lm_for(model) -> LMModel:
    """The LM architecture encodec pairs with ``model`` (random weights; see ``load_lm``)."""
    return LMModel(model.quantizer.total_codebooks, model.quantizer.bins, num_layers=5, dim=200,
                   past_context=int(3.5 * model.frame_rate)).eval()


def load_lm(model, path: tp.Union[str, os.PathLike]) -> LMModel:
    from .checkpoint import load_checkpoint
    return load_checkpoint(lm_for(model), path).eval()


# -- the arithmetic coder -------------------------------------------------------------------------------
def quantized_cdf(pdf: torch.Tensor, total_range_bits: int = TOTAL_RANGE_BITS, roundoff: float = 1e-8,
                  min_range: int = 2) -> torch.Tensor:
    """encodec's ``build_stable_quantized_cdf`` (check=False, as its compress calls it)."""
    pdf = (pdf.detach() / roundoff).floor() * roundoff
    total = 2 ** total_range_bits
    alpha = min_range * len(pdf) / total
    ranges = (((1 - alpha) * total) * pdf).floor().long() + min_range
    return torch.cumsum(ranges, dim=-1)


class _Bits:
    """Single bits, least significant first into bytes (encodec's ``BitPacker(bits=1)``)."""

    def __init__(self):
        self.out, self.cur, self.n = bytearray(), 0, 0

    def push(self, b: int):
        self.cur |= b << self.n
        self.n += 1
        if self.n == 8:
            self.out.append(self.cur)
            self.cur, self.n = 0, 0

    def flush(self) -> bytes:
        if self.n:
            self.out.append(self.cur)
            self.cur, self.n = 0, 0
        return bytes(self.out)


class ArithmeticCoder:
    def __init__(self, total_range_bits: int = TOTAL_RANGE_BITS):
        self.trb, self.bits = total_range_bits, _Bits()
        self.low, self.high, self.max_bit = 0, 0, -1

    def push(self, symbol: int, cdf: list[int]) -> None:
        while self.high - self.low + 1 < 2 ** self.trb:
            self.low *= 2
            self.high = self.high * 2 + 1
            self.max_bit += 1
        delta = self.high - self.low + 1
        range_low = 0 if symbol == 0 else cdf[symbol - 1]
        range_high = cdf[symbol] - 1
        eff_low = int(math.ceil(range_low * (delta / (2 ** self.trb))))
        eff_high = int(math.floor(range_high * (delta / (2 ** self.trb))))
        self.high = self.low + eff_high
        self.low = self.low + eff_low
        while self.max_bit >= 0:
            b1, b2 = self.low >> self.max_bit, self.high >> self.max_bit
            if b1 != b2:
                break
            self.low -= b1 << self.max_bit
            self.high -= b1 << self.max_bit
            self.max_bit -= 1
            self.bits.push(b1)

    def flush(self) -> bytes:
        while self.max_bit >= 0:
            self.bits.push((self.low >> self.max_bit) & 1)
            self.max_bit -= 1
        return self.bits.flush()


class ArithmeticDecoder:
    def __init__(self, read_byte: tp.Callable[[], tp.Optional[int]], total_range_bits: int = TOTAL_RANGE_BITS):
        self.trb, self.read_byte = total_range_bits, read_byte
        self.low, self.high, self.current, self.max_bit = 0, 0, 0, -1
        self._byte, self._left = 0, 0

    def _bit(self) -> tp.Optional[int]:
        if self._left == 0:
            b = self.read_byte()
            if b is None:
                return None
            self._byte, self._left = b, 8
        bit = self._byte & 1
        self._byte >>= 1
        self._left -= 1
        return bit

    def pull(self, cdf: list[int]) -> tp.Optional[int]:
        while self.high - self.low + 1 < 2 ** self.trb:
            bit = self._bit()
            if bit is None:
                return None
            self.low *= 2
            self.high = self.high * 2 + 1
            self.current = self.current * 2 + bit
            self.max_bit += 1
        delta = self.high - self.low + 1
        lo_idx, hi_idx = 0, len(cdf) - 1
        while True:  # encodec's recursive binary search, iteratively
            if hi_idx < lo_idx:
                raise ValueError("arithmetic decoding failed: the stream does not fit this language model")
            mid = (lo_idx + hi_idx) // 2
            range_low = cdf[mid - 1] if mid > 0 else 0
            range_high = cdf[mid] - 1
            low = int(math.ceil(range_low * (delta / (2 ** self.trb)))) + self.low
            high = int(math.floor(range_high * (delta / (2 ** self.trb)))) + self.low
            if self.current >= low:
                if self.current <= high:
                    break
                lo_idx = mid + 1
            else:
                hi_idx = mid - 1
        self.low, self.high = low, high
        while self.max_bit >= 0:
            b1, b2 = self.low >> self.max_bit, self.high >> self.max_bit
            if b1 != b2:
                break
            self.low -= b1 << self.max_bit
            self.high -= b1 << self.max_bit
            self.current -= b1 << self.max_bit
            self.max_bit -= 1
        return mid


# -- one segment ------------------------------------------------------------------------------------------
def encode_segment(lm: LMModel, codes: torch.Tensor) -> bytes:
    """Codes ``(K, T)`` of one segment -> its arithmetic-coded bytes (encodec's ``compress_to_file`` loop)."""
    K, T = codes.shape
    coder = ArithmeticCoder()
    states, offset = None, 0
    input_ = torch.zeros(1, K, 1, dtype=torch.long, device=codes.device)
    with torch.no_grad():
        for t in range(T):
            probas, states, offset = lm(input_, states, offset)
            input_ = 1 + codes[None, :, t:t + 1]
            for k, value in enumerate(codes[:, t].tolist()):
                coder.push(value, quantized_cdf(probas[0, :, k, 0], coder.trb).tolist())
    return coder.flush()


def decode_segment(lm: LMModel, read_byte, K: int, T: int, device="cpu") -> torch.Tensor:
    """The inverse of ``encode_segment``, reading bytes with ``read_byte`` (None at the end of the stream)."""
    decoder = ArithmeticDecoder(read_byte)
    states, offset = None, 0
    input_ = torch.zeros(1, K, 1, dtype=torch.long, device=device)
    frame = torch.zeros(1, K, T, dtype=torch.long, device=device)
    with torch.no_grad():
        for t in range(T):
            probas, states, offset = lm(input_, states, offset)
            for k in range(K):
                code = decoder.pull(quantized_cdf(probas[0, :, k, 0], decoder.trb).tolist())
                if code is None:
                    raise EOFError("the entropy-coded stream ended sooner than expected")
                frame[0, k, t] = code
            input_ = 1 + frame[:, :, t:t + 1]
    return frame
