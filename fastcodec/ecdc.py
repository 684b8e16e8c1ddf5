"""``.ecdc`` files: encodec 0.1.1's compressed-audio format, read and written byte for byte as encodec does.

Layout (``encodec/binary.py``, ``encodec/compress.py``)::

    b"ECDC"  uint8 version (0)  uint32 header size (big-endian)  JSON header
    {"m": model name, "al": audio length in samples, "nc": codebooks, "lm": entropy coded?}
    then per segment (one for models without segments):
        [float32 big-endian scale, only for models that normalise the volume (48 kHz)]
        the codes in time-major order (t, then codebook k), each ``bits_per_codebook`` (10) bits,
        packed least-significant bit first into bytes, the last byte of the segment zero-padded.

A segment's frame count is ``ceil(segment_samples / sample_rate * frame_rate)``, computed in floating point
exactly as encodec does. Files written here decode with ``encodec.compress.decompress`` and the reverse,
given the same weights. The entropy-coded mode (``"lm": true``, encodec's ``use_lm``) replaces the packed
codes of each segment by an arithmetic-coded stream driven by encodec's small transformer language model
(``fastcodec.ecdc_lm``); it needs the LM's weights (``lm=``, from ``ecdc_lm.load_lm``), which fastcodec
does not download.

encodec 0.1.1 knows the model names ``encodec_24khz`` and ``encodec_48khz`` only; a file written with another
model (e.g. MusicGen's 32 kHz codec) reads back here but not in encodec.
"""
from __future__ import annotations

import io
import json
import math
import struct
import typing as tp

import numpy as np
import torch

_HEADER = struct.Struct("!4sBI")
_MAGIC = b"ECDC"
_SCALE = struct.Struct("!f")
ENCODEC_MODEL_NAMES = ("encodec_24khz", "encodec_48khz")


class EcdcError(ValueError):
    """A ``.ecdc`` stream is malformed, truncated, or does not fit the model."""


def write_header(fo: tp.IO[bytes], metadata: dict) -> None:
    meta = json.dumps(metadata).encode("utf-8")  # json's default separators, as encodec writes them
    fo.write(_HEADER.pack(_MAGIC, 0, len(meta)))
    fo.write(meta)


def _read_exactly(fo: tp.IO[bytes], size: int, what: str) -> bytes:
    buf = fo.read(size)
    if len(buf) != size:
        raise EcdcError(f"the stream ended inside the {what} ({len(buf)} of {size} bytes)")
    return buf


