"""A Hugging Face-compatible EnCodec: ``transformers.EncodecModel``'s API (4.57) on fastcodec's fast modules.

``fastcodec.hf.EncodecModel`` (also ``fastcodec.HFEncodecModel``) has transformers' ``.config``,
``from_pretrained``, ``encode(input_values, padding_mask=None, bandwidth=None)`` ->
``EncodecEncoderOutput(audio_codes (nb_frames, B, K, T), audio_scales, last_frame_pad_length)``,
``decode(audio_codes, audio_scales, padding_mask=None, last_frame_pad_length=0)`` -> ``(audio_values,)`` and
``forward``, with the same chunking (``chunk_length_s``/``overlap``: the last chunk is shorter and its codes are
zero-padded to stack), padding-mask handling and bandwidth rule. The numbers are fastcodec's SEANet and RVQ
kernels: floats equal transformers' within float32 rounding, codes equal up to certified near-ties
(``tests/test_hf_compat.py``). transformers itself is not needed.

State_dict keys are fastcodec's (audiocraft's names); ``from_pretrained`` and ``fastcodec.load_checkpoint``
read transformers' layout.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing as tp

import torch
from torch import nn

from . import ops
from .pretrained import EncodecConfig, _as_config, build_model, load_into, load_pretrained
from .quantization import ResidualVectorQuantizer as _FastRVQ
from .reference.model import linear_overlap_add

__all__ = ["EncodecConfig", "EncodecModel", "EncodecOutput", "EncodecEncoderOutput", "EncodecDecoderOutput"]


class _ModelOutput:
    """transformers' ``ModelOutput`` habits: fields by attribute, key or index; ``to_tuple`` skips None."""

    def keys(self) -> tp.List[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, k) for k in self.keys())

    def __getitem__(self, k):
        return getattr(self, k) if isinstance(k, str) else self.to_tuple()[k]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.keys())


@dataclasses.dataclass
class EncodecOutput(_ModelOutput):
    audio_codes: tp.Optional[torch.Tensor] = None
    audio_values: tp.Optional[torch.Tensor] = None


@dataclasses.dataclass
class EncodecEncoderOutput(_ModelOutput):
    audio_codes: tp.Optional[torch.Tensor] = None
    audio_scales: tp.Optional[tp.List[tp.Optional[torch.Tensor]]] = None
    last_frame_pad_length: tp.Optional[int] = None


@dataclasses.dataclass
class EncodecDecoderOutput(_ModelOutput):
    audio_values: tp.Optional[torch.Tensor] = None


