"""The EnCodec model: SEANet encoder + residual vector quantizer + SEANet decoder.

Mirrors encodec 0.1.1's ``EncodecModel`` (same attributes, ``state_dict`` keys ``encoder.*``,
``quantizer.vq.layers.*``, ``decoder.*``, same encode/decode frames, segmenting, volume
normalisation and overlap-add), built from our reference modules. The two published presets:

- ``EncodecModel.encodec_model_24khz()``: 24 kHz mono, causal, weight_norm, 75 Hz frames,
  1.5/3/6/12/24 kbps = 2/4/8/16/32 codebooks of 1024 entries.
- ``EncodecModel.encodec_model_48khz()``: 48 kHz stereo, non-causal, time_group_norm, 150 Hz frames,
  volume normalisation with a per-segment scale, 1 s segments with 1% overlap, 3/6/12/24 kbps.

- ``EncodecModel.encodec_model_32khz()``: MusicGen's 32 kHz mono non-causal model, 4 codebooks of 2048.

Pretrained weights are not downloaded (no network at run time): ``EncodecModel.from_pretrained(path)``
builds and loads a local checkpoint or Hugging Face folder (``fastcodec.pretrained``).
"""
from __future__ import annotations

import math
import typing as tp
import warnings

import torch
from torch import nn

from .quantization import ResidualVectorQuantizer
from .seanet import SEANetDecoder, SEANetEncoder

EncodedFrame = tp.Tuple[torch.Tensor, tp.Optional[torch.Tensor]]
_warned_decode_latent = False


def linear_overlap_add(frames: tp.Sequence[torch.Tensor], stride: int) -> torch.Tensor:
    """Overlap-add frames ``(..., T_i)`` placed every ``stride`` samples, with triangular weights
    normalised by their sum (encodec's scheme: a position covered by one frame keeps its value)."""
    if not frames:
        raise ValueError("linear_overlap_add needs at least one frame")
    device, dtype = frames[0].device, frames[0].dtype
    shape = frames[0].shape[:-1]
    total = stride * (len(frames) - 1) + frames[-1].shape[-1]
    frame_length = frames[0].shape[-1]
    t = torch.linspace(0, 1, frame_length + 2, device=device, dtype=dtype)[1:-1]
    weight = 0.5 - (t - 0.5).abs()
    sum_weight = torch.zeros(total, device=device, dtype=dtype)
    out = torch.zeros(*shape, total, device=device, dtype=dtype)
    offset = 0
    for frame in frames:
        n = frame.shape[-1]
        out[..., offset:offset + n] += weight[:n] * frame
        sum_weight[offset:offset + n] += weight[:n]
        offset += stride
    if not bool(sum_weight.min() > 0):
        raise ValueError("overlap-add left a gap: the frames do not cover the signal")
    return out / sum_weight


