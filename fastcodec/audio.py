"""Audio files in and out: read with soundfile (libsndfile), resample with soxr, write WAV atomically.

The channel and sample-rate rules are encodec 0.1.1's ``convert_audio``:

- to mono: the mean of the channels;
- to stereo: a mono signal is duplicated, a stereo one kept;
- more than two channels (encodec refuses them): mono is their mean, stereo their first two (audiocraft's rule);
- then resample to the model's rate. encodec uses torchaudio's ``Resample`` (sinc interpolation), which does
  not load next to torch 2.13; soxr (libsoxr, "HQ" quality) is the maintained resampler used here. The two
  differ by far less than the codec's own error, but not bitwise: codes of resampled audio can differ from
  encodec's pipeline at a few frames; audio already at the model's rate is untouched.

Errors name the file and say why (``AudioError``, a ValueError): missing, unreadable/corrupt, unsupported
format, empty, NaN/Inf samples.
"""
from __future__ import annotations

import os
import tempfile
import typing as tp

import numpy as np
import torch

PathLike = tp.Union[str, os.PathLike]


class AudioError(ValueError):
    """An audio file cannot be read or written; the message names the file and the reason."""


def _sf():
    try:
        import soundfile
    except ImportError as e:  # pragma: no cover - a runtime dependency
        raise AudioError("reading audio needs soundfile (pip install soundfile)") from e
    return soundfile


def audio_extensions() -> set[str]:
    """Lower-case extensions (with the dot) libsndfile reads here: .wav, .flac, .ogg, .mp3 (libsndfile >= 1.1)..."""
    exts = {"." + f.lower() for f in _sf().available_formats() if f != "RAW"}  # RAW needs a given layout
    if ".aiff" in exts:
        exts.add(".aif")
    if ".ogg" in exts:
        exts |= {".oga", ".opus"}
    return exts


class AudioInfo(tp.NamedTuple):
    frames: int
    sample_rate: int
    channels: int

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate


def audio_info(path: PathLike) -> AudioInfo:
    """Length, rate and channels from the file's header (reads no samples)."""
    sf = _sf()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioError(f"{path}: no such file")
    try:
        info = sf.info(path)
    except Exception as e:
        raise AudioError(f"{path}: cannot read the audio header ({_why(e)}): corrupt or not a format "
                         f"libsndfile reads (WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF, ...)") from None
    if info.frames <= 0:
        raise AudioError(f"{path}: the file holds no audio samples")
    return AudioInfo(int(info.frames), int(info.samplerate), int(info.channels))


def read_audio(path: PathLike, start: int = 0, frames: int = -1) -> tuple[torch.Tensor, int]:
    """Read ``path`` as float32 ``(channels, samples)`` in [-1, 1] and its sample rate.

    ``start``/``frames`` read a window (in samples at the file's rate); the default reads everything.
    """
    sf = _sf()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioError(f"{path}: no such file")
    try:
        data, sr = sf.read(path, start=start, frames=frames, dtype="float32", always_2d=True)
    except Exception as e:
        raise AudioError(f"{path}: cannot read audio ({_why(e)}): corrupt or not a format libsndfile reads "
                         f"(WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF, ...)") from None
    if data.shape[0] == 0 and start == 0:
        raise AudioError(f"{path}: the file holds no audio samples")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: the audio holds NaN or Inf samples")
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(sr)


def _why(e: Exception) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def convert_channels(wav: torch.Tensor, channels: int) -> torch.Tensor:
    """``(C, T)`` -> ``(channels, T)`` by encodec's rules (see the module docstring)."""
    if wav.dim() != 2:
        raise ValueError(f"wav must be (channels, samples), got shape {tuple(wav.shape)}")
    c = wav.shape[0]
    if c == channels:
        return wav
    if channels == 1:
        return wav.mean(0, keepdim=True)
    if channels == 2:
        return wav.expand(2, -1) if c == 1 else wav[:2]
    if c == 1:
        return wav.expand(channels, -1)
    raise ValueError(f"cannot convert {c} channels to {channels}: only to mono, stereo or from mono")


def resample(wav: torch.Tensor, sr: int, target_sr: int) -> torch.Tensor:
    """Resample ``(C, T)`` float32 from ``sr`` to ``target_sr`` with soxr (HQ); identity when equal."""
    if sr == target_sr:
        return wav
    if sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {sr} -> {target_sr}")
    try:
        import soxr
    except ImportError as e:  # pragma: no cover - a runtime dependency
        raise AudioError("resampling needs soxr (pip install soxr)") from e
    out = soxr.resample(wav.detach().cpu().numpy().T, sr, target_sr, quality="HQ")
    return torch.from_numpy(np.ascontiguousarray(np.asarray(out, dtype=np.float32).reshape(len(out), -1).T))


def convert_audio(wav: torch.Tensor, sr: int, target_sr: int, target_channels: int) -> torch.Tensor:
    """encodec's ``convert_audio``: channels first, then the sample rate. ``(C, T)`` -> ``(target_channels, T')``."""
    return resample(convert_channels(wav, target_channels).contiguous(), sr, target_sr)


def load_for_model(path: PathLike, sample_rate: int, channels: int) -> torch.Tensor:
    """Read ``path`` and convert it to ``(channels, samples)`` at ``sample_rate``."""
    wav, sr = read_audio(path)
    return convert_audio(wav, sr, sample_rate, channels)


def write_audio(path: PathLike, wav: torch.Tensor, sample_rate: int, rescale: bool = False) -> None:
    """Write ``(C, T)`` as 16-bit PCM (encodec's ``save_audio``: clip to +-0.99, or with ``rescale``
    scale down to peak 0.99), atomically: a temporary file in the same folder, then ``os.replace``."""
    sf = _sf()
    path = os.fspath(path)
    if wav.dim() != 2:
        raise ValueError(f"wav must be (channels, samples), got shape {tuple(wav.shape)}")
    wav = wav.detach().float().cpu()
    limit = 0.99
    if rescale:
        wav = wav * min(limit / max(wav.abs().max().item(), 1e-12), 1.0)
    else:
        wav = wav.clamp(-limit, limit)
    ext = os.path.splitext(path)[1].lower()
    fmt = {".wav": "WAV", ".flac": "FLAC"}.get(ext)
    if fmt is None:
        raise AudioError(f"{path}: write .wav or .flac")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise AudioError(f"{path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=ext)
    os.close(fd)
    try:
        sf.write(tmp, wav.numpy().T, sample_rate, subtype="PCM_16", format=fmt)
        os.replace(tmp, path)
    except BaseException:
        with _ignore():
            os.unlink(tmp)
        raise


class _ignore:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _ignore():
            os.unlink(tmp)
        raise
