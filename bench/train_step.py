"""One EnCodec training step (generator + discriminator) of the 24 kHz model: fastcodec vs audiocraft's modules.

    python -m fastcodec.bench.train_step [--batch 8] [--seconds 1] [--repeats 5] [--threads 2] [--json PATH]

A step, as audiocraft's compression solver runs it: codec forward in training mode (SEANet encoder,
RVQ with EMA and dead-code expiry, SEANet decoder); the MS-STFT discriminator's hinge update on
(reconstruction, target); the generator terms (time L1, multi-scale mel, adversarial, feature
matching) through the balancer (weights 0.1 / 1 / 3 / 3), the commitment penalty, Adam steps.

- fastcodec: ``fastcodec.EncodecModel.encodec_model_24khz()`` (fast SEANet and RVQ), ``fastcodec.losses``,
  ``fastcodec.adversarial`` (fake and real batched), ``fastcodec.balancer`` (penalty in the same backward).
- audiocraft: the same model built from audiocraft 1.3.0's ``SEANetEncoder`` / ``SEANetDecoder`` /
  ``ResidualVectorQuantizer``, its ``MultiScaleMelSpectrogramLoss``, ``MultiScaleSTFTDiscriminator``,
  ``AdversarialLoss`` and ``Balancer``, with ``fastcodec.bench.oracle_stubs``' torchaudio / flashy stand-ins
  (torchaudio's transforms are ``torch.stft`` + a matmul, as there). The penalty is backpropagated first,
  on its own, as audiocraft's solver does.

Both start from the same weights (codebooks already initialised, so no k-means inside the timed steps)
and the same batch. Before timing, every term of a step is computed by both from the same state, no
optimizer step, and compared (relative 1e-4; measured ~5e-7: the codec outputs agree to float32
rounding). After one Adam step the discriminators differ more (Adam's first step is ``lr * sign(g)``,
so gradient entries near zero that round differently flip), hence the check before the steps.
The second table times the losses and the discriminator alone, on a fixed reconstruction. Timed
round-robin in one process; ratios are the numbers to read on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

import fastcodec
from fastcodec import adversarial as A
from fastcodec import losses as L
from fastcodec.balancer import Balancer
from fastcodec.bench.harness import machine_info
from fastcodec.bench.oracle_stubs import import_audiocraft
from fastcodec.reference.model import EncodecModel as ReferenceModel

WEIGHTS = {"l1": 0.1, "msspec": 1.0, "adv": 3.0, "feat": 3.0}


def _models(seed: int):
    seanet, vq = import_audiocraft("audiocraft.modules.seanet"), import_audiocraft("audiocraft.quantization.vq")
    fast = fastcodec.EncodecModel.encodec_model_24khz()
    ac = ReferenceModel.encodec_model_24khz(encoder_cls=seanet.SEANetEncoder, decoder_cls=seanet.SEANetDecoder,
                                            quantizer_cls=vq.ResidualVectorQuantizer)
    g = torch.Generator().manual_seed(seed)
    sd = fast.state_dict()
    with torch.no_grad():
        scale = fast.encoder(torch.randn(1, 1, 24_000, generator=g)).std().item()
    for i in range(fast.quantizer.total_codebooks):
        pre = f"quantizer.vq.layers.{i}._codebook."
        embed = torch.randn(sd[pre + "embed"].shape, generator=g) * scale * 0.7 ** i
        sd[pre + "embed"], sd[pre + "embed_avg"] = embed, embed.clone()
        sd[pre + "cluster_size"] = torch.full_like(sd[pre + "cluster_size"], 4.0)
        sd[pre + "inited"] = torch.ones_like(sd[pre + "inited"])
    fast.load_state_dict(sd)
    ac.load_state_dict(sd)
    for m in (fast, ac):
        m.set_target_bandwidth(6.0)
        m.train()
    return fast, ac


class _Step:
    """One provider's training state; ``step(x)`` runs a G+D step and returns the loss terms."""

    def __init__(self, name, model, disc, adv, msspec, balancer, fused_penalty):
        self.name, self.model, self.disc, self.adv, self.msspec = name, model, disc, adv, msspec
        self.balancer, self.fused_penalty = balancer, fused_penalty
        self.opt = torch.optim.Adam(model.parameters(), lr=3e-4, betas=(0.5, 0.9))

    def codec(self, x):
        m = self.model
        q = m.quantizer(m.encoder(x), m.frame_rate)
        return m.decoder(q.x)[..., :x.shape[-1]], q.penalty

    def losses(self, y, x):
        d_loss = self.adv.train_adv(y, x)
        terms = {"l1": L.time_l1_loss(y, x), "msspec": self.msspec(y, x)}
        terms["adv"], terms["feat"] = self.adv(y, x)
        return d_loss, terms

    def step(self, x):
        y, penalty = self.codec(x)
        d_loss, terms = self.losses(y, x)
        self.opt.zero_grad()
        if self.fused_penalty:
            self.balancer.backward(terms, y, other=penalty)
        else:
            penalty.backward(retain_graph=True)
            self.balancer.backward(terms, y)
        self.opt.step()
        return {"d_loss": d_loss.item(), "penalty": penalty.item(), **{k: v.item() for k, v in terms.items()}}

    @torch.no_grad()
    def terms(self, x):
        """Every loss term of a step, without any backward or optimizer step (the check)."""
        y, penalty = self.codec(x)
        logits_fake, _ = self.disc(y)
        logits_real, _ = self.disc(x)
        d_loss = sum(self.adv.loss_fake(f) + self.adv.loss_real(r)
                     for f, r in zip(logits_fake, logits_real)) / len(logits_fake)
        adv, feat = self.adv(y, x)
        return {"d_loss": float(d_loss), "penalty": float(penalty), "l1": float(L.time_l1_loss(y, x)),
                "msspec": float(self.msspec(y, x)), "adv": float(adv), "feat": float(feat)}

    def losses_only(self, y_leaf, x):
        d_loss, terms = self.losses(y_leaf, x)
        self.balancer.backward(terms, y_leaf)
        y_leaf.grad = None


