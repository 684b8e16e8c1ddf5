"""EnCodec's adversarial training: the multi-scale STFT discriminator, hinge losses, feature matching.

Faithful to audiocraft 1.3.0 (``audiocraft/adversarial/discriminators/msstftd.py``,
``audiocraft/adversarial/losses.py``) and encodec 0.1.1 (``encodec/msstftd.py``, the same network): same
constructor arguments, same ``state_dict`` keys (``discriminators.{i}.convs.{j}.conv.weight_g`` /
``weight_v`` / ``bias``; the first conv of each scale has a plain ``weight``, as there), same numbers.
The complex spectrogram is torchaudio's ``Spectrogram(normalized=True, center=False, power=None)``
rebuilt on ``torch.stft`` (``fastcodec.losses.spectrogram``), so torchaudio is not needed.

Fast where audiocraft is not: ``AdversarialLoss.train_adv`` runs fake and real through the
discriminator as one batch (one STFT and one pass per scale, then one backward), and
``AdversarialLoss.forward`` (the generator's losses) takes both signals' spectrograms from one STFT
call per scale and runs the real half without building a graph (audiocraft builds none there either:
its discriminator is read-only and real audio needs no gradient). Losses equal audiocraft's up to the
float rounding of batched convolutions.
"""
from __future__ import annotations

import contextlib
import typing as tp

import torch
from torch import nn
from torch.nn import functional as F

from .losses import spectrogram
from .reference.conv import _WeightNorm

__all__ = ["NormConv2d", "DiscriminatorSTFT", "MultiScaleSTFTDiscriminator", "AdversarialLoss",
           "FeatureMatchingLoss", "hinge_loss", "hinge_real_loss", "hinge_fake_loss", "hinge2_loss",
           "mse_loss", "mse_real_loss", "mse_fake_loss", "readonly", "get_2d_padding"]

FeatureMapType = tp.List[torch.Tensor]
MultiDiscriminatorOutputType = tp.Tuple[tp.List[torch.Tensor], tp.List[FeatureMapType]]
CONV2D_NORMS = ("none", "weight_norm", "time_group_norm")


class WeightNormConv2d(_WeightNorm, nn.Conv2d):
    """``nn.Conv2d`` with weight normalisation over dim 0 (``weight_g``: (out, 1, 1, 1), ``weight_v``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_weight_norm()


class NormConv2d(nn.Module):
    """audiocraft's ``NormConv2d``: ``.conv`` (weight-normed or plain ``nn.Conv2d``) then ``.norm``."""

    def __init__(self, *args, norm: str = "none", norm_kwargs: tp.Optional[dict] = None, **kwargs):
        super().__init__()
        if norm not in CONV2D_NORMS:
            raise ValueError(f"norm must be one of {list(CONV2D_NORMS)}, got {norm!r}")
        self.conv = WeightNormConv2d(*args, **kwargs) if norm == "weight_norm" else nn.Conv2d(*args, **kwargs)
        self.norm = (nn.GroupNorm(1, self.conv.out_channels, **(norm_kwargs or {})) if norm == "time_group_norm"
                     else nn.Identity())
        self.norm_type = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


