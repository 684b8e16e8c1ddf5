"""EnCodec's training losses: time-domain L1, the multi-scale mel loss, the commitment loss and SI-SNR.

Faithful to audiocraft 1.3.0 (``audiocraft/losses/specloss.py``, ``sisnr.py``) and to
``audiocraft.quantization.core_vq`` (commitment loss): same constructor arguments, same numbers.
audiocraft builds its spectrograms with torchaudio (``MelSpectrogram``: a Hann-windowed ``torch.stft``,
``|X|^2``, then an HTK mel filterbank with no area normalisation). torchaudio is not needed here: the
filterbank (``mel_filterbank``) and the spectrogram (``spectrogram``) follow torchaudio's definitions on
top of ``torch.stft``; ``tests/test_losses.py`` checks the filterbank against librosa's and the
spectrogram against a plain DFT, and everything downstream against audiocraft's own code.

Fast where it counts: a loss compares a reconstruction ``x`` with its target ``y``; audiocraft computes
four mel spectrograms per scale (linear and log, for each signal, each with a graph). Here the log
spectrogram is taken from the linear one, so each signal is transformed once per scale: when the target
needs no gradient (training), its spectrogram is taken without a graph; otherwise (or under no_grad)
one ``torch.stft`` runs on ``x`` and ``y`` stacked along the batch. (Stacking a target that needs no
gradient would make the STFT's backward run over both halves: measured slower than audiocraft.) The
results equal audiocraft's up to float rounding.
"""
from __future__ import annotations

import math
import typing as tp

import torch
from torch import nn
from torch.nn import functional as F

from .reference.conv import pad_for_conv1d
from .reference.functional import commitment_loss as _reference_commitment_loss

__all__ = ["mel_filterbank", "spectrogram", "MelSpectrogramWrapper", "MelSpectrogramL1Loss",
           "MultiScaleMelSpectrogramLoss", "time_l1_loss", "commitment_loss", "SISNR", "si_snr"]


