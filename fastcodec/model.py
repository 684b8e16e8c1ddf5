"""``fastcodec.EncodecModel``: the EnCodec model built from the fast modules, with exact streaming.

Same attributes, presets, ``state_dict`` and frames as the reference (``fastcodec.reference.EncodecModel``,
itself encodec 0.1.1's); the encoder/decoder are ``fastcodec.SEANetEncoder``/``SEANetDecoder`` and the
quantizer ``fastcodec.ResidualVectorQuantizer``. Causal models stream (``stream_state`` / ``stream`` /
``stream_flush`` and the encode/decode halves, see ``fastcodec.streaming``).
"""
from __future__ import annotations

import os

from .precision import check_precision
from .quantization import ResidualVectorQuantizer
from .reference.model import EncodecModel as _ReferenceEncodecModel
from .seanet import SEANetDecoder, SEANetEncoder
from .streaming import CodecStreamingMixin

# encodec 0.1.1's checkpoint file names (encodec.model.EncodecModel._get_pretrained)
_ENCODEC_FILES = {"encodec_model_24khz": "encodec_24khz-d7cc33bc.th",
                  "encodec_model_48khz": "encodec_48khz-7e698e3e.th"}
_FAST = dict(encoder_cls=SEANetEncoder, decoder_cls=SEANetDecoder, quantizer_cls=ResidualVectorQuantizer)


class EncodecModel(CodecStreamingMixin, _ReferenceEncodecModel):
    """Drop-in for encodec's ``EncodecModel`` (24 kHz mono causal / 32 kHz MusicGen / 48 kHz stereo presets).

    The presets take encodec's ``pretrained``/``repository`` arguments: ``pretrained=True`` loads encodec's
    checkpoint file from the local folder ``repository`` (never the network); ``from_pretrained(path)``
    reads any local checkpoint or Hugging Face folder.
    """

    def __init__(self, *args, precision: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if precision is not None:
            self.precision = precision

    @property
    def precision(self) -> str:
        """The encoder's and decoder's compute precision: "float32" (default, exact) or "bf16" (bf16 operands,
        float32 accumulation; ``fastcodec.precision``); "mixed" when the encoder and decoder were set apart.
        Settable (sets both); the quantizer's search stays exact."""
        precisions = {getattr(m, "precision", "float32") for m in (self.encoder, self.decoder)}
        return precisions.pop() if len(precisions) == 1 else "mixed"

    @precision.setter
    def precision(self, value: str) -> None:
        check_precision(value)
        for name in ("encoder", "decoder"):
            m = getattr(self, name)
            if not hasattr(type(m), "precision"):
                raise TypeError(f"precision={value!r}: the {name} ({type(m).__name__}) is not a fastcodec SEANet, "
                                "which is what computes in bf16")
        self.encoder.precision = self.decoder.precision = value

    @classmethod
    def _preset(cls, name: str, pretrained: bool, repository, module_classes) -> "EncodecModel":
        precision = module_classes.pop("precision", None)
        if precision is not None:
            check_precision(precision)
        model = cls._preset_float32(name, pretrained, repository, module_classes)
        if precision is not None:
            model.precision = precision
        return model

    @classmethod
    def _preset_float32(cls, name: str, pretrained: bool, repository, module_classes) -> "EncodecModel":
        build = getattr(super(), name)
        if not pretrained:
            if repository is not None:
                raise ValueError(f"{name}: repository={repository!r} is only read with pretrained=True")
            return build(**{**_FAST, **module_classes})
        if repository is None:
            build(pretrained=True)  # raises: the message says to use a local file
        file = _ENCODEC_FILES.get(name)
        if file is None:
            raise ValueError(f"{name}: encodec publishes no checkpoint for this model; use "
                             "EncodecModel.from_pretrained(path) with a local Hugging Face folder")
        path = os.path.join(os.fspath(repository), file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name}(pretrained=True, repository=...): {path} does not exist "
                                    f"(encodec's checkpoint file {file} must be in that folder)")
        return cls.from_pretrained(path, **module_classes)

    @classmethod
    def encodec_model_24khz(cls, pretrained: bool = False, repository=None, **module_classes) -> "EncodecModel":
        return cls._preset("encodec_model_24khz", pretrained, repository, module_classes)

    @classmethod
    def encodec_model_32khz(cls, pretrained: bool = False, repository=None, **module_classes) -> "EncodecModel":
        return cls._preset("encodec_model_32khz", pretrained, repository, module_classes)

    @classmethod
    def encodec_model_48khz(cls, pretrained: bool = False, repository=None, **module_classes) -> "EncodecModel":
        return cls._preset("encodec_model_48khz", pretrained, repository, module_classes)

    @classmethod
    def from_pretrained(cls, path, config=None, precision: str | None = None, **module_classes) -> "EncodecModel":
        """Any local checkpoint or Hugging Face folder (``fastcodec.pretrained``); ``precision``: as the property."""
        if precision is not None:
            check_precision(precision)
        model = super().from_pretrained(path, config=config, **{**_FAST, **module_classes})
        if precision is not None:
            model.precision = precision
        return model
