"""Faithful PyTorch reference of audiocraft 1.3.0's residual vector quantizer.

Same constructor arguments, attribute names, state_dict keys
(``vq.layers.{i}._codebook.{inited,cluster_size,embed,embed_avg}``), arithmetic and use of torch's
RNG as ``audiocraft.quantization.ResidualVectorQuantizer``, so outputs, codes, buffers and gradients
are bit-identical to it on the same machine. Checkpoints of encodec 0.1.1's quantizer (same keys)
load too. Tensors: latents ``x: (batch, dim, time)``, codes ``(batch, n_q, time)`` int64.

One audiocraft quirk is kept on purpose: dead-code expiry writes sampled vectors into ``embed``, and
the EMA step of the same call overwrites them, so expiry only consumes the RNG. Under
``torch.distributed`` the buffers are broadcast from rank 0 after k-means init and after expiry, as
audiocraft does (``broadcast_tensors``); each rank's EMA step still sees only its own batch.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from . import functional as Fq


@dataclass
class QuantizedResult:
    """x: (B, D, T) the quantized latent; codes: (B, K, T); bandwidth: scalar kbps tensor;
    penalty: scalar commitment (+ orthogonal) loss."""

    x: torch.Tensor
    codes: torch.Tensor
    bandwidth: torch.Tensor
    penalty: Optional[torch.Tensor] = None
    metrics: dict = field(default_factory=dict)


def broadcast_tensors(tensors, src: int = 0) -> None:
    """audiocraft's ``flashy.distrib.broadcast_tensors``: under ``torch.distributed`` with more than one
    process, check that every rank passes the same number of float tensors (one all-reduce), then
    broadcast each from ``src`` in place. A no-op otherwise."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() == 1:
        return
    tensors = [t for t in tensors if torch.is_floating_point(t) or torch.is_complex(t)]
    if not tensors:
        return
    n = torch.tensor([len(tensors)], device=tensors[0].device, dtype=torch.long)
    torch.distributed.all_reduce(n)
    if n.item() != len(tensors) * torch.distributed.get_world_size():
        raise RuntimeError("broadcast_tensors: the ranks hold different numbers of tensors "
                           "(they took different code paths, e.g. different dead-code expiry decisions)")
    handles = [torch.distributed.broadcast(t.data, src=src, async_op=True) for t in tensors]
    for h in handles:
        h.wait()


def _uniform_init(*shape: int) -> torch.Tensor:
    t = torch.empty(shape)
    nn.init.kaiming_uniform_(t)
    return t