def _check_pair(x: torch.Tensor, y: torch.Tensor, xname: str = "x", yname: str = "y") -> None:
    for name, t in ((xname, x), (yname, y)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating point torch.Tensor, got {type(t).__name__}"
                            + (f" of {t.dtype}" if isinstance(t, torch.Tensor) else ""))
    if x.shape != y.shape:
        raise ValueError(f"{xname} and {yname} must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dtype != y.dtype or x.device != y.device:
        raise ValueError(f"{xname} and {yname} must share dtype and device, got {x.dtype}/{x.device} "
                         f"and {y.dtype}/{y.device}")


def _hz_to_mel_htk(f: float) -> float:
    return 2595.0 * math.log10(1.0 + f / 700.0)


def mel_filterbank(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: float,
                   dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Triangular HTK mel filterbank ``(n_freqs, n_mels)``, no area normalisation.

    torchaudio's ``melscale_fbanks(..., norm=None, mel_scale="htk")`` (what its ``MelSpectrogram``
    uses by default), equal to ``librosa.filters.mel(htk=True, norm=None).T``. Computed in float64,
    then cast to ``dtype``.
    """
    if n_freqs < 2 or n_mels < 1:
        raise ValueError(f"n_freqs must be >= 2 and n_mels >= 1, got {n_freqs} and {n_mels}")
    if not 0.0 <= f_min < f_max:
        raise ValueError(f"need 0 <= f_min < f_max, got f_min={f_min}, f_max={f_max}")
    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs, dtype=torch.float64)
    m_pts = torch.linspace(_hz_to_mel_htk(f_min), _hz_to_mel_htk(f_max), n_mels + 2, dtype=torch.float64)
    f_pts = 700.0 * (10.0 ** (m_pts / 2595.0) - 1.0)
    f_diff = f_pts[1:] - f_pts[:-1]  # (n_mels + 1)
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)  # (n_freqs, n_mels + 2)
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    fb = torch.clamp(torch.minimum(down, up), min=0.0)
    return fb.to(dtype=dtype, device=device)


def spectrogram(x: torch.Tensor, n_fft: int, hop_length: int, win_length: int, window: torch.Tensor,
                normalized: bool = False, power: tp.Optional[float] = 2.0) -> torch.Tensor:
    """torchaudio's ``Spectrogram(center=False, onesided=True)`` on ``x`` (..., T): one ``torch.stft`` over
    all leading dimensions -> (..., n_fft // 2 + 1, frames); complex when ``power`` is None.
    ``normalized`` divides by the window's L2 norm (torchaudio's ``normalized=True``)."""
    shape = x.shape
    spec = torch.stft(x.reshape(-1, shape[-1]), n_fft=n_fft, hop_length=hop_length, win_length=win_length,
                      window=window, center=False, normalized=False, onesided=True, return_complex=True)
    spec = spec.reshape(shape[:-1] + spec.shape[-2:])
    if normalized:
        spec = spec / window.pow(2.0).sum().sqrt()
    if power is None:
        return spec
    return spec.abs().pow(power) if power != 1.0 else spec.abs()


class _Cached:
    """Per (dtype, device) cache of a window or filterbank (constants: no parameters, nothing to invalidate)."""

    def __init__(self, make: tp.Callable[[torch.dtype, torch.device], torch.Tensor]):
        self._make = make
        self._cache: dict = {}

    def get(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (dtype, device)
        t = self._cache.get(key)
        if t is None:
            t = self._cache[key] = self._make(dtype, device)
        return t


class MelSpectrogramWrapper(nn.Module):
    """audiocraft's ``MelSpectrogramWrapper``: reflect-pad by ``(n_fft - hop) // 2`` each side, right-pad
    so every frame is full (``ceil(T / hop)`` frames), mel power spectrogram (``center=False``), optional
    ``log10(floor_level + mel)``. Input (B, T) or (B, C, T); output (B, C * n_mels, frames)."""

    def __init__(self, n_fft: int = 1024, hop_length: int = 256, win_length: tp.Optional[int] = None,
                 n_mels: int = 80, sample_rate: float = 22050, f_min: float = 0.0, f_max: tp.Optional[float] = None,
                 log: bool = True, normalized: bool = False, floor_level: float = 1e-5):
        super().__init__()
        self.n_fft = int(n_fft)
        self.hop_length = int(hop_length)
        self.win_length = int(win_length) if win_length is not None else self.n_fft
        if not (self.hop_length > 0 and 0 < self.win_length <= self.n_fft):
            raise ValueError(f"need hop_length > 0 and 0 < win_length <= n_fft, got hop_length={hop_length}, "
                             f"win_length={win_length}, n_fft={n_fft}")
        self.n_mels = n_mels
        self.sample_rate = sample_rate
        self.f_min = f_min
        self.f_max = f_max if f_max is not None else float(sample_rate // 2)
        self.log = log
        self.normalized = normalized
        self.floor_level = floor_level
        self._window = _Cached(lambda dt, dev: torch.hann_window(self.win_length, dtype=dt, device=dev))
        self._fb = _Cached(lambda dt, dev: mel_filterbank(self.n_fft // 2 + 1, self.f_min, self.f_max, self.n_mels,
                                                          self.sample_rate, dt, dev))

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_window"), state.pop("_fb")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._window = _Cached(lambda dt, dev: torch.hann_window(self.win_length, dtype=dt, device=dev))
        self._fb = _Cached(lambda dt, dev: mel_filterbank(self.n_fft // 2 + 1, self.f_min, self.f_max, self.n_mels,
                                                          self.sample_rate, dt, dev))

    def mel(self, x: torch.Tensor) -> torch.Tensor:
        """Linear mel spectrogram (B, C, n_mels, frames) of x (B, T) or (B, C, T), after audiocraft's padding."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating point torch.Tensor")
        if x.dim() == 2:
            x = x.unsqueeze(1)
        if x.dim() != 3:
            raise ValueError(f"x must be (B, T) or (B, C, T), got shape {tuple(x.shape)}")
        p = (self.n_fft - self.hop_length) // 2
        if x.shape[-1] <= p:
            raise ValueError(f"x has {x.shape[-1]} samples; the reflect padding needs more than {p} "
                             f"(n_fft={self.n_fft}, hop_length={self.hop_length})")
        x = F.pad(x, (p, p), "reflect")
        x = pad_for_conv1d(x, self.n_fft, self.hop_length)
        spec = spectrogram(x, self.n_fft, self.hop_length, self.win_length, self._window.get(x.dtype, x.device),
                           normalized=self.normalized, power=2.0)  # (B, C, freqs, frames)
        fb = self._fb.get(x.dtype, x.device)
        return torch.matmul(spec.transpose(-1, -2), fb).transpose(-1, -2)

    def post(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, C, n_mels, frames) -> optional log, then (B, C * n_mels, frames)."""
        if self.log:
            mel = torch.log10(self.floor_level + mel)
        B, C, freqs, frames = mel.shape
        return mel.reshape(B, C * freqs, frames)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.mel(x))


class MelSpectrogramL1Loss(nn.Module):
    """audiocraft's ``MelSpectrogramL1Loss``: L1 between the (log) mel spectrograms of x and y, both
    spectrograms from one STFT call."""

    def __init__(self, sample_rate: int, n_fft: int = 1024, hop_length: int = 256, win_length: int = 1024,
                 n_mels: int = 80, f_min: float = 0.0, f_max: tp.Optional[float] = None,
                 log: bool = True, normalized: bool = False, floor_level: float = 1e-5):
        super().__init__()
        self.melspec = MelSpectrogramWrapper(n_fft=n_fft, hop_length=hop_length, win_length=win_length,
                                             n_mels=n_mels, sample_rate=sample_rate, f_min=f_min, f_max=f_max,
                                             log=log, normalized=normalized, floor_level=floor_level)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_pair(x, y)
        s = self.melspec(torch.cat([x, y], dim=0))
        s_x, s_y = s.chunk(2, dim=0)
        return F.l1_loss(s_x, s_y)


class MultiScaleMelSpectrogramLoss(nn.Module):
    """audiocraft's ``MultiScaleMelSpectrogramLoss`` (EnCodec's reconstruction loss in frequency).

    For scales i in [range_start, range_end): n_fft = win = 2**i, hop = 2**i / 4; loss = sum_i
    L1(mel_x, mel_y) + alpha_i * MSE(log10(floor + mel_x), log10(floor + mel_y)) with
    alpha_i = sqrt(2**i - 1) (1 if ``alphas`` is False); ``normalized`` divides by sum(alpha_i + 1).
    One ``torch.stft`` per scale on x and y together (audiocraft: four mel spectrograms per scale).
    """

    def __init__(self, sample_rate: int, range_start: int = 6, range_end: int = 11,
                 n_mels: int = 64, f_min: float = 0.0, f_max: tp.Optional[float] = None,
                 normalized: bool = False, alphas: bool = True, floor_level: float = 1e-5):
        super().__init__()
        if range_end <= range_start:
            raise ValueError(f"range_end must be > range_start, got {range_start}..{range_end}")
        self.normalized = normalized
        self.floor_level = floor_level
        self.alphas: list = []
        self.total = 0
        self.mels = nn.ModuleList()
        for i in range(range_start, range_end):
            self.mels.append(MelSpectrogramWrapper(n_fft=2 ** i, hop_length=(2 ** i) / 4, win_length=2 ** i,
                                                   n_mels=n_mels, sample_rate=sample_rate, f_min=f_min, f_max=f_max,
                                                   log=False, normalized=normalized, floor_level=floor_level))
            self.alphas.append(math.sqrt(2 ** i - 1) if alphas else 1)
            self.total += self.alphas[-1] + 1

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: reconstruction, y: target, (B, T) or (B, C, T) -> scalar."""
        _check_pair(x, y)
        loss = 0.0
        # the target usually needs no gradient: then its spectrogram is taken without a graph (a batched
        # STFT would make the backward run over both halves: measured slower than audiocraft at B=4, 1 s)
        batched = y.requires_grad or not torch.is_grad_enabled()
        xy = torch.cat([x, y], dim=0) if batched else None
        for alpha, mel in zip(self.alphas, self.mels):
            if batched:
                s = mel.mel(xy)
            else:
                with torch.no_grad():
                    s_y = mel.mel(y)
                s = torch.cat([mel.mel(x), s_y], dim=0)
            B, C, freqs, frames = s.shape
            s = s.reshape(B, C * freqs, frames)
            s_x, s_y = s.chunk(2, dim=0)
            l_x, l_y = torch.log10(self.floor_level + s).chunk(2, dim=0)
            loss += F.l1_loss(s_x, s_y) + alpha * F.mse_loss(l_x, l_y)
        if self.normalized:
            loss = loss / self.total
        return loss