def normalize_volume(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """encodec's volume normalisation of ``x (B, C, T)``: ``(x / scale, scale (B, 1))`` with ``scale`` the RMS of
    the channel mean plus 1e-8."""
    mono = x.mean(dim=1, keepdim=True)
    scale = 1e-8 + mono.pow(2).mean(dim=2, keepdim=True).sqrt()
    return x / scale, scale.view(-1, 1)


class EncodecModel(nn.Module):
    """EnCodec on raw waveforms ``(batch, channels, samples)``.

    Args:
        encoder, decoder: SEANet encoder/decoder; quantizer: residual vector quantizer.
        target_bandwidths: the kbps values ``set_target_bandwidth`` accepts.
        sample_rate, channels: of the audio.
        normalize: divide each segment by its RMS volume (``scale``) before encoding.
        segment: segment duration in seconds for overlap-add processing (None: whole input).
        overlap: overlap between segments, as a fraction of the segment duration.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        quantizer: nn.Module,
        target_bandwidths: tp.List[float],
        sample_rate: int,
        channels: int,
        normalize: bool = False,
        segment: tp.Optional[float] = None,
        overlap: float = 0.01,
        name: str = "unset",
    ):
        super().__init__()
        self.bandwidth: tp.Optional[float] = None
        self.target_bandwidths = list(target_bandwidths)
        self.encoder = encoder
        self.quantizer = quantizer
        self.decoder = decoder
        self.sample_rate = sample_rate
        self.channels = channels
        self.normalize = normalize
        self.segment = segment
        self.overlap = overlap
        self.frame_rate = math.ceil(self.sample_rate / math.prod(self.encoder.ratios))
        self.name = name
        self.bits_per_codebook = int(math.log2(self.quantizer.bins))
        if 2 ** self.bits_per_codebook != self.quantizer.bins:
            raise ValueError(f"quantizer bins must be a power of 2, got {self.quantizer.bins}")

    # -- presets ---------------------------------------------------------------------------

    @classmethod
    def _get_model(cls, target_bandwidths, sample_rate=24_000, channels=1, causal=True,
                   model_norm="weight_norm", audio_normalize=False, segment=None, name="unset",
                   encoder_cls=SEANetEncoder, decoder_cls=SEANetDecoder,
                   quantizer_cls=ResidualVectorQuantizer, n_filters=32, ratios=(8, 5, 4, 2), bins=1024,
                   true_skip=False) -> "EncodecModel":
        # encodec 0.1.1's SEANet defaults: n_filters 32, ratios [8,5,4,2], dimension 128, lstm 2,
        # reflect padding, true_skip False (audiocraft's default is True: pass it explicitly).
        kw = dict(channels=channels, dimension=128, n_filters=n_filters, n_residual_layers=1,
                  ratios=list(ratios), norm=model_norm, causal=causal, pad_mode="reflect",
                  true_skip=true_skip, compress=2, lstm=2)
        encoder = encoder_cls(**kw)
        decoder = decoder_cls(**kw, trim_right_ratio=1.0)
        hop = math.prod(encoder.ratios)
        # transformers' EncodecConfig.num_quantizers (log2(bins) bits per code)
        n_q = int(1000 * target_bandwidths[-1] // (math.ceil(sample_rate / hop) * math.ceil(math.log2(bins))))
        # encodec's training defaults (kmeans_iters 50); only used when training from scratch
        quantizer = quantizer_cls(dimension=encoder.dimension, n_q=n_q, bins=bins, decay=0.99,
                                  kmeans_init=True, kmeans_iters=50, threshold_ema_dead_code=2)
        return cls(encoder, decoder, quantizer, target_bandwidths, sample_rate, channels,
                            normalize=audio_normalize, segment=segment, name=name)

    @staticmethod
    def _check_pretrained(pretrained: bool, preset: str) -> None:
        if pretrained:
            raise ValueError(f"{preset}(pretrained=True) would download weights; fastcodec never uses the network. "
                             f"Build it with pretrained=False and load a file, or use "
                             f"EncodecModel.from_pretrained(path) with a local checkpoint or Hugging Face folder")

    @classmethod
    def encodec_model_24khz(cls, pretrained: bool = False, **module_classes) -> "EncodecModel":
        """The causal 24 kHz mono model (random weights; load a checkpoint for the trained ones)."""
        cls._check_pretrained(pretrained, "encodec_model_24khz")
        model = cls._get_model([1.5, 3.0, 6.0, 12.0, 24.0], 24_000, 1, causal=True,
                               model_norm="weight_norm", audio_normalize=False,
                               name="encodec_24khz", **module_classes)
        return model.eval()

    @classmethod
    def encodec_model_32khz(cls, pretrained: bool = False, **module_classes) -> "EncodecModel":
        """MusicGen's 32 kHz mono model (``facebook/encodec_32khz``; random weights): non-causal, 64 filters,
        ratios 8-5-4-4 (50 Hz frames), no shortcut convs, 4 codebooks of 2048 entries (2.2 kbps)."""
        cls._check_pretrained(pretrained, "encodec_model_32khz")
        model = cls._get_model([2.2], 32_000, 1, causal=False, model_norm="weight_norm",
                               audio_normalize=False, name="encodec_32khz", n_filters=64,
                               ratios=(8, 5, 4, 4), bins=2048, true_skip=True, **module_classes)
        return model.eval()

    @classmethod
    def encodec_model_48khz(cls, pretrained: bool = False, **module_classes) -> "EncodecModel":
        """The non-causal 48 kHz stereo model with 1 s segments (random weights)."""
        cls._check_pretrained(pretrained, "encodec_model_48khz")
        model = cls._get_model([3.0, 6.0, 12.0, 24.0], 48_000, 2, causal=False,
                               model_norm="time_group_norm", audio_normalize=True, segment=1.0,
                               name="encodec_48khz", **module_classes)
        return model.eval()

    @classmethod
    def from_pretrained(cls, path, config=None, **module_classes) -> "EncodecModel":
        """Build the architecture a local checkpoint describes and load it (never the network): a Hugging
        Face folder (``config.json`` + ``model.safetensors``/``pytorch_model.bin``), an encodec ``.th`` or an
        audiocraft compression checkpoint. See ``fastcodec.pretrained.from_pretrained``."""
        from ..pretrained import from_pretrained  # the loaders live outside the torch-only reference
        return from_pretrained(path, config=config, model_cls=cls, **module_classes)

    # -- properties ------------------------------------------------------------------------

    @property
    def segment_length(self) -> tp.Optional[int]:
        return None if self.segment is None else int(self.segment * self.sample_rate)

    @property
    def segment_stride(self) -> tp.Optional[int]:
        n = self.segment_length
        return None if n is None else max(1, int((1 - self.overlap) * n))

    @property
    def dimension(self) -> int:
        return self.encoder.dimension

    def bandwidth_per_codebook(self) -> float:
        return math.log2(self.quantizer.bins) * self.frame_rate / 1000

    def set_target_bandwidth(self, bandwidth: float) -> None:
        """Use ``floor(bandwidth / bandwidth_per_codebook)`` codebooks (encodec's rule)."""
        if bandwidth not in self.target_bandwidths:
            raise ValueError(f"This model doesn't support the bandwidth {bandwidth}. "
                             f"Select one of {self.target_bandwidths}.")
        self.bandwidth = bandwidth
        n_q = int(max(1, math.floor(bandwidth / self.bandwidth_per_codebook())))
        self.quantizer.set_num_codebooks(min(n_q, self.quantizer.total_codebooks))

    # -- checks ----------------------------------------------------------------------------

    def _check_wav(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"audio must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"audio must be a floating point tensor, got {x.dtype}")
        if x.dim() != 3:
            raise ValueError(f"audio must be (batch, channels, samples), got shape {tuple(x.shape)}")
        if x.shape[1] != self.channels:
            raise ValueError(f"this model takes {self.channels} channel(s), got {x.shape[1]}")
        if x.shape[0] == 0 or x.shape[2] == 0:
            raise ValueError(f"audio is empty: shape {tuple(x.shape)}")
        weight = next(self.parameters(), None)
        if weight is not None and x.device != weight.device:
            raise ValueError(f"audio is on {x.device} but the model is on {weight.device}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("audio contains NaN or Inf")

    # -- encode / decode -------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> tp.List[EncodedFrame]:
        """Audio ``(B, C, samples)`` -> list of frames ``(codes (B, K, T), scale (B, 1) or None)``,
        one per segment (a single frame when the model has no segments)."""
        self._check_wav(x)
        length = x.shape[-1]
        segment_length = self.segment_length or length
        stride = self.segment_stride or length
        return [self._encode_frame(x[:, :, off:off + segment_length]) for off in range(0, length, stride)]

    def _encode_frame(self, x: torch.Tensor) -> EncodedFrame:
        scale = None
        if self.normalize:
            x, scale = normalize_volume(x)
        emb = self.encoder(x)
        codes = self.quantizer.encode(emb)
        return codes, scale

    def decode(self, encoded_frames: tp.Sequence[EncodedFrame]) -> torch.Tensor:
        """Frames from ``encode`` -> audio ``(B, C, samples')`` (may be a few samples longer than the input)."""
        if isinstance(encoded_frames, torch.Tensor):
            encoded_frames = [(encoded_frames, None)]
        if len(encoded_frames) == 0:
            raise ValueError("decode got no frames")
        if self.segment_length is None:
            if len(encoded_frames) != 1:
                raise ValueError(f"this model has no segments: expected 1 frame, got {len(encoded_frames)}")
            return self._decode_frame(encoded_frames[0])
        frames = [self._decode_frame(f) for f in encoded_frames]
        return linear_overlap_add(frames, self.segment_stride or 1)

    def _decode_frame(self, encoded_frame: EncodedFrame) -> torch.Tensor:
        codes, scale = encoded_frame
        emb = self.quantizer.decode(codes)
        out = self.decoder(emb)
        if scale is not None:
            out = out * scale.view(-1, 1, 1)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = self.encode(x)
        return self.decode(frames)[:, :, : x.shape[-1]]

    def decode_latent(self, z: torch.Tensor, mean=None, std=None,
                      channels_last: tp.Optional[bool] = None) -> torch.Tensor:
        """Deprecated alias of ``decode_continuous`` (warns once). In audiocraft ``decode_latent`` means
        codes -> latents; ``fastcodec.AudiocraftEncodecModel.decode_latent`` has that meaning."""
        global _warned_decode_latent
        if not _warned_decode_latent:
            _warned_decode_latent = True
            warnings.warn("EncodecModel.decode_latent(z, mean, std) is renamed decode_continuous (in audiocraft "
                          "decode_latent maps codes to latents); the old name will be removed",
                          DeprecationWarning, stacklevel=2)
        return self.decode_continuous(z, mean=mean, std=std, channels_last=channels_last)

    def decode_continuous(self, z: torch.Tensor, mean=None, std=None,
                          channels_last: tp.Optional[bool] = None) -> torch.Tensor:
        """Decode continuous latents (as JASCO does): ``z = z * std + mean``, then the decoder.

        z: ``(B, T, D)`` or ``(B, D, T)`` with D the model dimension; ``channels_last`` says which
        (inferred when only one axis has size D). mean/std: None, floats, or tensors broadcastable
        to ``(B, T, D)`` (e.g. per-channel ``(D,)``), applied in the ``(B, T, D)`` layout.
        """
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise TypeError("z must be a floating point torch.Tensor")
        if z.dim() != 3:
            raise ValueError(f"z must be (B, T, D) or (B, D, T), got shape {tuple(z.shape)}")
        D = self.dimension
        if channels_last is None:
            if z.shape[2] == D and z.shape[1] != D:
                channels_last = True
            elif z.shape[1] == D and z.shape[2] != D:
                channels_last = False
            elif z.shape[1] == D and z.shape[2] == D:
                raise ValueError(f"z is {tuple(z.shape)}: both axes have size {D}; pass channels_last")
            else:
                raise ValueError(f"z must have an axis of size {D} (the model dimension), got {tuple(z.shape)}")
        elif z.shape[2 if channels_last else 1] != D:
            raise ValueError(f"z {tuple(z.shape)} has no dimension {D} on the "
                             f"{'last' if channels_last else 'second'} axis")
        if z.shape[0] == 0 or z.numel() == 0:
            raise ValueError(f"z is empty: shape {tuple(z.shape)}")
        z_btd = z if channels_last else z.transpose(1, 2)
        if std is not None:
            z_btd = z_btd * torch.as_tensor(std, dtype=z.dtype, device=z.device)
        if mean is not None:
            z_btd = z_btd + torch.as_tensor(mean, dtype=z.dtype, device=z.device)
        return self.decoder(z_btd.transpose(1, 2))