class EuclideanCodebook(nn.Module):
    """One codebook of ``codebook_size`` vectors of size ``dim``, updated by EMA in training.

    Buffers: ``inited`` (1,), ``cluster_size`` (bins,), ``embed`` (bins, dim), ``embed_avg`` (bins, dim).
    With ``kmeans_init`` the codebook starts at zero and is set by k-means on the first forward call
    (in training or eval mode); otherwise it starts Kaiming-uniform.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        decay: float = 0.8,
        epsilon: float = 1e-5,
        threshold_ema_dead_code: int = 2,
    ):
        super().__init__()
        self.decay = decay
        embed = torch.zeros(codebook_size, dim) if kmeans_init else _uniform_init(codebook_size, dim)
        self.codebook_size = codebook_size
        self.kmeans_iters = kmeans_iters
        self.epsilon = epsilon
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.register_buffer("inited", torch.Tensor([not kmeans_init]))
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed", embed)
        self.register_buffer("embed_avg", embed.clone())

    @torch.no_grad()
    def init_embed_(self, data: torch.Tensor) -> None:
        """k-means on ``data: (N, dim)`` once: sets embed, embed_avg, cluster_size, inited."""
        if self.inited:
            return
        embed, cluster_size = Fq.kmeans(data, self.codebook_size, self.kmeans_iters)
        self.embed.data.copy_(embed)
        self.embed_avg.data.copy_(embed)
        self.cluster_size.data.copy_(cluster_size)
        self.inited.data.fill_(1.0)
        broadcast_tensors(self.buffers())  # audiocraft: rank 0's k-means wins under torch.distributed

    def replace_(self, samples: torch.Tensor, mask: torch.Tensor) -> None:
        """Overwrite the codewords where ``mask: (bins,)`` is set with rows sampled from ``samples: (N, dim)``."""
        sampled = Fq.sample_vectors(samples, self.codebook_size)
        self.embed.data.copy_(torch.where(mask[..., None], sampled, self.embed))

    def expire_codes_(self, batch_samples: torch.Tensor) -> None:
        """Replace codewords whose EMA cluster size is below ``threshold_ema_dead_code``."""
        if self.threshold_ema_dead_code == 0:
            return
        expired = self.cluster_size < self.threshold_ema_dead_code
        if not torch.any(expired):
            return
        self.replace_(batch_samples.reshape(-1, batch_samples.shape[-1]), mask=expired)
        broadcast_tensors(self.buffers())  # audiocraft: rank 0's buffers before this rank's EMA step

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return Fq.nearest_codes(x, self.embed)

    def postprocess_emb(self, embed_ind: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return embed_ind.view(*shape[:-1])

    def dequantize(self, embed_ind: torch.Tensor) -> torch.Tensor:
        return F.embedding(embed_ind, self.embed)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) -> codes (...) int64."""
        return self.postprocess_emb(self.quantize(self.preprocess(x)), x.shape)

    def decode(self, embed_ind: torch.Tensor) -> torch.Tensor:
        """codes (...) -> codewords (..., dim)."""
        return self.dequantize(embed_ind)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (..., dim) -> codewords (..., dim) from the codebook before this call's update, codes (...)."""
        shape = x.shape
        x = self.preprocess(x)
        self.init_embed_(x)
        flat_ind = self.quantize(x)
        embed_ind = self.postprocess_emb(flat_ind, shape)
        quantize = self.dequantize(embed_ind)
        if self.training:
            self.expire_codes_(x)
            Fq.ema_update_(x, flat_ind, self.cluster_size, self.embed_avg, self.embed, self.decay, self.epsilon)
        return quantize, embed_ind


class VectorQuantization(nn.Module):
    """One quantizer layer: optional projection, a Euclidean codebook, straight-through estimator,
    commitment loss and optional orthogonal regularisation.

    forward: x (B, dim, T) (or (B, T, dim) with ``channels_last``) -> quantized (same shape),
    codes (B, T), loss (1,).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: Optional[int] = None,
        decay: float = 0.8,
        epsilon: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: int = 2,
        channels_last: bool = False,
        commitment_weight: float = 1.0,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_active_codes_only: bool = False,
        orthogonal_reg_max_codes: Optional[int] = None,
    ):
        super().__init__()
        cb_dim = dim if codebook_dim is None else codebook_dim
        project = cb_dim != dim
        self.project_in = nn.Linear(dim, cb_dim) if project else nn.Identity()
        self.project_out = nn.Linear(cb_dim, dim) if project else nn.Identity()
        self.epsilon = epsilon
        self.commitment_weight = commitment_weight
        self.orthogonal_reg_weight = orthogonal_reg_weight
        self.orthogonal_reg_active_codes_only = orthogonal_reg_active_codes_only
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self._codebook = EuclideanCodebook(
            dim=cb_dim,
            codebook_size=codebook_size,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            decay=decay,
            epsilon=epsilon,
            threshold_ema_dead_code=threshold_ema_dead_code,
        )
        self.codebook_size = codebook_size
        self.channels_last = channels_last

    @property
    def codebook(self) -> torch.Tensor:
        return self._codebook.embed

    @property
    def inited(self) -> torch.Tensor:
        return self._codebook.inited

    def _preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.channels_last else x.transpose(1, 2)

    def _postprocess(self, quantize: torch.Tensor) -> torch.Tensor:
        return quantize if self.channels_last else quantize.transpose(1, 2)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, dim, T) -> codes (B, T)."""
        return self._codebook.encode(self.project_in(self._preprocess(x)))

    def decode(self, embed_ind: torch.Tensor) -> torch.Tensor:
        """codes (B, T) -> (B, dim, T)."""
        return self._postprocess(self.project_out(self._codebook.decode(embed_ind)))

    def _orthogonal_penalty(self, embed_ind: torch.Tensor, device: torch.device) -> torch.Tensor:
        codebook = self.codebook
        if self.orthogonal_reg_active_codes_only:
            codebook = codebook[torch.unique(embed_ind)]
        num_codes = codebook.shape[0]
        if self.orthogonal_reg_max_codes is not None and num_codes > self.orthogonal_reg_max_codes:
            codebook = codebook[torch.randperm(num_codes, device=device)[: self.orthogonal_reg_max_codes]]
        return Fq.orthogonal_loss(codebook)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = x.device
        x = self.project_in(self._preprocess(x))
        quantize, embed_ind = self._codebook(x)
        if self.training:
            quantize = x + (quantize - x).detach()
        loss = torch.tensor([0.0], device=device, requires_grad=self.training)
        if self.training:
            if self.commitment_weight > 0:
                loss = loss + Fq.commitment_loss(x, quantize) * self.commitment_weight
            if self.orthogonal_reg_weight > 0:
                # measured on the codebook after this call's EMA step, as audiocraft does
                loss = loss + self._orthogonal_penalty(embed_ind, device) * self.orthogonal_reg_weight
        return self._postprocess(self.project_out(quantize)), embed_ind, loss