def get_2d_padding(kernel_size: tp.Tuple[int, int], dilation: tp.Tuple[int, int] = (1, 1)):
    return (((kernel_size[0] - 1) * dilation[0]) // 2, ((kernel_size[1] - 1) * dilation[1]) // 2)


class DiscriminatorSTFT(nn.Module):
    """One scale of the MS-STFT discriminator: complex STFT (real and imaginary parts as channels,
    (B, 2C, frames, freqs)), 2-D convs with LeakyReLU; returns (logits, feature maps)."""

    def __init__(self, filters: int, in_channels: int = 1, out_channels: int = 1,
                 n_fft: int = 1024, hop_length: int = 256, win_length: int = 1024, max_filters: int = 1024,
                 filters_scale: int = 1, kernel_size: tp.Tuple[int, int] = (3, 9), dilations: tp.List = [1, 2, 4],
                 stride: tp.Tuple[int, int] = (1, 2), normalized: bool = True, norm: str = "weight_norm",
                 activation: str = "LeakyReLU", activation_params: dict = {"negative_slope": 0.2}):
        super().__init__()
        if len(kernel_size) != 2 or len(stride) != 2:
            raise ValueError(f"kernel_size and stride must have 2 entries, got {kernel_size} and {stride}")
        if not (0 < win_length <= n_fft and hop_length > 0):
            raise ValueError(f"need 0 < win_length <= n_fft and hop_length > 0, got n_fft={n_fft}, "
                             f"hop_length={hop_length}, win_length={win_length}")
        if min(filters_scale * filters, max_filters) != filters:
            # audiocraft/encodec build such a network too, but its second conv then expects
            # min(filters_scale * filters, max_filters) input channels where the first gives `filters`
            raise ValueError(f"filters_scale * filters must equal filters or be capped to it by max_filters "
                             f"(the first two convs must agree), got filters={filters}, "
                             f"filters_scale={filters_scale}, max_filters={max_filters}")
        self.filters = filters
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.win_length = win_length
        self.normalized = normalized
        self.activation = getattr(torch.nn, activation)(**activation_params)
        self._windows: dict = {}
        spec_channels = 2 * self.in_channels
        self.convs = nn.ModuleList()
        # as in audiocraft/encodec: the first conv takes the default norm ('none'), the others `norm`
        self.convs.append(NormConv2d(spec_channels, self.filters, kernel_size=kernel_size,
                                     padding=get_2d_padding(kernel_size)))
        in_chs = min(filters_scale * self.filters, max_filters)
        for i, dilation in enumerate(dilations):
            out_chs = min((filters_scale ** (i + 1)) * self.filters, max_filters)
            self.convs.append(NormConv2d(in_chs, out_chs, kernel_size=kernel_size, stride=stride,
                                         dilation=(dilation, 1), padding=get_2d_padding(kernel_size, (dilation, 1)),
                                         norm=norm))
            in_chs = out_chs
        out_chs = min((filters_scale ** (len(dilations) + 1)) * self.filters, max_filters)
        k2 = (kernel_size[0], kernel_size[0])
        self.convs.append(NormConv2d(in_chs, out_chs, kernel_size=k2, padding=get_2d_padding(k2), norm=norm))
        self.conv_post = NormConv2d(out_chs, self.out_channels, kernel_size=k2, padding=get_2d_padding(k2), norm=norm)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_windows"] = {}
        return state

    def spec(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, T) -> (B, 2C, frames, n_fft // 2 + 1): real parts of every channel, then imaginary."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError("x must be a floating point torch.Tensor")
        if x.dim() != 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, T), got shape {tuple(x.shape)}")
        if x.shape[-1] < self.n_fft:
            raise ValueError(f"x has {x.shape[-1]} samples, fewer than n_fft={self.n_fft}")
        key = (x.dtype, x.device)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = torch.hann_window(self.win_length, dtype=x.dtype, device=x.device)
        z = spectrogram(x, self.n_fft, self.hop_length, self.win_length, window, normalized=self.normalized,
                        power=None)  # (B, C, freqs, frames)
        z = torch.cat([z.real, z.imag], dim=1)
        return z.transpose(2, 3)

    def forward_spec(self, z: torch.Tensor) -> tp.Tuple[torch.Tensor, FeatureMapType]:
        fmap = []
        for layer in self.convs:
            z = self.activation(layer(z))
            fmap.append(z)
        return self.conv_post(z), fmap

    def forward(self, x: torch.Tensor) -> tp.Tuple[torch.Tensor, FeatureMapType]:
        return self.forward_spec(self.spec(x))


class MultiScaleSTFTDiscriminator(nn.Module):
    """MS-STFT discriminator (EnCodec): one ``DiscriminatorSTFT`` per (n_fft, hop, win) scale.

    ``forward(x)`` -> (logits per scale, feature maps per scale), as audiocraft's. ``sep_channels`` is
    stored and, as in audiocraft 1.3.0, not used by ``forward``.
    """

    def __init__(self, filters: int, in_channels: int = 1, out_channels: int = 1, sep_channels: bool = False,
                 n_ffts: tp.List[int] = [1024, 2048, 512], hop_lengths: tp.List[int] = [256, 512, 128],
                 win_lengths: tp.List[int] = [1024, 2048, 512], **kwargs):
        super().__init__()
        if not len(n_ffts) == len(hop_lengths) == len(win_lengths):
            raise ValueError(f"n_ffts, hop_lengths and win_lengths must have the same length, got "
                             f"{len(n_ffts)}, {len(hop_lengths)}, {len(win_lengths)}")
        self.sep_channels = sep_channels
        self.discriminators = nn.ModuleList([
            DiscriminatorSTFT(filters, in_channels=in_channels, out_channels=out_channels,
                              n_fft=n_ffts[i], win_length=win_lengths[i], hop_length=hop_lengths[i], **kwargs)
            for i in range(len(n_ffts))])

    @property
    def num_discriminators(self) -> int:
        return len(self.discriminators)

    def forward(self, x: torch.Tensor) -> MultiDiscriminatorOutputType:
        logits, fmaps = [], []
        for disc in self.discriminators:
            logit, fmap = disc(x)
            logits.append(logit)
            fmaps.append(fmap)
        return logits, fmaps


# -- losses (audiocraft.adversarial.losses) --------------------------------------------------------

def mse_real_loss(x: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(x, torch.tensor(1., device=x.device).expand_as(x))


def mse_fake_loss(x: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(x, torch.tensor(0., device=x.device).expand_as(x))


def hinge_real_loss(x: torch.Tensor) -> torch.Tensor:
    """Discriminator on real logits: mean(relu(1 - x))."""
    return -torch.mean(torch.min(x - 1, torch.tensor(0., device=x.device).expand_as(x)))


def hinge_fake_loss(x: torch.Tensor) -> torch.Tensor:
    """Discriminator on fake logits: mean(relu(1 + x))."""
    return -torch.mean(torch.min(-x - 1, torch.tensor(0., device=x.device).expand_as(x)))


def mse_loss(x: torch.Tensor) -> torch.Tensor:
    if x.numel() == 0:
        return torch.tensor([0.0], device=x.device)
    return F.mse_loss(x, torch.tensor(1., device=x.device).expand_as(x))


def hinge_loss(x: torch.Tensor) -> torch.Tensor:
    """Generator on fake logits (EnCodec's adversarial loss): -mean(x)."""
    if x.numel() == 0:
        return torch.tensor([0.0], device=x.device)
    return -x.mean()


def hinge2_loss(x: torch.Tensor) -> torch.Tensor:
    if x.numel() == 0:
        return torch.tensor([0.0], device=x.device)
    return -torch.mean(torch.min(x - 1, torch.tensor(0., device=x.device).expand_as(x)))


class FeatureMatchingLoss(nn.Module):
    """Feature matching: sum over a scale's feature maps of ``loss(fake, real)`` (L1), divided by their
    number when ``normalize``; audiocraft's ``FeatureMatchingLoss``."""

    def __init__(self, loss: nn.Module = torch.nn.L1Loss(), normalize: bool = True):
        super().__init__()
        self.loss = loss
        self.normalize = normalize

    def forward(self, fmap_fake: tp.List[torch.Tensor], fmap_real: tp.List[torch.Tensor]) -> torch.Tensor:
        if len(fmap_fake) != len(fmap_real) or not fmap_fake:
            raise ValueError(f"need two equally long, non-empty lists of feature maps, got {len(fmap_fake)} "
                             f"and {len(fmap_real)}")
        feat_loss = torch.tensor(0., device=fmap_fake[0].device)
        for i, (feat_fake, feat_real) in enumerate(zip(fmap_fake, fmap_real)):
            if feat_fake.shape != feat_real.shape:
                raise ValueError(f"feature map {i}: fake {tuple(feat_fake.shape)} != real {tuple(feat_real.shape)}")
            feat_loss += self.loss(feat_fake, feat_real)
        if self.normalize:
            feat_loss /= len(fmap_fake)
        return feat_loss


@contextlib.contextmanager
def readonly(model: nn.Module):
    """Temporarily set ``requires_grad=False`` on every parameter (flashy's ``utils.readonly``)."""
    params = list(model.parameters())
    state = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, s in zip(params, state):
            p.requires_grad_(s)


def _sync_grads(model: nn.Module) -> None:
    """Average the gradients over the torch.distributed workers (flashy's ``eager_sync_model``); no-op
    outside a distributed run."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


class AdversarialLoss(nn.Module):
    """audiocraft's ``AdversarialLoss`` for a ``MultiScaleSTFTDiscriminator``, fake and real batched.

    ``train_adv(fake, real)``: discriminator loss sum_k loss_fake(D_k(fake)) + loss_real(D_k(real))
    (divided by the number of scales when ``normalize``), backward, gradients averaged over
    torch.distributed workers, optimizer step; returns the loss. ``forward(fake, real)``: the generator's
    (adversarial, feature matching) losses with the discriminator read-only. The discriminator's state
    dict nests under ``adversary.``; the optimizer's is saved under ``optimizer`` as in audiocraft.
    """

    def __init__(self, adversary: MultiScaleSTFTDiscriminator, optimizer: torch.optim.Optimizer,
                 loss: tp.Callable = hinge_loss, loss_real: tp.Callable = hinge_real_loss,
                 loss_fake: tp.Callable = hinge_fake_loss, loss_feat: tp.Optional[tp.Callable] = None,
                 normalize: bool = True):
        super().__init__()
        if not isinstance(adversary, MultiScaleSTFTDiscriminator):
            raise TypeError("adversary must be a fastcodec MultiScaleSTFTDiscriminator, got "
                            f"{type(adversary).__name__}")
        self.adversary = adversary
        self.optimizer = optimizer
        self.loss = loss
        self.loss_real = loss_real
        self.loss_fake = loss_fake
        self.loss_feat = loss_feat
        self.normalize = normalize

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "optimizer"] = self.optimizer.state_dict()
        return destination

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.optimizer.load_state_dict(state_dict.pop(prefix + "optimizer"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _check(fake: torch.Tensor, real: torch.Tensor) -> None:
        if not isinstance(fake, torch.Tensor) or not isinstance(real, torch.Tensor):
            raise TypeError("fake and real must be torch.Tensors")
        if fake.shape != real.shape:
            raise ValueError(f"fake and real must have the same shape, got {tuple(fake.shape)} and {tuple(real.shape)}")

    def discriminator_loss(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """The loss ``train_adv`` minimises, from one batched pass (no backward, no step)."""
        self._check(fake, real)
        B = fake.shape[0]
        loss = torch.tensor(0., device=fake.device)
        logits, _ = self.adversary(torch.cat([fake.detach(), real.detach()], dim=0))
        for logit in logits:
            loss += self.loss_fake(logit[:B]) + self.loss_real(logit[B:])
        if self.normalize:
            loss /= len(logits)
        return loss

    def train_adv(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        loss = self.discriminator_loss(fake, real)
        self.optimizer.zero_grad()
        loss.backward()
        _sync_grads(self.adversary)
        self.optimizer.step()
        return loss

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> tp.Tuple[torch.Tensor, torch.Tensor]:
        """(adversarial loss, feature matching loss) for the generator; gradients reach ``fake`` only."""
        self._check(fake, real)
        B = fake.shape[0]
        adv = torch.tensor(0., device=fake.device)
        feat = torch.tensor(0., device=fake.device)
        n = self.adversary.num_discriminators
        with readonly(self.adversary):
            both = torch.cat([fake, real.detach()], dim=0)
            for disc in self.adversary.discriminators:
                z = disc.spec(both)  # one STFT for both signals
                logit_fake, fmap_fake = disc.forward_spec(z[:B])
                with torch.no_grad():
                    _, fmap_real = disc.forward_spec(z[B:])
                adv += self.loss(logit_fake)
                if self.loss_feat:
                    feat += self.loss_feat(fmap_fake, fmap_real)
        if self.normalize:
            adv /= n
            feat /= n
        return adv, feat