def time_l1_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """EnCodec's time-domain reconstruction loss: mean |x - y| (audiocraft's ``l1`` criterion)."""
    _check_pair(x, y)
    return F.l1_loss(x, y)


# One codebook layer's commitment loss, as audiocraft's ``VectorQuantization``: MSE between the layer's
# input and its (detached) quantized output; the RVQ's ``penalty`` is its mean over layers. One
# implementation, the reference's.
commitment_loss = _reference_commitment_loss


def _unfold(a: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    *shape, length = a.shape
    n_frames = math.ceil(length / stride)
    tgt_length = (n_frames - 1) * stride + kernel_size
    a = F.pad(a, (0, tgt_length - length)).contiguous()
    strides = list(a.stride())
    return a.as_strided([*shape, n_frames, kernel_size], strides[:-1] + [stride, 1])


def si_snr(out_sig: torch.Tensor, ref_sig: torch.Tensor, sample_rate: int = 16000,
           segment: tp.Optional[float] = 20, overlap: float = 0.5,
           epsilon: float = torch.finfo(torch.float32).eps) -> torch.Tensor:
    """Negative SI-SNR in dB of (B, C, T) signals, on frames of ``segment`` seconds with ``overlap``
    (None: the whole signal); audiocraft's ``SISNR`` (lower is better)."""
    _check_pair(out_sig, ref_sig, "out_sig", "ref_sig")
    if ref_sig.dim() != 3:
        raise ValueError(f"ref_sig must be (B, C, T), got shape {tuple(ref_sig.shape)}")
    T = ref_sig.shape[-1]
    if segment is None:
        frame = stride = T
    else:
        frame = int(segment * sample_rate)
        stride = int(frame * (1 - overlap))
        if frame < 1 or stride < 1:
            raise ValueError(f"segment={segment} s at sample_rate={sample_rate} with overlap={overlap} gives "
                             f"frame {frame} and stride {stride}; both must be >= 1")
    eps = epsilon * frame
    gt = _unfold(ref_sig, frame, stride)
    est = _unfold(out_sig, frame, stride)
    gt = gt - gt.mean(-1, True)
    est = est - est.mean(-1, True)
    dot = torch.einsum("bcft,bcft->bcf", gt, est)
    proj = dot[:, :, :, None] * gt / (eps + gt.pow(2).sum(-1, True))
    noise = est - proj
    sisnr = 10 * (torch.log10(eps + proj.pow(2).sum(-1, True)) - torch.log10(eps + noise.pow(2).sum(-1, True)))
    return -1 * sisnr[..., 0].mean()


class SISNR(nn.Module):
    """audiocraft's ``SISNR`` module (returns minus the SI-SNR in dB); see ``si_snr``."""

    def __init__(self, sample_rate: int = 16000, segment: tp.Optional[float] = 20, overlap: float = 0.5,
                 epsilon: float = torch.finfo(torch.float32).eps):
        super().__init__()
        self.sample_rate = sample_rate
        self.segment = segment
        self.overlap = overlap
        self.epsilon = epsilon

    def forward(self, out_sig: torch.Tensor, ref_sig: torch.Tensor) -> torch.Tensor:
        return si_snr(out_sig, ref_sig, self.sample_rate, self.segment, self.overlap, self.epsilon)
