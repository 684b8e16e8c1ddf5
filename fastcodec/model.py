"""``fastcodec.EncodecModel``: the EnCodec model built from the fast modules, with exact streaming.

Same attributes, presets, ``state_dict`` and frames as the reference (``fastcodec.reference.EncodecModel``,
itself encodec 0.1.1's); the encoder/decoder are ``fastcodec.SEANetEncoder``/``SEANetDecoder`` and the
quantizer ``fastcodec.ResidualVectorQuantizer``. Causal models stream (``stream_state`` / ``stream`` /
``stream_flush`` and the encode/decode halves, see ``fastcodec.streaming``).
"""
from __future__ import annotations

from .quantization import ResidualVectorQuantizer
from .reference.model import EncodecModel as _ReferenceEncodecModel
from .seanet import SEANetDecoder, SEANetEncoder
from .streaming import CodecStreamingMixin

_FAST = dict(encoder_cls=SEANetEncoder, decoder_cls=SEANetDecoder, quantizer_cls=ResidualVectorQuantizer)


class EncodecModel(CodecStreamingMixin, _ReferenceEncodecModel):
    """Drop-in for encodec's ``EncodecModel`` (24 kHz mono causal / 48 kHz stereo presets)."""

    @classmethod
    def encodec_model_24khz(cls, **module_classes) -> "EncodecModel":
        return super().encodec_model_24khz(**{**_FAST, **module_classes})

    @classmethod
    def encodec_model_48khz(cls, **module_classes) -> "EncodecModel":
        return super().encodec_model_48khz(**{**_FAST, **module_classes})
