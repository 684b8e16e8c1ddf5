"""The fused RVQ training step (the Triton backend: CUDA, or CPU under ``TRITON_INTERPRET=1``).

One launch quantizes all K layers with audiocraft's training arithmetic (``fastcodec::rvq_quantize_train``);
one deterministic launch sequence updates all K codebooks (``fastcodec::ema_update``: stable sort and
searchsorted on the device, segmented sums, normalisation). Nothing in the step reads a device tensor on
the host:

- input checks are asynchronous (``fastcodec._devcheck``): NaN/Inf in x or a codebook sets a device error
  word that makes the EMA kernels skip their writes, and the next step (or ``fastcodec.check_errors()``)
  raises the ValueError;
- ``inited`` is read once per buffer version (the first step after a load or an init), then trusted;
- dead-code expiry only consumes torch's RNG here (audiocraft overwrites the replaced codes in the same
  step's EMA), and whether it draws depends on ``cluster_size < threshold``, which the previous step
  computed on the device and copied to host memory asynchronously; the step waits for that copy's event,
  recorded right after the previous EMA, so the GPU never drains its queue. Any other change of a
  ``cluster_size`` (load, optimizer, copy) is seen through its version counter and read directly.

Bit-identical to the layer-by-layer path of the same backend (buffers, codes, output, penalty).
"""
from __future__ import annotations

import torch

from . import _devcheck, ops
from .reference import functional as Fq
from .reference.quantization import QuantizedResult

STATE = "_fc_fused"  # module __dict__ key: host-side knowledge (never copied or pickled)


def _key(t: torch.Tensor) -> tuple:
    return id(t), t.data_ptr(), t._version, t.device


def _state(module) -> dict:
    st = module.__dict__.get(STATE)
    if st is None:
        st = module.__dict__[STATE] = {"inited": {}, "expired": None}
    return st


def all_inited(module, layers) -> bool:
    """Whether every layer's codebook is initialised, reading each ``inited`` buffer once per version."""
    seen = _state(module)["inited"]
    for layer in layers:
        b = layer._codebook.inited
        if seen.get(id(b)) != _key(b):
            if not bool(b):  # a host read, only when the buffer is new or was written
                return False
            seen[id(b)] = _key(b)
    return True


def _expired(module, cbks, threshold_layers: list[int]) -> list[bool]:
    """Per layer in ``threshold_layers``: does any cluster_size fall below the layer's threshold?"""
    lag = _state(module)["expired"]
    keys = [_key(cbks[k].cluster_size) for k in threshold_layers]
    if lag is not None and lag[0] == keys:
        host, ev = lag[1], lag[2]
        if ev is not None:
            ev.synchronize()  # recorded right after the previous EMA: long done, or the GPU's queue stays full
        return [bool(v) for v in host.numpy()[: len(keys)]]  # host memory
    flags = torch.stack([(cbks[k].cluster_size < cbks[k].threshold_ema_dead_code).any() for k in threshold_layers])
    return [bool(v) for v in flags.cpu().numpy()]  # the first step after a change: one read for all layers


def _publish_expired(module, cbks, threshold_layers: list[int]) -> None:
    if not threshold_layers:
        _state(module)["expired"] = None
        return
    flags = torch.stack([(cbks[k].cluster_size < cbks[k].threshold_ema_dead_code).any() for k in threshold_layers])
    if flags.device.type == "cuda":
        host = torch.empty(flags.shape, dtype=torch.bool, pin_memory=True)
        host.copy_(flags, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(flags.device))
    else:
        host, ev = flags.clone(), None
    _state(module)["expired"] = ([_key(cbks[k].cluster_size) for k in threshold_layers],
                                 _devcheck.host_buffer(host), ev)


def train_step(module, x: torch.Tensor, n_q: int, bandwidth: float) -> QuantizedResult:
    """The training forward of ``fastcodec.ResidualVectorQuantizer`` for ``n_q`` initialised layers."""
    dev = x.device
    layers = list(module.vq.layers)[:n_q]
    cbks = [layer._codebook for layer in layers]
    _devcheck.raise_pending(dev)  # a failed check of an earlier step whose result has arrived
    with _devcheck.deferred(dev) as word, torch.no_grad():
        residual = x.detach().contiguous()
        cb = torch.stack([c.embed.detach() for c in cbks])  # (K, bins, D)
        _devcheck.flag_layers(word, ~torch.isfinite(cb).flatten(1).all(1))
        codes, q_sum, res = ops.rvq_quantize_train(residual, cb, cb.pow(2).sum(-1))
        # each layer's straight-through value r + (e - r), exactly as the kernel formed it
        e = cb[torch.arange(n_q, device=dev).view(n_q, 1, 1), codes.transpose(0, 1)]  # (K, B, T, D)
        q_layers = res + (e.permute(0, 1, 3, 2) - res)  # (K, B, D, T)
        # dead-code expiry: the reference's RNG draws, in layer order (their values are overwritten by the EMA)
        thr = [k for k, c in enumerate(cbks) if c.threshold_ema_dead_code > 0]
        samples = residual.transpose(1, 2).reshape(-1, residual.shape[1])
        for k, hit in zip(thr, _expired(module, cbks, thr)):
            if hit:
                Fq.sample_vectors(samples, cbks[k].codebook_size)
        bufs = [torch.stack([getattr(c, n) for c in cbks]) for n in ("cluster_size", "embed_avg", "embed")]
        decays, epss = {float(c.decay) for c in cbks}, {float(c.epsilon) for c in cbks}
        if len(decays) == 1 and len(epss) == 1:
            ops.ema_update(res, codes, *bufs, decays.pop(), epss.pop())
        else:  # layers with different hyper-parameters: one launch sequence per layer
            for k, c in enumerate(cbks):
                ops.ema_update(res[k:k + 1], codes[:, k:k + 1].contiguous(), *(b[k:k + 1] for b in bufs),
                               float(c.decay), float(c.epsilon))
        for i, n in enumerate(("cluster_size", "embed_avg", "embed")):
            torch._foreach_copy_([getattr(c, n) for c in cbks], list(bufs[i].unbind(0)))
        _publish_expired(module, cbks, thr)
        _devcheck.publish(dev)
    ident = x - x.detach()  # zero-valued; gives the commitment loss its gradient to x
    losses = []
    for k, layer in enumerate(layers):
        loss = torch.zeros(1, device=dev, requires_grad=True)
        if layer.commitment_weight > 0:
            r = res[k] + ident
            loss = loss + Fq.commitment_loss(r.transpose(1, 2), q_layers[k].transpose(1, 2)) * layer.commitment_weight
        losses.append(loss)
    quantized = x + (q_sum - x).detach()
    bw = torch.full((), bandwidth, dtype=x.dtype, device=dev)
    return QuantizedResult(quantized, codes, bw, penalty=torch.mean(torch.stack(losses)))
