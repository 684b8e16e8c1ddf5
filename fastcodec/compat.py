"""``fastcodec.AudiocraftEncodecModel``: audiocraft's ``CompressionModel`` / ``EncodecModel`` API on the fast modules.

audiocraft users (MusicGen, AudioGen, JASCO) write ``codes, scale = model.encode(x)``,
``model.decode(codes, scale)``, ``model.decode_latent(codes)`` (codes -> continuous latents),
``model.num_codebooks`` / ``set_num_codebooks`` / ``cardinality`` / ``total_codebooks``. This class has
audiocraft 1.3.0's constructor, attributes, ``state_dict`` keys and results (``audiocraft.models.encodec.
EncodecModel``), built from ``fastcodec.SEANetEncoder`` / ``SEANetDecoder`` / ``ResidualVectorQuantizer``.

- ``AudiocraftEncodecModel(encoder, decoder, quantizer, frame_rate, sample_rate, channels, causal, renormalize)``:
  audiocraft's signature; pass fastcodec modules (or any with the same API).
- ``AudiocraftEncodecModel.from_audiocraft(model)``: the fast twin of an existing audiocraft ``EncodecModel``
  (constructor arguments read from its modules, weights copied; ``share=True`` shares the Parameter and buffer
  objects instead, which is what ``fastcodec.patch`` does in place).
- ``AudiocraftEncodecModel.musicgen_32khz()``: MusicGen's 32 kHz compression model, random weights.
- ``AudiocraftEncodecModel.get_pretrained(path)``: a local checkpoint exported by audiocraft
  (``audiocraft.utils.export.export_encodec``: ``best_state`` + ``xp.cfg``). No downloads.

fastcodec's own ``EncodecModel`` (encodec 0.1.1's API) keeps ``encode -> [(codes, scale)]`` per segment; its
continuous-latent decoding (as JASCO does) is ``decode_continuous``.
"""
from __future__ import annotations

import os
import typing as tp

import torch
from torch import nn

from .quantization import ResidualVectorQuantizer
from .reference.model import normalize_volume
from .reference.quantization import QuantizedResult
from .seanet import SEANetDecoder, SEANetEncoder

__all__ = ["AudiocraftEncodecModel", "seanet_kwargs", "rvq_kwargs", "fast_seanet_like", "fast_rvq_like",
           "share_tensors"]


# ---------------------------------------------------------------------------------------------
# constructor arguments read back from a built SEANet / RVQ (audiocraft's or ours: same structure)
# ---------------------------------------------------------------------------------------------


def _activation_of(act: nn.Module) -> tuple[str, dict]:
    name = type(act).__name__
    if not isinstance(act, nn.Module) or getattr(nn, name, None) is not type(act):
        raise TypeError(f"cannot read the activation of {type(act).__qualname__}: not a torch.nn activation")
    if isinstance(act, nn.ELU):
        return name, {"alpha": act.alpha}
    if isinstance(act, nn.LeakyReLU):
        return name, {"negative_slope": act.negative_slope}
    if any(not k.startswith("_") and k != "training" for k in vars(act)):
        raise TypeError(f"cannot read the parameters of activation {name}: only ELU, LeakyReLU and "
                        "parameter-free torch.nn activations are supported")
    return name, {}


def _norm_of(wrapper: nn.Module) -> tuple[str, dict]:
    """(norm, norm_params) of a NormConv1d / NormConvTranspose1d."""
    norm = getattr(wrapper, "norm_type", None)
    if norm is None:
        conv = getattr(wrapper, "conv", None) or getattr(wrapper, "convtr")
        norm = ("weight_norm" if "weight_g" in conv._parameters
                else "time_group_norm" if isinstance(wrapper.norm, nn.GroupNorm) else "none")
    params: dict = {}
    if isinstance(getattr(wrapper, "norm", None), nn.GroupNorm):
        gn = wrapper.norm
        if gn.eps != 1e-5:
            params["eps"] = gn.eps
        if not gn.affine:
            params["affine"] = False
    return norm, params


