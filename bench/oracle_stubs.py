"""Run audiocraft 1.3.0's loss, discriminator and balancer modules without torchaudio and flashy.

torchaudio does not load next to torch 2.13 here, and flashy (with dora/submitit) is not installed.
audiocraft's ``losses/specloss.py`` and ``adversarial/discriminators/msstftd.py`` call
``torchaudio.transforms.MelSpectrogram`` / ``Spectrogram``; its balancer and ``AdversarialLoss`` call
``flashy.averager``, ``flashy.distrib.*`` and ``flashy.utils.readonly``. ``import_audiocraft(name)``
installs stand-ins for exactly those names, written here from torchaudio's and flashy's definitions and
independent of fastcodec's own code, then imports the audiocraft submodule:

- ``Spectrogram(center=False)``: ``torch.stft`` of the input reshaped to (-1, T) with a
  ``window_fn(win_length)`` window, divided by the window's L2 norm when ``normalized`` (torchaudio's
  ``normalized=True`` is ``"window"``), ``|X| ** power`` unless ``power`` is None.
- ``MelSpectrogram``: ``Spectrogram(power=2)`` then the mel matrix from **librosa**
  (``librosa.filters.mel(htk=True, norm=None)``, what torchaudio's ``melscale_fbanks`` defaults
  compute, in float64), applied as torchaudio's ``MelScale`` does.
- flashy: ``averager`` (bias-corrected EMA of dicts), ``distrib.average_metrics`` / ``broadcast_model`` /
  ``eager_sync_model`` (identity outside a distributed run), ``utils.readonly``.

Window and filterbank follow the input's dtype and device, so the modules also run in float64.
"""
from __future__ import annotations

import contextlib
import sys
import types
from collections import defaultdict

import torch
from torch import nn

from fastcodec._oracles import _stub_flashy, import_oracle


class _Spectrogram(nn.Module):
    def __init__(self, n_fft=400, win_length=None, hop_length=None, pad=0, window_fn=torch.hann_window,
                 power=2.0, normalized=False, center=True, pad_mode="reflect", onesided=True, **unused):
        super().__init__()
        if pad or center or not onesided or normalized not in (True, False):
            raise NotImplementedError("the torchaudio stand-in covers center=False, pad=0, onesided, "
                                      "normalized in (False, True) only")
        self.n_fft, self.power, self.normalized = n_fft, power, normalized
        self.win_length = win_length if win_length is not None else n_fft
        self.hop_length = hop_length if hop_length is not None else self.win_length // 2
        self.window_fn = window_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window = self.window_fn(self.win_length, dtype=x.dtype, device=x.device)
        shape = x.shape
        spec = torch.stft(x.reshape(-1, shape[-1]), self.n_fft, self.hop_length, self.win_length, window,
                          center=False, normalized=False, onesided=True, return_complex=True)
        spec = spec.reshape(shape[:-1] + spec.shape[-2:])
        if self.normalized:
            spec = spec / window.pow(2.0).sum().sqrt()
        if self.power is None:
            return spec
        return spec.abs().pow(self.power)


class _MelSpectrogram(nn.Module):
    def __init__(self, sample_rate=16000, n_fft=400, win_length=None, hop_length=None, f_min=0.0, f_max=None,
                 pad=0, n_mels=128, window_fn=torch.hann_window, power=2.0, normalized=False, center=True,
                 pad_mode="reflect", onesided=None, norm=None, mel_scale="htk", **unused):
        super().__init__()
        import librosa
        if norm is not None or mel_scale != "htk":
            raise NotImplementedError("the torchaudio stand-in covers norm=None, mel_scale='htk' only")
        self.spectrogram = _Spectrogram(n_fft=n_fft, win_length=win_length, hop_length=hop_length, pad=pad,
                                        window_fn=window_fn, power=power, normalized=normalized, center=center)
        f_max = f_max if f_max is not None else float(sample_rate // 2)
        fb = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=f_min, fmax=f_max, htk=True,
                                 norm=None, dtype="float64")
        self.fb64 = torch.from_numpy(fb).T.contiguous()  # (freqs, n_mels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spectrogram(x)
        fb = self.fb64.to(dtype=spec.dtype, device=spec.device)
        return torch.matmul(spec.transpose(-1, -2), fb).transpose(-1, -2)


def _flashy_averager(beta: float = 1):
    fix: dict = defaultdict(float)
    total: dict = defaultdict(float)

    def _update(metrics, weight: float = 1):
        for key, value in metrics.items():
            total[key] = total[key] * beta + weight * float(value)
            fix[key] = fix[key] * beta + weight
        return {key: tot / fix[key] for key, tot in total.items()}
    return _update


@contextlib.contextmanager
def _readonly(model):
    state = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, s in zip(model.parameters(), state):
            p.requires_grad_(s)


def install_stubs() -> None:
    """Register the torchaudio and flashy stand-ins in ``sys.modules`` (keeps a real torchaudio if one loads)."""
    ta = sys.modules.get("torchaudio")
    if ta is None:
        ta = sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    if not hasattr(ta, "transforms"):
        tr = types.ModuleType("torchaudio.transforms")
        tr.Spectrogram, tr.MelSpectrogram = _Spectrogram, _MelSpectrogram
        ta.transforms = tr
        sys.modules["torchaudio.transforms"] = tr
    _stub_flashy()
    flashy = sys.modules["flashy"]
    if not hasattr(flashy, "averager"):  # our stub (a real flashy has all of these)
        flashy.averager = _flashy_averager
        flashy.distrib.average_metrics = lambda metrics, count=1.: metrics
        flashy.distrib.broadcast_model = lambda model, *a, **k: None
        flashy.distrib.eager_sync_model = lambda model: contextlib.nullcontext()
        utils = types.ModuleType("flashy.utils")
        utils.readonly = _readonly
        flashy.utils = utils
        sys.modules["flashy.utils"] = utils


def import_audiocraft(name: str, on_missing=None):
    """``import_oracle(name)`` for audiocraft's losses/adversarial submodules, with the stand-ins installed.
    ``audiocraft.modules``' __init__ needs xformers: it is registered bare, with the two names
    (``NormConv2d``, ``pad_for_conv1d``) those submodules import from it."""
    install_stubs()
    conv = import_oracle("audiocraft.modules.conv", on_missing)
    mods = sys.modules["audiocraft.modules"]
    for attr in ("NormConv2d", "pad_for_conv1d"):
        if not hasattr(mods, attr):
            setattr(mods, attr, getattr(conv, attr))
    return import_oracle(name, on_missing)