class EncodecModel(nn.Module):
    """transformers' ``EncodecModel`` on fastcodec's kernels. config: an ``EncodecConfig``, a dict, a preset
    name (``"encodec_32khz"``) or a ``transformers.EncodecConfig``; default: the 24 kHz model (random weights)."""

    main_input_name = "input_values"

    def __init__(self, config=None):
        super().__init__()
        config = EncodecConfig() if config is None else _as_config(config)
        codec = build_model(config)
        self.config = config
        self.encoder = codec.encoder
        self.decoder = codec.decoder
        self.quantizer = codec.quantizer
        self.bits_per_codebook = int(math.log2(config.codebook_size))
        self.eval()

    @classmethod
    def from_pretrained(cls, path: tp.Union[str, os.PathLike], config=None) -> "EncodecModel":
        """A local Hugging Face folder (``save_pretrained``'s), encodec ``.th`` or audiocraft compression
        checkpoint; never the network. ``config`` overrides the architecture the file describes."""
        cfg, state, what = load_pretrained(path, config)
        model = cls(cfg)
        load_into(model, state, what)
        return model.eval()

    def get_encoder(self) -> nn.Module:
        return self.encoder

    def get_decoder(self) -> nn.Module:
        return self.decoder

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    # -- quantizer ---------------------------------------------------------------------------------------

    def get_num_quantizers_for_bandwidth(self, bandwidth: tp.Optional[float] = None) -> int:
        """transformers' rule: ``max(1, floor(bandwidth * 1000 / (log2(bins) * frame_rate)))`` codebooks."""
        n_q = self.quantizer.total_codebooks
        if bandwidth is not None and bandwidth > 0.0:
            bw_per_q = math.log2(self.config.codebook_size) * self.config.frame_rate
            n_q = int(max(1, math.floor(bandwidth * 1000 / bw_per_q)))
        return min(n_q, self.quantizer.total_codebooks)

    def _quantize(self, emb: torch.Tensor, n_q: int) -> torch.Tensor:
        """emb (B, D, T) -> codes (B, n_q, T) with the first n_q codebooks (the module's own n_q untouched)."""
        q = self.quantizer
        if isinstance(q, _FastRVQ) and not q._use_reference():
            q._check_x(emb)
            cb, norms = q._codebooks(n_q)
            return ops.rvq_encode(emb.detach().contiguous(), cb, norms)
        q._check_x(emb)
        return q.vq.encode(emb, n_q=n_q).transpose(0, 1)

    # -- encode ------------------------------------------------------------------------------------------

    def _encode_frame(self, input_values: torch.Tensor, bandwidth: float
                      ) -> tp.Tuple[torch.Tensor, tp.Optional[torch.Tensor]]:
        length = input_values.shape[-1]
        duration = length / self.config.sampling_rate
        if self.config.chunk_length_s is not None and duration > 1e-5 + self.config.chunk_length_s:
            raise RuntimeError(f"Duration of frame ({duration}) is longer than chunk {self.config.chunk_length_s}")
        scale = None
        if self.config.normalize:
            # transformers' arithmetic (sum / C, not mean) so that the scales are bitwise theirs
            mono = torch.sum(input_values, 1, keepdim=True) / input_values.shape[1]
            scale = mono.pow(2).mean(dim=-1, keepdim=True).sqrt() + 1e-8
            input_values = input_values / scale
            scale = scale.view(-1, 1)
        emb = self.encoder(input_values)
        return self._quantize(emb, self.get_num_quantizers_for_bandwidth(bandwidth)), scale

    def _check_input(self, input_values, padding_mask) -> None:
        if not isinstance(input_values, torch.Tensor) or not input_values.is_floating_point():
            raise TypeError("input_values must be a floating point torch.Tensor (batch, channels, samples)")
        if input_values.dim() != 3:
            raise ValueError(f"input_values must be (batch, channels, samples), got shape {tuple(input_values.shape)}")
        channels = input_values.shape[1]
        if channels < 1 or channels > 2:
            raise ValueError(f"Number of audio channels must be 1 or 2, but got {channels}")
        if channels != self.config.audio_channels:
            raise ValueError(f"input_values has {channels} channel(s); this model takes {self.config.audio_channels}")
        if input_values.shape[0] == 0 or input_values.shape[-1] == 0:
            raise ValueError(f"input_values is empty: shape {tuple(input_values.shape)}")
        if padding_mask is not None:
            if not isinstance(padding_mask, torch.Tensor):
                raise TypeError(f"padding_mask must be a torch.Tensor, got {type(padding_mask).__name__}")
            if padding_mask.shape[0] != input_values.shape[0] or padding_mask.shape[-1] != input_values.shape[-1]:
                raise ValueError(f"padding_mask {tuple(padding_mask.shape)} does not fit input_values "
                                 f"{tuple(input_values.shape)}: expected (batch, [channels,] samples)")

    def encode(self, input_values: torch.Tensor, padding_mask: tp.Optional[torch.Tensor] = None,
               bandwidth: tp.Optional[float] = None, return_dict: tp.Optional[bool] = None):
        """input_values: (B, C, samples); padding_mask: (B, samples) or (B, C, samples), 1 = audio, 0 = padding
        (padded samples are zeroed before encoding, as transformers does); bandwidth: one of
        ``config.target_bandwidths`` (default: the smallest). Returns ``EncodecEncoderOutput(audio_codes
        (nb_frames, B, K, frame_len), audio_scales (list of (B, 1) or None), last_frame_pad_length)`` or a tuple."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if bandwidth is None:
            bandwidth = self.config.target_bandwidths[0]
        if bandwidth not in self.config.target_bandwidths:
            raise ValueError(f"This model doesn't support the bandwidth {bandwidth}. "
                             f"Select one of {self.config.target_bandwidths}.")
        self._check_input(input_values, padding_mask)
        input_length = input_values.shape[-1]
        chunk_length = self.config.chunk_length
        if chunk_length is None:
            chunk_length = stride = input_length
        else:
            stride = self.config.chunk_stride
        if padding_mask is None:
            padding_mask = torch.ones_like(input_values).bool()
        else:
            padding_mask = padding_mask.view(padding_mask.shape[0], -1, padding_mask.shape[-1])
        encoded_frames, scales = [], []
        for offset in range(0, input_length, stride):
            mask = padding_mask[..., offset:offset + chunk_length].bool()
            frame = mask * input_values[..., offset:offset + chunk_length]
            codes, scale = self._encode_frame(frame, bandwidth)
            encoded_frames.append(codes)
            scales.append(scale)
        # the last chunk is shorter: pad its codes with 0 so that the frames stack (decode removes the pad)
        last_frame_pad_length = encoded_frames[0].shape[-1] - encoded_frames[-1].shape[-1]
        if last_frame_pad_length > 0:
            encoded_frames[-1] = nn.functional.pad(encoded_frames[-1], (0, last_frame_pad_length), value=0)
        audio_codes = torch.stack(encoded_frames)
        if not return_dict:
            return audio_codes, scales, last_frame_pad_length
        return EncodecEncoderOutput(audio_codes, scales, last_frame_pad_length)

    # -- decode ------------------------------------------------------------------------------------------

    def _decode_frame(self, codes: torch.Tensor, scale: tp.Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self.decoder(self.quantizer.decode(codes))
        if scale is not None:
            out = out * scale.view(-1, 1, 1)
        return out

    def decode(self, audio_codes: torch.Tensor, audio_scales, padding_mask: tp.Optional[torch.Tensor] = None,
               return_dict: tp.Optional[bool] = None, last_frame_pad_length: tp.Optional[int] = 0):
        """audio_codes: (nb_frames, B, K, frame_len); audio_scales: per frame (B, 1) or None; padding_mask: its
        last axis gives the output length to keep. Returns ``EncodecDecoderOutput(audio_values (B, C, samples))``
        or ``(audio_values,)``."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if not isinstance(audio_codes, torch.Tensor) or audio_codes.dim() != 4:
            got = tuple(audio_codes.shape) if isinstance(audio_codes, torch.Tensor) else type(audio_codes).__name__
            raise ValueError(f"audio_codes must be a (nb_frames, batch, codebooks, frame_len) tensor, got {got}")
        if audio_scales is None or len(audio_scales) != len(audio_codes):
            raise ValueError(f"audio_scales must hold one entry (a (B, 1) tensor or None) per frame: "
                             f"{len(audio_codes)} frame(s)")
        last_frame_pad_length = last_frame_pad_length or 0
        if not 0 <= last_frame_pad_length < audio_codes.shape[-1]:
            raise ValueError(f"last_frame_pad_length must be in [0, {audio_codes.shape[-1]}), "
                             f"got {last_frame_pad_length}")
        if self.config.chunk_length is None:
            if len(audio_codes) != 1:
                raise ValueError(f"Expected one frame, got {len(audio_codes)}")
            frame = audio_codes[0]
            if last_frame_pad_length > 0:
                frame = frame[..., :-last_frame_pad_length]
            audio_values = self._decode_frame(frame, audio_scales[0])
        else:
            decoded = []
            for i, (frame, scale) in enumerate(zip(audio_codes, audio_scales)):
                if i == len(audio_codes) - 1 and last_frame_pad_length > 0:
                    frame = frame[..., :-last_frame_pad_length]
                decoded.append(self._decode_frame(frame, scale))
            audio_values = linear_overlap_add(decoded, self.config.chunk_stride or 1)
        if padding_mask is not None and padding_mask.shape[-1] < audio_values.shape[-1]:
            audio_values = audio_values[..., :padding_mask.shape[-1]]
        if not return_dict:
            return (audio_values,)
        return EncodecDecoderOutput(audio_values)

    def forward(self, input_values: torch.Tensor, padding_mask: tp.Optional[torch.Tensor] = None,
                bandwidth: tp.Optional[float] = None, audio_codes: tp.Optional[torch.Tensor] = None,
                audio_scales=None, return_dict: tp.Optional[bool] = None,
                last_frame_pad_length: tp.Optional[int] = 0):
        """Encode (unless ``audio_codes``/``audio_scales`` are given) and decode; the output is cut to the
        input length. Returns ``EncodecOutput(audio_codes, audio_values)`` or a tuple."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if padding_mask is None:
            padding_mask = torch.ones_like(input_values).bool()
        else:
            padding_mask = padding_mask.view(padding_mask.shape[0], -1, padding_mask.shape[-1])
        if (audio_codes is None) != (audio_scales is None):
            raise ValueError("pass both audio_codes and audio_scales, or neither "
                             f"(got audio_codes={'set' if audio_codes is not None else None}, "
                             f"audio_scales={'set' if audio_scales is not None else None})")
        if audio_codes is None:
            audio_codes, audio_scales, last_frame_pad_length = self.encode(input_values, padding_mask, bandwidth,
                                                                           False)
        audio_values = self.decode(audio_codes, audio_scales, padding_mask, return_dict=False,
                                   last_frame_pad_length=last_frame_pad_length)[0]
        if not return_dict:
            return audio_codes, audio_values
        return EncodecOutput(audio_codes=audio_codes, audio_values=audio_values)
