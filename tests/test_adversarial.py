"""fastcodec.adversarial against audiocraft 1.3.0 (msstftd.py, adversarial/losses.py) and encodec 0.1.1 (msstftd.py).

How the comparison is made: the discriminators of audiocraft and encodec are their own code, built with
the same random weights loaded into ours (the state dicts load both ways, strict). Their complex
spectrogram comes from ``fastcodec.bench.oracle_stubs``' torchaudio stand-in (``torch.stft`` plus
torchaudio's window normalisation, written independently of fastcodec); fastcodec's STFT itself is
checked against a plain DFT in ``test_losses.py``. So these tests check everything downstream of the
spectrogram: channel layout, the 2-D convs (weight norm, dilations, strides, padding), activations,
logits and feature maps, hinge and feature-matching arithmetic, the batched real+fake passes, and the
gradients with respect to the reconstruction and to the discriminator's parameters. float64 runs
compare to 1e-9 relative (measured ~1e-15); float32 runs within 4x the oracle's float32-vs-float64 error.
"""
from __future__ import annotations

import copy
import pickle

import pytest
import torch

from fastcodec import adversarial as A
from fastcodec.bench.oracle_stubs import import_audiocraft

from .utils import assert_close

pytestmark = [
    # audiocraft's and encodec's NormConv2d use the deprecated torch.nn.utils.weight_norm
    pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning"),
    # tiny shapes: 2 OpenMP threads on the loaded 2-vCPU machine cost more than they give
    pytest.mark.usefixtures("one_torch_thread"),
]

SMALL = dict(filters=4, n_ffts=[128, 256, 64], hop_lengths=[32, 64, 16], win_lengths=[128, 256, 64])


@pytest.fixture(scope="module")
def ac():
    return (import_audiocraft("audiocraft.adversarial.discriminators.msstftd", pytest.fail),
            import_audiocraft("audiocraft.adversarial.losses", pytest.fail))


def _pair(ac_msstftd, dtype=torch.float64, **kw):
    cfg = {**SMALL, **kw}
    theirs = ac_msstftd.MultiScaleSTFTDiscriminator(**cfg)
    # perturb g away from ||v|| so weight norm is exercised
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if name.endswith("weight_g"):
                p.mul_(torch.rand_like(p) + 0.5)
    ours = A.MultiScaleSTFTDiscriminator(**cfg)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours.to(dtype), theirs.to(dtype)


def test_state_dict_keys_match_audiocraft_and_encodec(ac):
    encodec_msstftd = import_audiocraft("encodec.msstftd", pytest.fail)
    ours = A.MultiScaleSTFTDiscriminator(filters=32)
    theirs = ac[0].MultiScaleSTFTDiscriminator(filters=32)
    enc = encodec_msstftd.MultiScaleSTFTDiscriminator(filters=32)
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}
    assert shapes == {k: v.shape for k, v in enc.state_dict().items()}
    enc.load_state_dict(ours.state_dict(), strict=True)
    assert ours.num_discriminators == 3


def _run(disc, x):
    x = x.detach().clone().requires_grad_(True)
    logits, fmaps = disc(x)
    out = sum(lg.sum() for lg in logits) + sum(f.square().mean() for fm in fmaps for f in fm)
    params = [p for _, p in sorted(disc.named_parameters())]
    grads = torch.autograd.grad(out, [x] + params)
    return logits, fmaps, grads


@pytest.mark.parametrize("oracle_name", ["audiocraft", "encodec"])
def test_discriminator_matches_oracles(ac, oracle_name):
    ours, theirs = _pair(ac[0])
    if oracle_name == "encodec":
        enc = import_audiocraft("encodec.msstftd", pytest.fail).MultiScaleSTFTDiscriminator(**SMALL).double()
        enc.load_state_dict(theirs.state_dict(), strict=True)
        theirs = enc
    x = torch.randn(2, 1, 700, dtype=torch.float64)
    lo, fo, go = _run(ours, x)
    lt, ft, gt = _run(theirs, x)
    for a, b in zip(lo, lt):
        assert_close(a, b, atol=1e-12, rtol=1e-9, name="logits")
    for fa, fb in zip(fo, ft):
        assert len(fa) == len(fb) == 5
        for a, b in zip(fa, fb):
            assert_close(a, b, atol=1e-12, rtol=1e-9, name="fmap")
    for i, (a, b) in enumerate(zip(go, gt)):
        assert_close(a, b, atol=1e-12 * max(1.0, b.abs().max().item()), rtol=1e-9, name=f"grad {i}")


def test_discriminator_float32_and_options(ac):
    kw = dict(dilations=[1, 2], kernel_size=(3, 5), in_channels=2,
              activation="ELU", activation_params={"alpha": 1.0})
    ours, theirs = _pair(ac[0], **kw)
    x = torch.randn(2, 2, 600, dtype=torch.float64)
    _, _, g64 = _run(theirs, x)
    lt64, _ = theirs(x)
    theirs32 = ac[0].MultiScaleSTFTDiscriminator(**{**SMALL, **kw})  # (audiocraft's deepcopy fails after a forward)
    theirs32.load_state_dict(theirs.state_dict())
    ours32 = ours.float()
    lt32, _ = theirs32(x.float())
    lo32, _ = ours32(x.float())
    for a, b, ref in zip(lo32, lt32, lt64):
        tol = 4 * (b.double() - ref).abs().max().item() + 1e-7
        assert_close(a.double(), ref, atol=tol, rtol=0, name="float32 logits")