def _providers(seed: int):
    fast, ac = _models(seed)
    ac_msstftd = import_audiocraft("audiocraft.adversarial.discriminators.msstftd")
    ac_losses = import_audiocraft("audiocraft.adversarial.losses")
    ac_spec = import_audiocraft("audiocraft.losses.specloss")
    ac_bal = import_audiocraft("audiocraft.losses.balancer")
    torch.manual_seed(seed)
    d_ac = ac_msstftd.MultiScaleSTFTDiscriminator(filters=32)
    d_fast = A.MultiScaleSTFTDiscriminator(filters=32)
    d_fast.load_state_dict(d_ac.state_dict())
    adv_ac = ac_losses.AdversarialLoss(d_ac, torch.optim.Adam(d_ac.parameters(), lr=3e-4, betas=(0.5, 0.9)),
                                       loss=ac_losses.hinge_loss, loss_real=ac_losses.hinge_real_loss,
                                       loss_fake=ac_losses.hinge_fake_loss, loss_feat=ac_losses.FeatureMatchingLoss())
    adv_fast = A.AdversarialLoss(d_fast, torch.optim.Adam(d_fast.parameters(), lr=3e-4, betas=(0.5, 0.9)),
                                 loss_feat=A.FeatureMatchingLoss())
    return [_Step("fastcodec", fast, d_fast, adv_fast, L.MultiScaleMelSpectrogramLoss(24000), Balancer(WEIGHTS), True),
            _Step("audiocraft", ac, d_ac, adv_ac, ac_spec.MultiScaleMelSpectrogramLoss(24000),
                  ac_bal.Balancer(WEIGHTS), False)]


def _table(title, times, unit_note=""):
    print(f"\n{title}")
    print(f"{'provider':<11} {'median ms':>10} {'min-max ms':>19} {'fastcodec x':>12}")
    res = {}
    base = statistics.median(times["fastcodec"])
    for name, ts in times.items():
        med = statistics.median(ts)
        res[name] = {"median_ms": med * 1e3, "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3,
                     "speedup_vs_this": med / base}
        print(f"{name:<11} {med * 1e3:>10.1f} {min(ts) * 1e3:>9.1f}-{max(ts) * 1e3:<9.1f} {med / base:>11.2f}x")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastcodec.bench.train_step", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    providers = _providers(args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    x = 0.1 * torch.randn(args.batch, 1, int(args.seconds * 24_000), generator=g)

    # check before any optimizer step (same weights, same batch): every term of the step
    first = {p.name: p.terms(x) for p in providers}
    worst = max(abs(first["fastcodec"][k] - first["audiocraft"][k]) / max(abs(first["audiocraft"][k]), 1e-12)
                for k in first["audiocraft"])
    ok = worst < 1e-4
    print(f"24 kHz EnCodec train step, B={args.batch}, {args.seconds:g} s, {torch.get_num_threads()} threads; "
          f"first-step terms agree to {worst:.1e} relative ({'ok' if ok else 'MISMATCH'})", flush=True)
    print("  " + ", ".join(f"{k}={v:.4g}" for k, v in first["fastcodec"].items()))
    out = {"machine": machine_info(), "batch": args.batch, "seconds": args.seconds, "first_step": first,
           "max_rel_diff": worst, "check_ok": ok, "results": {}}

    times = {p.name: [] for p in providers}
    for rep in range(args.repeats + 1):  # round 0 warms up
        order = providers if rep % 2 == 0 else providers[::-1]
        for p in order:
            t0 = time.perf_counter()
            p.step(x)
            dt = time.perf_counter() - t0
            print(f"  round {rep} {p.name}: {dt * 1e3:.0f} ms{' (warm-up)' if not rep else ''}", file=sys.stderr,
                  flush=True)
            if rep:
                times[p.name].append(dt)
    out["results"]["step"] = _table("full G+D step (codec forward/backward, losses, discriminator, optimizers)", times)

    with torch.no_grad():
        y0 = providers[0].codec(x)[0]
    times = {p.name: [] for p in providers}
    for rep in range(args.repeats + 1):
        order = providers if rep % 2 == 0 else providers[::-1]
        for p in order:
            y = y0.clone().requires_grad_(True)
            t0 = time.perf_counter()
            p.losses_only(y, x)
            if rep:
                times[p.name].append(time.perf_counter() - t0)
    out["results"]["losses_only"] = _table("losses + discriminator update + balancer only (fixed reconstruction)",
                                           times)
    if not ok:
        print("MISMATCH: no speed-up is claimed", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
