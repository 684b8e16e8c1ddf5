"""``fastcodec.ResidualVectorQuantizer``: the drop-in, fast residual vector quantizer.

Same constructor, attributes, ``state_dict`` and results as audiocraft's (and our reference,
which it subclasses for its parameters, buffers and input checks); the work goes through
``fastcodec.ops`` (C++ on CPU, Triton on CUDA). With ``FASTCODEC_BACKEND=reference`` it runs the
reference code.

- ``encode`` / eval ``forward``: one fused op over all active layers (``rvq_encode`` / ``rvq_quantize``).
- ``decode``: one gather-sum op.
- training ``forward`` (and the first call of a k-means-initialised quantizer, as in audiocraft):
  layer by layer, in the reference's order of operations and of torch RNG draws (k-means init via the
  ``kmeans`` op, dead-code expiry, EMA via ``ema_update``), so with the same seed the buffers match the
  reference's to float32 rounding.

Under ``torch.distributed`` the default reproduces audiocraft (buffers broadcast from rank 0 after k-means
init and dead-code expiry; each rank's EMA sees its own batch). ``sync_ema=True`` makes the ranks update
the codebooks as one process would on the concatenated batch: one all-reduce of every layer's counts and
``embed_sum`` per step, k-means on the gathered sample (docs/distributed-training.md).
"""
from __future__ import annotations

import copy
import math
import warnings

import torch

from . import _backend, _cache, _hooks, ops
from . import _fused_train as _fused
from . import distributed as _dist
from .ops import rvq_cpp
from .reference import functional as Fq
from .reference.quantization import QuantizedResult
from .reference.quantization import ResidualVectorQuantizer as _ReferenceRVQ

_warned_dtypes: set = set()
_CODEBOOKS = _cache.TensorCache()


def _check_finite_codebooks(cb: torch.Tensor, first_layer: int = 0) -> None:
    """Refuse NaN/Inf codebook entries (the reference's argmax over NaN distances is not a defined answer)."""
    bad = ~torch.isfinite(cb).flatten(1).all(1)
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0]) + first_layer
        raise ValueError(f"vq.layers.{k}._codebook.embed holds NaN or Inf; a codebook must be finite "
                         f"(reload the state_dict or re-initialise the quantizer)")