def test_loss_functions_match_audiocraft(ac):
    losses = ac[1]
    x = torch.randn(3, 1, 5, 7)
    for name in ["hinge_loss", "hinge_real_loss", "hinge_fake_loss", "hinge2_loss", "mse_loss", "mse_real_loss",
                 "mse_fake_loss"]:
        assert torch.equal(getattr(A, name)(x), getattr(losses, name)(x)), name
    fm = [torch.randn(2, 3, 4, 5) for _ in range(3)]
    fr = [torch.randn(2, 3, 4, 5) for _ in range(3)]
    assert torch.equal(A.FeatureMatchingLoss()(fm, fr), losses.FeatureMatchingLoss()(fm, fr))


class _SGD:
    """Plain SGD with an optimizer's interface: torch.optim's constructor imports torch._dynamo (~5 s on
    this machine), which these tests do not need."""

    def __init__(self, params, lr):
        self.params, self.lr = list(params), lr

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        for p in self.params:
            if p.grad is not None:
                p.sub_(self.lr * p.grad)

    def state_dict(self):
        return {"lr": self.lr}

    def load_state_dict(self, state):
        self.lr = state["lr"]


def _adv_pair(ac, lr=0.1):
    ours_d, theirs_d = _pair(ac[0])
    theirs = ac[1].AdversarialLoss(theirs_d, _SGD(theirs_d.parameters(), lr=lr), loss=ac[1].hinge_loss,
                                   loss_real=ac[1].hinge_real_loss, loss_fake=ac[1].hinge_fake_loss,
                                   loss_feat=ac[1].FeatureMatchingLoss())
    ours = A.AdversarialLoss(ours_d, _SGD(ours_d.parameters(), lr=lr), loss_feat=A.FeatureMatchingLoss())
    return ours, theirs


def test_adversarial_loss_matches_audiocraft(ac):
    """Generator side (adversarial + feature matching, grad w.r.t. the reconstruction) and discriminator
    side (train_adv's loss and the parameters after one SGD step), float64."""
    ours, theirs = _adv_pair(ac)
    real = torch.randn(2, 1, 700, dtype=torch.float64)
    fake = (real + 0.5 * torch.randn_like(real)).requires_grad_(True)
    adv_o, feat_o = ours(fake, real)
    g_o = torch.autograd.grad(adv_o + 0.3 * feat_o, fake)[0]
    adv_t, feat_t = theirs(fake, real)
    g_t = torch.autograd.grad(adv_t + 0.3 * feat_t, fake)[0]
    assert_close(adv_o, adv_t, atol=1e-12, rtol=1e-9, name="adv")
    assert_close(feat_o, feat_t, atol=1e-12, rtol=1e-9, name="feat")
    assert_close(g_o, g_t, atol=1e-12 * g_t.abs().max().item(), rtol=1e-9, name="generator grad")
    assert all(p.requires_grad for p in ours.adversary.parameters())  # read-only was undone
    assert all(p.grad is None for p in ours.adversary.parameters())
    for _ in range(2):
        d_o = ours.train_adv(fake, real)
        d_t = theirs.train_adv(fake, real)
        assert_close(d_o, d_t, atol=1e-12, rtol=1e-9, name="discriminator loss")
    theirs_sd = sorted(theirs.adversary.state_dict().items())
    for (k, a), (_, b) in zip(sorted(ours.adversary.state_dict().items()), theirs_sd):
        assert_close(a, b, atol=1e-12, rtol=1e-9, name=f"after train_adv: {k}")
    assert "optimizer" in ours.state_dict()


def test_pickle_deepcopy_and_bad_input(ac):
    d = A.MultiScaleSTFTDiscriminator(**SMALL)
    x = torch.randn(1, 1, 300)
    d(x)
    d2 = pickle.loads(pickle.dumps(d))
    assert torch.equal(d2(x)[0][0], d(x)[0][0])
    assert torch.equal(copy.deepcopy(d)(x)[0][1], d(x)[0][1])
    with pytest.raises(ValueError, match=r"x must be \(B, 1, T\)"):
        d(torch.randn(1, 2, 300))
    with pytest.raises(ValueError, match="fewer than n_fft"):
        d(torch.randn(1, 1, 100))
    with pytest.raises(ValueError, match="norm must be one of"):
        A.MultiScaleSTFTDiscriminator(filters=4, norm="spectral_norm")
    with pytest.raises(ValueError, match="filters_scale"):
        A.MultiScaleSTFTDiscriminator(filters=4, filters_scale=2)
    with pytest.raises(ValueError, match="same length"):
        A.MultiScaleSTFTDiscriminator(filters=4, n_ffts=[64], hop_lengths=[16, 8], win_lengths=[64])
    adv = A.AdversarialLoss(d, _SGD(d.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="same shape"):
        adv(torch.randn(1, 1, 300), torch.randn(2, 1, 300))
    with pytest.raises(TypeError, match="adversary"):
        A.AdversarialLoss(torch.nn.Linear(2, 2), _SGD(d.parameters(), lr=0.1))