def read_header(fo: tp.IO[bytes]) -> dict:
    magic, version, size = _HEADER.unpack(_read_exactly(fo, _HEADER.size, "ECDC header"))
    if magic != _MAGIC:
        raise EcdcError(f"not an ECDC stream (magic {magic!r}, expected {_MAGIC!r})")
    if version != 0:
        raise EcdcError(f"ECDC version {version} is not supported (only 0)")
    try:
        meta = json.loads(_read_exactly(fo, size, "JSON header").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EcdcError(f"the ECDC header is not valid JSON: {e}") from None
    for key, typ in (("m", str), ("al", int), ("nc", int), ("lm", bool)):
        if not isinstance(meta.get(key), typ) or (typ is int and isinstance(meta[key], bool)):
            raise EcdcError(f"the ECDC header lacks {key!r} of type {typ.__name__}: {meta}")
    if meta["al"] <= 0 or meta["nc"] <= 0:
        raise EcdcError(f"the ECDC header has a non-positive length or codebook count: {meta}")
    return meta


def pack_codes(codes: torch.Tensor, bits: int) -> bytes:
    """Codes ``(K, T)`` -> encodec's ``BitPacker`` bytes: time-major, ``bits`` each, LSB first, zero-padded."""
    v = codes.detach().cpu().to(torch.int64).t().reshape(-1).numpy()
    if v.size and (v.min() < 0 or v.max() >= (1 << bits)):
        raise EcdcError(f"codes must lie in [0, {1 << bits}), got [{v.min()}, {v.max()}]")
    b = ((v[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(b, bitorder="little").tobytes()


def unpack_codes(data: bytes, bits: int, K: int, T: int) -> torch.Tensor:
    """The inverse of ``pack_codes``: bytes -> codes ``(K, T)`` int64."""
    n = K * T
    b = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: n * bits]
    v = (b.reshape(n, bits).astype(np.int64) << np.arange(bits)).sum(1)
    return torch.from_numpy(v.reshape(T, K).T.copy())


def frame_lengths(model, audio_length: int) -> list[int]:
    """Frames per segment of a stream of ``audio_length`` samples (encodec's float rule)."""
    seg = model.segment_length or audio_length
    stride = model.segment_stride or audio_length
    return [int(math.ceil(min(audio_length - off, seg) / model.sample_rate * model.frame_rate))
            for off in range(0, audio_length, stride)]


def _check_model(model) -> None:
    name = getattr(model, "name", "unset")
    if not isinstance(name, str) or name in ("", "unset"):
        raise EcdcError("the model has no name (model.name) to write in the ECDC header; encodec's models are "
                        f"{' and '.join(ENCODEC_MODEL_NAMES)}")


def frames_to_bytes(model, frames: tp.Sequence[tuple[torch.Tensor, tp.Optional[torch.Tensor]]],
                    audio_length: int, lm=None) -> bytes:
    """Encoded frames (``model.encode`` of one waveform) -> ``.ecdc`` bytes; entropy coded with ``lm``."""
    _check_model(model)
    if not frames:
        raise EcdcError("no frames to write")
    K = frames[0][0].shape[1]
    lengths = frame_lengths(model, audio_length)
    if len(lengths) != len(frames):
        raise EcdcError(f"{len(frames)} frames for {audio_length} samples; the model makes {len(lengths)}")
    fo = io.BytesIO()
    write_header(fo, {"m": model.name, "al": int(audio_length), "nc": int(K), "lm": lm is not None})
    for (codes, scale), n in zip(frames, lengths):
        if codes.dim() != 3 or codes.shape[0] != 1 or codes.shape[1] != K or codes.shape[2] != n:
            raise EcdcError(f"frame codes must be (1, {K}, {n}), got {tuple(codes.shape)}")
        if (scale is not None) != bool(model.normalize):
            raise EcdcError("a frame's scale must be given exactly when the model normalises the volume")
        if scale is not None:
            fo.write(_SCALE.pack(float(scale.reshape(-1)[0])))
        if lm is None:
            fo.write(pack_codes(codes[0], model.bits_per_codebook))
        else:
            from .ecdc_lm import encode_segment
            fo.write(encode_segment(lm, codes[0]))
    return fo.getvalue()


def bytes_to_frames(model, data: bytes, lm=None) -> tuple[dict, list[tuple[torch.Tensor, tp.Optional[torch.Tensor]]]]:
    """``.ecdc`` bytes -> (header, frames for ``model.decode``). The header's model name must be the model's;
    an entropy-coded file needs ``lm`` (encodec's language model for this codec)."""
    fo = io.BytesIO(data)
    meta = read_header(fo)
    if meta["lm"] and lm is None:
        raise EcdcError("this file is entropy coded with encodec's language model (use_lm=True): pass its "
                        "weights (--lm PATH, e.g. encodec_lm_24khz-1608e3c0.th; fastcodec does not download them)")
    if meta["m"] != getattr(model, "name", None):
        raise EcdcError(f"the file was written by the model {meta['m']!r}, not by this one "
                        f"({getattr(model, 'name', None)!r}): load the matching checkpoint")
    K, bits = meta["nc"], model.bits_per_codebook
    if K > model.quantizer.total_codebooks:
        raise EcdcError(f"the file has {K} codebooks, the model {model.quantizer.total_codebooks}")
    frames = []
    for n in frame_lengths(model, meta["al"]):
        scale = None
        if model.normalize:
            (s,) = _SCALE.unpack(_read_exactly(fo, _SCALE.size, "segment scale"))
            scale = torch.tensor([[s]], dtype=torch.float32)
        if meta["lm"]:
            from .ecdc_lm import decode_segment

            def read_byte():
                b = fo.read(1)
                return b[0] if b else None
            try:
                frames.append((decode_segment(lm, read_byte, K, n), scale))
            except EOFError as e:
                raise EcdcError(str(e)) from None
            continue
        size = (K * n * bits + 7) // 8
        frames.append((unpack_codes(_read_exactly(fo, size, "codes"), bits, K, n)[None], scale))
    return meta, frames


def compress(model, wav: torch.Tensor, use_lm: bool = False, lm=None) -> bytes:
    """encodec's ``compress``: a waveform ``(C, T)`` at the model's rate -> ``.ecdc`` bytes; ``use_lm`` entropy
    codes them with ``lm`` (encodec's language model, ``fastcodec.ecdc_lm.load_lm``)."""
    if use_lm and lm is None:
        raise EcdcError("use_lm=True needs encodec's language model weights (lm=fastcodec.ecdc_lm.load_lm(model, "
                        "path)); fastcodec does not download them")
    if not isinstance(wav, torch.Tensor) or wav.dim() != 2:
        raise ValueError(f"wav must be a (channels, samples) tensor, got {getattr(wav, 'shape', type(wav))}")
    _check_model(model)
    with torch.no_grad():
        frames = model.encode(wav[None])
    return frames_to_bytes(model, frames, wav.shape[-1], lm if use_lm else None)


def decompress(data: bytes, model, lm=None) -> tuple[torch.Tensor, int]:
    """encodec's ``decompress`` with the model given: ``.ecdc`` bytes -> (waveform ``(C, T)``, sample rate)."""
    meta, frames = bytes_to_frames(model, data, lm)
    with torch.no_grad():
        wav = model.decode(frames)
    return wav[0, :, : meta["al"]], model.sample_rate