class ResidualVectorQuantization(nn.Module):
    """A stack of ``num_quantizers`` VectorQuantization layers, each quantizing the previous residual."""

    def __init__(self, *, num_quantizers: int, **kwargs):
        super().__init__()
        self.layers = nn.ModuleList([VectorQuantization(**kwargs) for _ in range(num_quantizers)])

    def forward(self, x: torch.Tensor, n_q: Optional[int] = None):
        """x: (B, D, T) -> quantized (B, D, T), codes (n_q, B, T), losses (n_q, 1).

        ``n_q`` None or 0 means all layers. In training the output is ``x + (sum - x).detach()``, so
        the gradient reaches x once, not through every layer (encodec issue #25).
        """
        quantized_out = 0.0
        residual = x
        losses, indices = [], []
        n_q = n_q or len(self.layers)
        for layer in self.layers[:n_q]:
            quantized, idx, loss = layer(residual)
            quantized = quantized.detach()
            residual = residual - quantized
            quantized_out = quantized_out + quantized
            indices.append(idx)
            losses.append(loss)
        if self.training:
            quantized_out = x + (quantized_out - x).detach()
        return quantized_out, torch.stack(indices), torch.stack(losses)

    def encode(self, x: torch.Tensor, n_q: Optional[int] = None) -> torch.Tensor:
        """x: (B, D, T) -> codes (n_q, B, T)."""
        residual = x
        indices = []
        for layer in self.layers[: n_q or len(self.layers)]:
            idx = layer.encode(residual)
            residual = residual - layer.decode(idx)
            indices.append(idx)
        return torch.stack(indices)

    def decode(self, q_indices: torch.Tensor) -> torch.Tensor:
        """codes (K, B, T) with K <= number of layers -> (B, D, T)."""
        quantized_out = torch.tensor(0.0, device=q_indices.device)
        for i, idx in enumerate(q_indices):
            quantized_out = quantized_out + self.layers[i].decode(idx)
        return quantized_out


def _check_int(name: str, v, least: int) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < least:
        raise ValueError(f"{name} must be >= {least}, got {v}")