class ResidualVectorQuantizer(_ReferenceRVQ):
    """Drop-in for ``audiocraft.quantization.ResidualVectorQuantizer`` (same arguments), plus:

    sync_ema: under ``torch.distributed``, synchronise the codebooks across the processes of
        ``process_group`` (default: the default group) so that N ranks update them exactly as one process
        on the concatenated batch would, and bitwise the same on every rank. Default False: audiocraft's
        behaviour. Not part of the ``state_dict``. Needs every rank of the group to call ``forward``
        in the same mode (training/eval) at each step, as DDP does.
    """

    def __init__(self, *args, sync_ema: bool = False, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(sync_ema, bool):
            raise TypeError(f"sync_ema must be a bool, got {type(sync_ema).__name__}")
        if process_group is not None and not sync_ema:
            raise ValueError("process_group is only used with sync_ema=True")
        self.sync_ema = sync_ema
        self.process_group = process_group

    def _sync_group(self):
        """The group to synchronise over, or False when the step runs as a single process."""
        if not self.sync_ema:
            return False
        if isinstance(self.process_group, str):
            raise RuntimeError("this quantizer was pickled with a process_group, which belongs to the process "
                               "that made it; set `.process_group` to a group of this process")
        if _dist.world_size(self.process_group) == 1:
            return False
        return self.process_group

    # -- helpers ---------------------------------------------------------------------------

    def _use_reference(self) -> bool:
        embed = self.vq.layers[0]._codebook.embed
        if torch.compiler.is_compiling():
            return False  # the custom ops choose their backend at run time, inside the op
        if _backend.choose("rvq", embed.device) == "reference":
            return True
        if embed.dtype != torch.float32:
            if embed.dtype not in _warned_dtypes:
                _warned_dtypes.add(embed.dtype)
                warnings.warn(f"fastcodec: the RVQ kernels are float32-only; a {embed.dtype} quantizer "
                              "runs the reference code", RuntimeWarning, stacklevel=3)
            return True
        return False

    def _codebooks(self, n_q: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked codebooks (n_q, bins, D) and norms |e|^2 (n_q, bins), rebuilt whenever an embed buffer
        changed in any way (fastcodec._cache: identity, version and content). Non-finite codebooks raise."""
        # list() first: slicing the ModuleList builds a new module (20 us of a streamed frame's ~0.2 ms)
        embeds = [layer._codebook.embed for layer in list(self.vq.layers)[:n_q]]

        def make():
            with torch.no_grad(), torch.inference_mode(False):
                cb = torch.stack([e.detach() for e in embeds]).contiguous()
                if not torch.compiler.is_compiling():
                    _check_finite_codebooks(cb)
                    if cb.device.type == "cpu":  # private, never written: few-row encodes may pack it once
                        rvq_cpp.register_immutable_codebooks(cb)
                return cb, cb.pow(2).sum(-1).contiguous()

        if torch.compiler.is_compiling():
            return make()
        memo = self.__dict__.get("_fc_memo")
        if memo is None:
            memo = self.__dict__["_fc_memo"] = _cache.Memo()
        return memo.get(_CODEBOOKS, embeds, make)

    def __getstate__(self):  # the memo holds tensors of this module: never copied or pickled
        state = {k: v for k, v in self.__dict__.items() if k not in ("_fc_memo", _fused.STATE)}
        if state.get("process_group") is not None:  # cannot be pickled: the unpickled module asks for one
            state["process_group"] = "detached"
        return state

    def __deepcopy__(self, memo):  # as nn.Module's, but a copy shares the process group (it cannot be copied)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__({k: v if k == "process_group" else copy.deepcopy(v, memo)
                          for k, v in self.__dict__.items() if k not in ("_fc_memo", _fused.STATE)})
        return new

    def _check_x(self, x) -> None:
        if torch.compiler.is_compiling():
            return  # shape/dtype/NaN checks run inside the op (data-dependent checks cannot be traced)
        super()._check_x(x)

    # -- public API ------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, D, T) -> codes (B, num_codebooks, T) int64."""
        if self._use_reference():
            return super().encode(x)
        self._check_x(x)
        cb, norms = self._codebooks(self.n_q)
        return ops.rvq_encode(x.detach().contiguous(), cb, norms)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (B, K, T) integers in [0, bins), 1 <= K <= total_codebooks -> (B, D, T)."""
        if self._use_reference():
            return super().decode(codes)
        if not torch.compiler.is_compiling():
            codes = Fq.check_codes(codes, self.max_n_q, self.bins, self.vq.layers[0].codebook.device)
        cb, _ = self._codebooks(codes.shape[1])
        return ops.rvq_decode(codes.contiguous(), cb)

    def forward(self, x: torch.Tensor, frame_rate: float) -> QuantizedResult:
        """x: (B, D, T), frame_rate in Hz -> QuantizedResult(x, codes (B, n_q, T), bandwidth, penalty)."""
        group = self._sync_group()
        if group is not False and (_hooks.has_inner_hooks(self) or self._use_reference()):
            raise RuntimeError("sync_ema=True runs fastcodec's layer loop (float32, fastcodec backends); it "
                               "cannot run the reference code or hooks on inner modules")
        if group is False and (self._use_reference() or _hooks.has_inner_hooks(self)):
            return super().forward(x, frame_rate)  # hooks on inner modules fire there
        # the fused step updates each rank's EMA alone: with sync_ema the synced layer loop runs instead
        fused = (group is False and self.training and isinstance(x, torch.Tensor)
                 and self._fused_step_ok(x, self.n_q))
        if fused:  # no host sync: NaN/Inf in x is flagged on the device (fastcodec/_devcheck.py)
            embed = self.vq.layers[0].codebook
            Fq.check_latent(x, self.dimension, embed.dtype, embed.device, finite=False)
        else:
            self._check_x(x)
        Fq.check_frame_rate(frame_rate)
        n_q = self.n_q
        if self.training and self.q_dropout:
            n_q = int(torch.randint(1, self.n_q + 1, (1,)).item())  # CPU generator: no device sync
            if group is not False:  # every rank must run (and all-reduce) the same layers: rank 0 decides
                n_q = _dist.broadcast_int(n_q, x.device, group)
        if fused:
            return _fused.train_step(self, x, n_q, n_q * math.log2(self.bins) * frame_rate / 1000)
        bw = torch.tensor(n_q * math.log2(self.bins) * frame_rate / 1000).to(x)
        layers = self.vq.layers[:n_q]
        if self.training or not all(bool(layer._codebook.inited) for layer in layers):
            if group is not False:
                return self._forward_layers_synced(x, n_q, bw, group)
            return self._forward_layers(x, n_q, bw)
        cb, norms = self._codebooks(n_q)
        codes, quantized, _ = ops.rvq_quantize(x.detach().contiguous(), cb, norms, False)
        # audiocraft: every layer's loss is tensor([0.]) outside training; the penalty is their mean
        penalty = torch.zeros(n_q, 1, device=x.device).mean()
        return QuantizedResult(quantized, codes, bw, penalty=penalty)

    def _fused_step_ok(self, x: torch.Tensor, n_q: int) -> bool:
        """Whether the training step runs fused (fastcodec/_fused_train.py): the Triton backend, float32,
        eager, no orthogonal penalty (it needs torch.unique), every active codebook initialised."""
        if torch.compiler.is_compiling() or _backend.choose("rvq", x.device) != "triton":
            return False
        layers = list(self.vq.layers)[:n_q]
        if any(layer.orthogonal_reg_weight > 0 for layer in layers):
            return False
        return _fused.all_inited(self, layers)

    def _forward_layers(self, x: torch.Tensor, n_q: int, bw: torch.Tensor) -> QuantizedResult:
        B, D, T = x.shape
        training = self.training
        residual = x.detach().contiguous()
        ident = x - x.detach()  # zero-valued; gives the commitment loss its gradient to x
        quantized_out, all_codes, losses = None, [], []
        for layer in self.vq.layers[:n_q]:
            cbk = layer._codebook
            samples = residual.transpose(1, 2).reshape(B * T, D)
            if not bool(cbk.inited):
                init = Fq.sample_vectors(samples, cbk.codebook_size)
                means, counts = ops.kmeans(samples.contiguous(), init.contiguous(), cbk.kmeans_iters)
                with torch.no_grad():  # not through .data: the writes must bump the buffers' version counters
                    cbk.embed.copy_(means)
                    cbk.embed_avg.copy_(means)
                    cbk.cluster_size.copy_(counts)
                    cbk.inited.fill_(1.0)
                    _dist.broadcast_buffers(cbk.buffers())  # audiocraft under torch.distributed: rank 0's
            cb = cbk.embed.detach().unsqueeze(0).contiguous()
            if not torch.compiler.is_compiling():
                _check_finite_codebooks(cb, len(all_codes))
            codes, q, _ = ops.rvq_quantize(residual, cb, cb.pow(2).sum(-1), False)
            if training:
                # dead-code expiry: audiocraft overwrites the replaced codes in the EMA step of the
                # same call, so only its RNG draw is observable; make the same draw.
                if cbk.threshold_ema_dead_code > 0 and bool((cbk.cluster_size < cbk.threshold_ema_dead_code).any()):
                    Fq.sample_vectors(samples, cbk.codebook_size)
                    with torch.no_grad():  # audiocraft under torch.distributed: rank 0's buffers, then this EMA
                        _dist.broadcast_buffers(cbk.buffers())
                with torch.no_grad():  # in place on the buffers (not .data): their version counters move
                    ops.ema_update(residual.unsqueeze(0), codes, cbk.cluster_size.unsqueeze(0),
                                   cbk.embed_avg.unsqueeze(0), cbk.embed.unsqueeze(0),
                                   float(cbk.decay), float(cbk.epsilon))
                q = residual + (q - residual)  # the value of audiocraft's straight-through output
                loss = torch.zeros(1, device=x.device, requires_grad=True)
                if layer.commitment_weight > 0:
                    r = residual + ident  # value: the residual; gradient: identity to x
                    loss = loss + Fq.commitment_loss(r.transpose(1, 2), q.transpose(1, 2)) * layer.commitment_weight
                if layer.orthogonal_reg_weight > 0:
                    loss = loss + layer._orthogonal_penalty(codes[:, 0], x.device) * layer.orthogonal_reg_weight
            else:
                loss = torch.zeros(1, device=x.device)
            losses.append(loss)
            all_codes.append(codes)
            residual = residual - q
            quantized_out = q if quantized_out is None else quantized_out + q
        if training:
            quantized_out = x + (quantized_out - x).detach()
        return QuantizedResult(quantized_out, torch.cat(all_codes, dim=1), bw,
                               penalty=torch.mean(torch.stack(losses)))

    def _forward_layers_synced(self, x: torch.Tensor, n_q: int, bw: torch.Tensor, group) -> QuantizedResult:
        """``_forward_layers`` with the codebooks synchronised over ``group`` (``sync_ema=True``, > 1 process).

        The same operations and torch RNG draws as one process on the concatenated batch (rank order):
        - k-means runs on the sample gathered from all ranks; every rank draws and iterates (so the RNG
          streams stay those of one process), then rank 0's result is broadcast so the ranks agree bitwise
          whatever their seeds;
        - each layer's counts and ``embed_sum`` come from the EMA kernel itself (``ema_update`` with
          ``decay=0`` into zeroed rows: exactly the counts and the sums), and all layers travel in one
          all-reduce after the loop. That is the single-process result because layer k+1's input uses layer
          k's codewords from before its update. On a call that runs k-means the layers are reduced one by one
          instead, so that every RNG draw keeps its single-process order;
        - dead-code expiry only draws from the RNG (audiocraft's EMA step overwrites the replaced codes in
          the same call), over the total number of frames; the decision reads the synchronised
          ``cluster_size``, so every rank takes the same one;
        - the orthogonal penalty is measured on the updated codebook, as in audiocraft.
        """
        B, D, T = x.shape
        N, bins = B * T, self.bins
        training = self.training
        layers = list(self.vq.layers)[:n_q]
        per_layer = not all(bool(layer._codebook.inited) for layer in layers)
        stats = _dist.EmaStats(1 if per_layer else n_q, bins, D, x.device) if training else None
        scratch = x.new_zeros((1, bins, D), dtype=torch.float32) if training else None  # written: kept finite for the checks
        residual = x.detach().contiguous()
        ident = x - x.detach()  # zero-valued; gives the commitment loss its gradient to x
        quantized_out, all_codes, losses, pending = None, [], [], []
        for k, layer in enumerate(layers):
            cbk = layer._codebook
            samples = residual.transpose(1, 2).reshape(N, D)
            if not bool(cbk.inited):
                everyone = _dist.gather_rows(samples, group)
                init = Fq.sample_vectors(everyone, cbk.codebook_size)
                means, counts = ops.kmeans(everyone.contiguous(), init.contiguous(), cbk.kmeans_iters)
                # counts < 2^24 per code are exact in float32: one broadcast for both
                packed = _dist.broadcast_(torch.cat([means.reshape(-1), counts.to(means.dtype)]), group)
                with torch.no_grad():
                    cbk.embed.copy_(packed[: means.numel()].view_as(means))
                    cbk.embed_avg.copy_(cbk.embed)
                    cbk.cluster_size.copy_(packed[means.numel():])
                    cbk.inited.fill_(1.0)
            cb = cbk.embed.detach().unsqueeze(0).contiguous()
            if not torch.compiler.is_compiling():
                _check_finite_codebooks(cb, k)
            codes, q, _ = ops.rvq_quantize(residual, cb, cb.pow(2).sum(-1), False)
            if training:
                j = len(pending)
                with torch.no_grad():  # decay 0 into zeroed rows: counts and embed_sum, the kernel's own sums
                    ops.ema_update(residual.unsqueeze(0), codes, stats.counts[j: j + 1], stats.sums[j: j + 1],
                                   scratch, 0.0, float(cbk.epsilon))
                pending.append((k, codes))
                q = residual + (q - residual)  # the value of audiocraft's straight-through output
                loss = torch.zeros(1, device=x.device, requires_grad=True)
                if layer.commitment_weight > 0:
                    r = residual + ident  # value: the residual; gradient: identity to x
                    loss = loss + Fq.commitment_loss(r.transpose(1, 2), q.transpose(1, 2)) * layer.commitment_weight
            else:
                loss = torch.zeros(1, device=x.device)
            losses.append(loss)
            all_codes.append(codes)
            residual = residual - q
            quantized_out = q if quantized_out is None else quantized_out + q
            if training and (per_layer or k == n_q - 1):
                self._apply_synced_ema(stats, pending, losses, N, group)
                pending = []
        if training:
            quantized_out = x + (quantized_out - x).detach()
        return QuantizedResult(quantized_out, torch.cat(all_codes, dim=1), bw,
                               penalty=torch.mean(torch.stack(losses)))

    def _apply_synced_ema(self, stats, pending, losses, frames: int, group) -> None:
        """All-reduce ``stats`` (layers ``pending``, in order), then per layer: the expiry draw, the EMA step
        with the group's counts and sums (the EMA kernel's float32 arithmetic), the orthogonal penalty."""
        total = stats.all_reduce(frames, group)
        for j, (k, codes) in enumerate(pending):
            layer = self.vq.layers[k]
            cbk = layer._codebook
            if cbk.threshold_ema_dead_code > 0 and bool((cbk.cluster_size < cbk.threshold_ema_dead_code).any()):
                Fq.sample_vectors(stats.buf.new_empty((total, 0)), cbk.codebook_size)  # only the draw is observable
            decay, bins = float(cbk.decay), cbk.codebook_size
            with torch.no_grad():  # in place on the buffers (not .data): their version counters move
                # fma(x, 1 - decay, buf * decay), as the kernels (and torch's add_ with alpha) compute it
                cbk.cluster_size.mul_(decay).add_(stats.counts[j], alpha=1.0 - decay)
                cbk.embed_avg.mul_(decay).add_(stats.sums[j], alpha=1.0 - decay)
                n = cbk.cluster_size.double().sum().float()  # the C++ kernel sums in float64, rounds once
                smoothed = (cbk.cluster_size + float(cbk.epsilon)) / (n + bins * float(cbk.epsilon)) * n
                cbk.embed.copy_(cbk.embed_avg / smoothed.unsqueeze(1))
            if layer.orthogonal_reg_weight > 0:
                penalty = layer._orthogonal_penalty(codes[:, 0], codes.device)
                losses[k] = losses[k] + penalty * layer.orthogonal_reg_weight
        stats.buf.zero_()
