"""``fastcodec.patch(model)`` / ``fastcodec.unpatch(model)``: speed up a codec you already hold, in place.

(This module is ``fastcodec.patching``: a module named ``patch`` would be shadowed by the function.)

Accepted (found recursively through ``.compression_model`` and ``.model``, so a MusicGen/AudioGen object,
audiocraft's ``HFEncodecCompressionModel`` and ``InterleaveStereoCompressionModel`` work too):

- an audiocraft ``EncodecModel`` (or any module with SEANet ``encoder``/``decoder`` and a
  ``ResidualVectorQuantizer`` ``quantizer``): those three submodules are replaced by
  ``fastcodec.SEANetEncoder`` / ``SEANetDecoder`` / ``ResidualVectorQuantizer`` built with the same arguments
  and holding the **same** Parameter and buffer objects (no copy: ``state_dict`` keys, values and storage are
  unchanged; optimizers built before patching keep working; EMA training of the codebooks writes the same
  buffers);
- a transformers ``EncodecModel``: its module tree is left alone (``state_dict`` unchanged); the ``forward``
  of ``encoder`` / ``decoder`` and the ``encode`` / ``decode`` of ``quantizer`` are overridden on the instances
  by fastcodec's modules, which share the model's parameters and codebook buffers (weight-norm
  parametrizations' ``original0`` / ``original1`` are the fast convs' ``weight_g`` / ``weight_v``). Buffers
  replaced by ``.to()`` / ``load_state_dict(assign=True)`` are re-linked at the next call.

``unpatch(model)`` puts the original modules / methods back (re-linked to the current tensors and active
codebook count, so training or loading done while patched is kept). ``is_patched(model)`` tells.
"""
from __future__ import annotations

import typing as tp
import warnings

from torch import nn

from .checkpoint import convert_state_dict
from .compat import fast_rvq_like, fast_seanet_like, share_tensors
from .quantization import ResidualVectorQuantizer
from .seanet import SEANetDecoder, SEANetEncoder

__all__ = ["patch", "unpatch", "is_patched"]

_ATTR = "_fastcodec_patch"
_FAST = (SEANetEncoder, SEANetDecoder, ResidualVectorQuantizer)


def _is_hf_encodec(m) -> bool:
    return (isinstance(m, nn.Module) and type(m).__name__ == "EncodecModel" and hasattr(m, "config")
            and hasattr(getattr(m, "encoder", None), "layers") and hasattr(getattr(m, "quantizer", None), "layers"))


def _is_seanet(m) -> bool:
    return isinstance(m, nn.Module) and isinstance(getattr(m, "model", None), nn.Sequential) and hasattr(m, "ratios")


def _is_rvq(m) -> bool:
    return isinstance(m, nn.Module) and hasattr(m, "vq") and hasattr(m, "max_n_q") and hasattr(m, "bins")


def _targets(obj, path: str, seen: set) -> list[tuple[str, tp.Any, str]]:
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if _is_hf_encodec(obj):
        return [("transformers", obj, path)]
    if all(isinstance(getattr(obj, p, None), nn.Module) for p in ("encoder", "decoder", "quantizer")):
        return [("audiocraft", obj, path)]
    found = []
    for attr in ("compression_model", "model"):
        child = getattr(obj, attr, None)
        if child is not None and not isinstance(child, nn.Sequential):
            found += _targets(child, f"{path}.{attr}", seen)
    return found


def _find(model) -> list[tuple[str, tp.Any, str]]:
    found = _targets(model, type(model).__name__, set())
    if not found:
        raise TypeError(f"fastcodec.patch: {type(model).__qualname__} is not a codec it knows: expected an "
                        "audiocraft EncodecModel (encoder/decoder/quantizer), a transformers EncodecModel, or an "
                        "object holding one as .compression_model or .model (MusicGen, HFEncodecCompressionModel)")
    return found


def is_patched(model) -> bool:
    """Whether ``fastcodec.patch`` swapped fastcodec's modules into ``model`` (or the codec it holds)."""
    try:
        return any(_ATTR in vars(m) for _, m, _ in _find(model))
    except TypeError:
        return False


def patch(model):
    """Swap fastcodec's fast encoder/decoder/quantizer into ``model`` in place, sharing its tensors; returns
    ``model``. Patching a patched model does nothing. Parts of another kind (e.g. audiocraft's DummyQuantizer)
    are left as they are, with a warning naming them."""
    for kind, m, path in _find(model):
        if _ATTR in vars(m):
            continue
        if kind == "audiocraft":
            _patch_audiocraft(m, path)
        else:
            _patch_transformers(m)
    return model


def unpatch(model):
    """Undo ``fastcodec.patch``: the original modules / methods, holding the current tensors. Returns ``model``."""
    for kind, m, _ in _find(model):
        record = vars(m).pop(_ATTR, None)
        if record is not None:
            record.restore(m)
    return model


# ---------------------------------------------------------------------------------------------
# audiocraft: swap the submodules
# ---------------------------------------------------------------------------------------------


class _AudiocraftPatch:
    def __init__(self, originals: dict[str, nn.Module]):
        self.originals = originals

    def restore(self, m: nn.Module) -> None:
        for part, orig in self.originals.items():
            fast = getattr(m, part)
            share_tensors(orig, fast)  # what training, .to() or load_state_dict did while patched
            orig.train(fast.training)
            if part == "quantizer":
                orig.n_q = fast.n_q
            setattr(m, part, orig)