def seanet_kwargs(module: nn.Module) -> dict:
    """The constructor arguments of a built SEANet encoder or decoder (audiocraft's or fastcodec's), read from
    its attributes and layers. Raises ``TypeError`` for a module of another structure."""
    seq = getattr(module, "model", None)
    if not isinstance(seq, nn.Sequential) or not hasattr(module, "ratios"):
        raise TypeError(f"{type(module).__qualname__} is not a SEANet encoder/decoder (no .model Sequential "
                        "and .ratios)")
    decoder = type(module).__name__.endswith("Decoder") or any(hasattr(m, "convtr") for m in seq)
    convs = [m for m in seq if hasattr(m, "conv") and hasattr(m, "pad_mode")]
    blocks = [m for m in seq if hasattr(m, "block") and hasattr(m, "shortcut")]
    lstms = [m for m in seq if hasattr(m, "lstm")]
    first, last = convs[0], convs[-1]
    outer = int(getattr(module, "disable_norm_outer_blocks", 0))
    normed = [n for n in (_norm_of(c.conv) for c in convs) if n[0] != "none"]
    norm, norm_params = normed[0] if normed else ("none", {})
    kw: dict = dict(
        channels=module.channels, dimension=module.dimension, n_filters=module.n_filters,
        n_residual_layers=module.n_residual_layers,
        ratios=list(module.ratios) if decoder else list(reversed(module.ratios)),
        norm=norm, norm_params=norm_params, kernel_size=first.conv.conv.kernel_size[0],
        last_kernel_size=last.conv.conv.kernel_size[0], causal=bool(first.causal), pad_mode=first.pad_mode,
        lstm=lstms[0].lstm.num_layers if lstms else 0, disable_norm_outer_blocks=outer,
    )
    acts = [m for m in seq if not (m in convs or m in blocks or m in lstms or hasattr(m, "convtr"))]
    if blocks:
        b = blocks[0]
        kw["residual_kernel_size"] = b.block[1].conv.conv.kernel_size[0]
        inner = b.block[1].conv.conv
        kw["compress"] = max(1, inner.in_channels // inner.out_channels)
        kw["true_skip"] = isinstance(b.shortcut, nn.Identity)
        if module.n_residual_layers > 1:
            kw["dilation_base"] = blocks[1].block[1].conv.conv.dilation[0]
        acts = [b.block[0]] + acts
    if acts:
        kw["activation"], kw["activation_params"] = _activation_of(acts[0])
    if decoder:
        convtrs = [m for m in seq if hasattr(m, "convtr")]
        if convtrs:
            kw["trim_right_ratio"] = convtrs[0].trim_right_ratio
        tail = seq[-1]
        if tail is not last:
            kw["final_activation"], kw["final_activation_params"] = _activation_of(tail)
    return kw


def rvq_kwargs(q: nn.Module) -> dict:
    """The constructor arguments of a built audiocraft / fastcodec ``ResidualVectorQuantizer``."""
    names = ("dimension", "q_dropout", "bins", "decay", "kmeans_init", "kmeans_iters", "threshold_ema_dead_code",
             "orthogonal_reg_weight", "orthogonal_reg_active_codes_only", "orthogonal_reg_max_codes")
    missing = [n for n in names + ("max_n_q",) if not hasattr(q, n)]
    if missing or not hasattr(q, "vq"):
        raise TypeError(f"{type(q).__qualname__} is not a ResidualVectorQuantizer (no {missing or ['vq']})")
    return {"n_q": q.max_n_q, **{n: getattr(q, n) for n in names}}


def share_tensors(dst: nn.Module, src: nn.Module, key_map: tp.Optional[tp.Mapping[str, str]] = None) -> None:
    """Make every parameter and buffer of ``dst`` the very tensor object ``src`` holds under the same key (or
    under ``key_map[key]``). Shapes must match; every key of ``dst`` must be found. No copies: the two modules
    then train, load and move the same storage (``.to()`` keeps Parameter objects; it replaces buffers, which
    ``fastcodec.patch`` re-links)."""
    theirs = dict(src.named_parameters(remove_duplicate=False))
    theirs.update(src.named_buffers(remove_duplicate=False))
    for kind, named in (("parameter", dst.named_parameters(remove_duplicate=False)),
                        ("buffer", dst.named_buffers(remove_duplicate=False))):
        for key, mine in list(named):
            other_key = key_map.get(key, key) if key_map is not None else key
            other = theirs.get(other_key)
            if other is None:
                raise KeyError(f"{kind} {key!r} has no counterpart {other_key!r} in {type(src).__qualname__}")
            if other.shape != mine.shape:
                raise ValueError(f"{kind} {key!r}: shape {tuple(mine.shape)} but {other_key!r} is "
                                 f"{tuple(other.shape)}")
            owner_path, _, leaf = key.rpartition(".")
            owner = dst.get_submodule(owner_path) if owner_path else dst
            if kind == "parameter":
                if not isinstance(other, nn.Parameter):
                    raise TypeError(f"{other_key!r} is not a Parameter")
                setattr(owner, leaf, other)  # setattr: nn.LSTM refreshes its _flat_weights
            else:
                owner._buffers[leaf] = other


def fast_seanet_like(module: nn.Module, share: bool = False) -> nn.Module:
    """A ``fastcodec.SEANetEncoder``/``SEANetDecoder`` with ``module``'s arguments and weights (copied, or the
    same tensor objects with ``share=True``), in the same train/eval mode, dtype and device."""
    kw = seanet_kwargs(module)
    decoder = "trim_right_ratio" in kw or type(module).__name__.endswith("Decoder")
    cls = SEANetDecoder if decoder else SEANetEncoder
    fast = cls(**kw)
    _adopt(fast, module, share)
    return fast


def fast_rvq_like(q: nn.Module, share: bool = False) -> ResidualVectorQuantizer:
    """A ``fastcodec.ResidualVectorQuantizer`` with ``q``'s arguments, active codebooks and buffers."""
    fast = ResidualVectorQuantizer(**rvq_kwargs(q))
    fast.set_num_codebooks(q.n_q)
    _adopt(fast, q, share)
    return fast


def _adopt(fast: nn.Module, src: nn.Module, share: bool) -> None:
    ref = next(src.parameters(), None)
    if ref is None:
        ref = next(src.buffers())
    fast.to(device=ref.device, dtype=ref.dtype)
    if share:
        share_tensors(fast, src)
    else:
        fast.load_state_dict(src.state_dict(), strict=True)
    fast.train(src.training)


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------


class AudiocraftEncodecModel(nn.Module):
    """audiocraft 1.3.0's ``EncodecModel`` (a ``CompressionModel``) on fastcodec's modules.

    Args (audiocraft's): encoder, decoder, quantizer; frame_rate (latent frames per second); sample_rate;
    channels; causal; renormalize (divide the input by its RMS volume, returned as ``scale``).
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, quantizer: nn.Module, frame_rate: int,
                 sample_rate: int, channels: int, causal: bool = False, renormalize: bool = False):
        super().__init__()
        if causal and renormalize:
            raise ValueError("renormalize=True needs causal=False (audiocraft: 'Causal model does not support "
                             "renormalize')")
        self.encoder = encoder
        self.decoder = decoder
        self.quantizer = quantizer
        self.frame_rate = frame_rate
        self.sample_rate = sample_rate
        self.channels = channels
        self.renormalize = renormalize
        self.causal = causal

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def from_audiocraft(cls, model: nn.Module, share: bool = False) -> "AudiocraftEncodecModel":
        """The fast model with the arguments and weights of an audiocraft ``EncodecModel`` (copied; ``share=True``:
        the same Parameter/buffer objects, so both models train and load together)."""
        for part in ("encoder", "decoder", "quantizer"):
            if not isinstance(getattr(model, part, None), nn.Module):
                raise TypeError(f"from_audiocraft needs an audiocraft EncodecModel; {type(model).__qualname__} "
                                f"has no {part} module")
        return cls(fast_seanet_like(model.encoder, share), fast_seanet_like(model.decoder, share),
                   fast_rvq_like(model.quantizer, share), frame_rate=model.frame_rate,
                   sample_rate=model.sample_rate, channels=model.channels,
                   causal=bool(getattr(model, "causal", False)),
                   renormalize=bool(getattr(model, "renormalize", False))).train(model.training)

    @classmethod
    def from_config(cls, seanet: dict, rvq: dict, sample_rate: int, channels: int, causal: bool = False,
                    renormalize: bool = False) -> "AudiocraftEncodecModel":
        """audiocraft's ``builders.get_compression_model`` for ``compression_model='encodec'``: ``seanet`` holds
        the shared SEANet arguments plus optional ``encoder``/``decoder`` overrides; ``rvq`` the quantizer's."""
        kw = {k: v for k, v in seanet.items() if k not in ("encoder", "decoder")}
        encoder = SEANetEncoder(**{**kw, **dict(seanet.get("encoder") or {})})
        decoder = SEANetDecoder(**{**kw, **dict(seanet.get("decoder") or {})})
        quantizer = ResidualVectorQuantizer(**{**rvq, "dimension": encoder.dimension})
        return cls(encoder, decoder, quantizer, frame_rate=sample_rate // encoder.hop_length,
                   sample_rate=sample_rate, channels=channels, causal=causal, renormalize=renormalize)

    @classmethod
    def musicgen_32khz(cls) -> "AudiocraftEncodecModel":
        """MusicGen's 32 kHz mono compression model (``facebook/encodec_32khz``'s shape: non-causal, n_filters 64,
        ratios 8,5,4,4, 4 codebooks of 2048, 50 Hz frames), random weights, in eval mode."""
        seanet = dict(channels=1, dimension=128, n_filters=64, n_residual_layers=1, ratios=[8, 5, 4, 4],
                      norm="weight_norm", causal=False, pad_mode="constant", true_skip=True, compress=2, lstm=2)
        rvq = dict(n_q=4, bins=2048, q_dropout=False, decay=0.99, kmeans_init=True, kmeans_iters=50,
                   threshold_ema_dead_code=2)
        return cls.from_config(seanet, rvq, sample_rate=32000, channels=1).eval()

    @staticmethod
    def get_pretrained(name: tp.Union[str, os.PathLike], device: tp.Union[torch.device, str] = "cpu"
                       ) -> "AudiocraftEncodecModel":
        """audiocraft's ``CompressionModel.get_pretrained`` for a local checkpoint exported by audiocraft
        (``{'best_state': state_dict, 'xp.cfg': yaml}``). fastcodec never downloads: for a hub name, download
        the checkpoint yourself and pass its path (or load the transformers model and ``fastcodec.patch`` it)."""
        path = os.fspath(name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"get_pretrained: {path!r} is not a local file; fastcodec does not download "
                                    "models (fetch the exported audiocraft checkpoint and pass its path, or "
                                    "fastcodec.patch() a model you already loaded)")
        pkg = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(pkg, dict) or "best_state" not in pkg or "xp.cfg" not in pkg:
            raise ValueError(f"get_pretrained: {path} is not an exported audiocraft compression checkpoint "
                             "(needs 'best_state' and 'xp.cfg')")
        try:
            import yaml  # only this loader needs it (transformers depends on it too)
        except ImportError as e:
            raise ImportError("get_pretrained reads the checkpoint's yaml config: pip install pyyaml") from e

        cfg = pkg["xp.cfg"]
        cfg = yaml.safe_load(cfg) if isinstance(cfg, str) else cfg
        if cfg.get("compression_model") != "encodec" or cfg["encodec"].get("autoencoder") != "seanet" \
                or cfg["encodec"].get("quantizer") != "rvq":
            raise ValueError(f"get_pretrained: {path} holds a {cfg.get('compression_model')!r} model with "
                             f"{cfg.get('encodec')!r}; only encodec with seanet + rvq is supported")
        enc = cfg["encodec"]
        model = AudiocraftEncodecModel.from_config(
            cfg["seanet"], cfg["rvq"], sample_rate=enc["sample_rate"], channels=enc["channels"],
            causal=bool(enc.get("causal", False)), renormalize=bool(enc.get("renormalize", False)))
        model.load_state_dict(pkg["best_state"])
        return model.to(device).eval()

    # -- audiocraft's CompressionModel API -------------------------------------------------

    @property
    def total_codebooks(self) -> int:
        """Total number of quantizer codebooks available."""
        return self.quantizer.total_codebooks

    @property
    def num_codebooks(self) -> int:
        """Active number of codebooks used by the quantizer."""
        return self.quantizer.num_codebooks

    def set_num_codebooks(self, n: int) -> None:
        """Set the active number of codebooks used by the quantizer."""
        self.quantizer.set_num_codebooks(n)

    @property
    def cardinality(self) -> int:
        """Cardinality of each codebook."""
        return self.quantizer.bins

    def preprocess(self, x: torch.Tensor) -> tuple[torch.Tensor, tp.Optional[torch.Tensor]]:
        if not self.renormalize:
            return x, None
        return normalize_volume(x)

    def postprocess(self, x: torch.Tensor, scale: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
        if scale is None:
            return x
        if not self.renormalize:
            raise ValueError("decode got a scale but this model has renormalize=False")
        return x * scale.view(-1, 1, 1)

    def _check_audio(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor (batch, channels, samples), got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"x must be (batch, channels, samples), got shape {tuple(x.shape)}")
        if x.shape[1] != self.channels:
            raise ValueError(f"x has {x.shape[1]} channel(s); this model takes {self.channels}")

    def forward(self, x: torch.Tensor) -> QuantizedResult:
        """Audio (B, C, T) -> ``QuantizedResult`` whose ``x`` is the reconstruction (B, C, T) (training)."""
        self._check_audio(x)
        length = x.shape[-1]
        x, scale = self.preprocess(x)
        emb = self.encoder(x)
        q_res = self.quantizer(emb, self.frame_rate)
        out = self.decoder(q_res.x)
        q_res.x = self.postprocess(out[..., :length], scale)
        return q_res

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, tp.Optional[torch.Tensor]]:
        """Audio (B, C, T) -> ``(codes (B, K, frames) int64, scale (B, 1) or None)``."""
        self._check_audio(x)
        x, scale = self.preprocess(x)
        return self.quantizer.encode(self.encoder(x)), scale

    def decode(self, codes: torch.Tensor, scale: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
        """Codes (B, K, frames) [and scale] -> audio (B, C, frames * hop) (may be longer than the input)."""
        return self.postprocess(self.decoder(self.decode_latent(codes)), scale)

    def decode_latent(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, K, frames) -> continuous latents (B, dimension, frames) (audiocraft's meaning)."""
        return self.quantizer.decode(codes)