class ResidualVectorQuantizer(nn.Module):
    """Residual vector quantizer (audiocraft's ``ResidualVectorQuantizer``), with input checks.

    Args: dimension (codebook dim D), n_q (layers K), q_dropout (train with a random number of
    layers in [1, n_q], drawn once per batch), bins (codebook size), decay (EMA), kmeans_init,
    kmeans_iters, threshold_ema_dead_code, orthogonal_reg_weight, orthogonal_reg_active_codes_only,
    orthogonal_reg_max_codes.
    forward(x (B, D, T), frame_rate) -> QuantizedResult(x (B, D, T), codes (B, K, T), bandwidth, penalty);
    encode(x) -> codes (B, num_codebooks, T); decode(codes (B, K, T), K <= total_codebooks) -> (B, D, T).
    """

    def __init__(
        self,
        dimension: int = 256,
        n_q: int = 8,
        q_dropout: bool = False,
        bins: int = 1024,
        decay: float = 0.99,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: int = 2,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_active_codes_only: bool = False,
        orthogonal_reg_max_codes: Optional[int] = None,
    ):
        super().__init__()
        _check_int("dimension", dimension, 1)
        _check_int("n_q", n_q, 1)
        _check_int("bins", bins, 1)
        _check_int("kmeans_iters", kmeans_iters, 0)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        if threshold_ema_dead_code < 0:
            raise ValueError(f"threshold_ema_dead_code must be >= 0, got {threshold_ema_dead_code}")
        if orthogonal_reg_max_codes is not None:
            _check_int("orthogonal_reg_max_codes", orthogonal_reg_max_codes, 1)
        self.max_n_q = n_q
        self.n_q = n_q
        self.q_dropout = q_dropout
        self.dimension = dimension
        self.bins = bins
        self.decay = decay
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.orthogonal_reg_weight = orthogonal_reg_weight
        self.orthogonal_reg_active_codes_only = orthogonal_reg_active_codes_only
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self.vq = ResidualVectorQuantization(
            dim=dimension,
            codebook_size=bins,
            num_quantizers=n_q,
            decay=decay,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            threshold_ema_dead_code=threshold_ema_dead_code,
            orthogonal_reg_weight=orthogonal_reg_weight,
            orthogonal_reg_active_codes_only=orthogonal_reg_active_codes_only,
            orthogonal_reg_max_codes=orthogonal_reg_max_codes,
            channels_last=False,
        )

    def codebooks(self) -> torch.Tensor:
        """All layers' codewords stacked: (total_codebooks, bins, dimension) (a copy)."""
        return torch.stack([layer.codebook for layer in self.vq.layers])

    def _check_x(self, x) -> None:
        embed = self.vq.layers[0].codebook
        Fq.check_latent(x, self.dimension, embed.dtype, embed.device)

    def forward(self, x: torch.Tensor, frame_rate: float) -> QuantizedResult:
        """x: (B, D, T), frame_rate in Hz -> QuantizedResult; bandwidth = n_q * log2(bins) * frame_rate / 1000."""
        self._check_x(x)
        Fq.check_frame_rate(frame_rate)
        n_q = self.n_q
        if self.training and self.q_dropout:
            n_q = int(torch.randint(1, self.n_q + 1, (1,)).item())
        bw_per_q = math.log2(self.bins) * frame_rate / 1000
        quantized, codes, commit_loss = self.vq(x, n_q=n_q)
        bw = torch.tensor(n_q * bw_per_q).to(x)
        return QuantizedResult(quantized, codes.transpose(0, 1), bw, penalty=torch.mean(commit_loss))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, D, T) -> codes (B, num_codebooks, T) int64."""
        self._check_x(x)
        return self.vq.encode(x, n_q=self.n_q).transpose(0, 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (B, K, T), 1 <= K <= total_codebooks, values in [0, bins) -> (B, D, T)."""
        codes = Fq.check_codes(codes, self.max_n_q, self.bins, self.vq.layers[0].codebook.device)
        return self.vq.decode(codes.transpose(0, 1))

    @property
    def total_codebooks(self) -> int:
        return self.max_n_q

    @property
    def num_codebooks(self) -> int:
        return self.n_q

    def set_num_codebooks(self, n: int) -> None:
        """Use the first ``n`` layers (1 <= n <= total_codebooks) in forward and encode."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"number of codebooks must be an int, got {type(n).__name__}")
        if not 1 <= n <= self.max_n_q:
            raise ValueError(f"number of codebooks must be in [1, {self.max_n_q}], got {n}")
        self.n_q = int(n)