def _patch_audiocraft(m: nn.Module, path: str) -> None:
    originals = {}
    skipped = []
    for part in ("encoder", "decoder", "quantizer"):
        sub = getattr(m, part)
        if isinstance(sub, _FAST):
            continue
        if part == "quantizer" and _is_rvq(sub):
            fast = fast_rvq_like(sub, share=True)
        elif part != "quantizer" and _is_seanet(sub):
            fast = fast_seanet_like(sub, share=True)
        else:
            skipped.append(f"{path}.{part} ({type(sub).__qualname__})")
            continue
        originals[part] = sub
        setattr(m, part, fast)
    if skipped:
        warnings.warn(f"fastcodec.patch: left as they are (no fast drop-in): {', '.join(skipped)}",
                      RuntimeWarning, stacklevel=3)
    if originals:
        vars(m)[_ATTR] = _AudiocraftPatch(originals)


# ---------------------------------------------------------------------------------------------
# transformers: override forward / encode / decode on the instances
# ---------------------------------------------------------------------------------------------


def _hf_seanet_kwargs(cfg) -> dict:
    return dict(channels=cfg.audio_channels, dimension=cfg.hidden_size, n_filters=cfg.num_filters,
                n_residual_layers=cfg.num_residual_layers, ratios=list(cfg.upsampling_ratios), activation="ELU",
                activation_params={"alpha": 1.0}, norm=cfg.norm_type, kernel_size=cfg.kernel_size,
                last_kernel_size=cfg.last_kernel_size, residual_kernel_size=cfg.residual_kernel_size,
                dilation_base=cfg.dilation_growth_rate, causal=cfg.use_causal_conv, pad_mode=cfg.pad_mode,
                true_skip=not cfg.use_conv_shortcut, compress=cfg.compress, lstm=cfg.num_lstm_layers)


class _Holder(nn.Module):
    def __init__(self, encoder, decoder, quantizer):
        super().__init__()
        self.encoder, self.decoder, self.quantizer = encoder, decoder, quantizer


class _Link:
    """Keeps each fast tensor slot pointing at the transformers model's current tensor object."""

    def __init__(self, fast: nn.Module, hf: nn.Module, key_map: dict[str, str]):
        self.slots = []
        for key, hf_key in key_map.items():
            owner, _, leaf = key.rpartition(".")
            hf_owner, _, hf_leaf = hf_key.rpartition(".")
            f, h = fast.get_submodule(owner), hf.get_submodule(hf_owner)
            store = "_parameters" if leaf in f._parameters else "_buffers"
            self.slots.append((f, leaf, getattr(h, store), hf_leaf, store == "_parameters"))

    def __call__(self) -> None:
        for f, leaf, table, hf_leaf, is_param in self.slots:
            cur = table[hf_leaf]
            if (f._parameters if is_param else f._buffers)[leaf] is not cur:
                if is_param:
                    setattr(f, leaf, cur)  # nn.LSTM refreshes its flat weights
                else:
                    f._buffers[leaf] = cur


class _Call:
    """A picklable instance override: relink, then run the fast module."""

    def __init__(self, record: "_TransformersPatch", what: str):
        self.record, self.what = record, what

    def __call__(self, *args, **kwargs):
        self.record.link()
        return getattr(self.record, self.what)(*args, **kwargs)


class _TransformersPatch:
    def __init__(self, hf: nn.Module):
        cfg = hf.config
        kw = _hf_seanet_kwargs(cfg)
        p = next(hf.parameters())
        self.encoder = SEANetEncoder(**kw).to(device=p.device, dtype=p.dtype)
        self.decoder = SEANetDecoder(**kw, trim_right_ratio=cfg.trim_right_ratio).to(device=p.device,
                                                                                    dtype=p.dtype)
        q = hf.quantizer
        embed = q.layers[0].codebook.embed
        self.quantizer = ResidualVectorQuantizer(dimension=embed.shape[1], n_q=len(q.layers),
                                                 bins=q.codebook_size).to(device=embed.device, dtype=embed.dtype)
        holder = _Holder(self.encoder, self.decoder, self.quantizer)
        theirs = {k: k for k in hf.state_dict(keep_vars=True)}
        key_map = {mine: hf_key for mine, hf_key in convert_state_dict(theirs, holder).items()
                   if mine in holder.state_dict()}
        missing = sorted(set(holder.state_dict()) - set(key_map))
        if missing:
            raise TypeError(f"fastcodec.patch: this transformers EncodecModel has no tensors for {missing[:4]}"
                            f"{' ...' if len(missing) > 4 else ''}: its structure differs from EnCodec's SEANet")
        share_tensors(holder, hf, key_map)
        self.link = _Link(holder, hf, key_map)
        self.hf_quantizer = q

    def quantizer_encode(self, embeddings, bandwidth=None):
        n = self.hf_quantizer.get_num_quantizers_for_bandwidth(bandwidth)
        self.quantizer.set_num_codebooks(n)
        return self.quantizer.encode(embeddings).transpose(0, 1).contiguous()  # (K, B, T), as transformers

    def quantizer_decode(self, codes):
        return self.quantizer.decode(codes.transpose(0, 1))

    def restore(self, hf: nn.Module) -> None:
        for mod, name in ((hf.encoder, "forward"), (hf.decoder, "forward"), (hf.quantizer, "encode"),
                          (hf.quantizer, "decode")):
            vars(mod).pop(name, None)


def _patch_transformers(hf: nn.Module) -> None:
    record = _TransformersPatch(hf)
    vars(hf.encoder)["forward"] = _Call(record, "encoder")
    vars(hf.decoder)["forward"] = _Call(record, "decoder")
    vars(hf.quantizer)["encode"] = _Call(record, "quantizer_encode")
    vars(hf.quantizer)["decode"] = _Call(record, "quantizer_decode")
    vars(hf)[_ATTR] = record
