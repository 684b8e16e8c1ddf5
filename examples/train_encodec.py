"""Train a small EnCodec on a folder of audio with the paper's five loss terms.

    python examples/train_encodec.py DATA_DIR --out runs/tiny [--steps 2000] [--batch-size 8] ...
    torchrun --nproc_per_node 2 examples/train_encodec.py DATA_DIR --out runs/tiny ...

DATA_DIR holds audio files soundfile reads (.wav, .flac, .ogg), any sample rate (resampled with soxr)
and channel count (averaged to mono, or the first channels kept). Each step draws random segments and
trains, as EnCodec (Defossez et al. 2022) and audiocraft's compression solver do:

- the discriminator (``fastcodec.adversarial.MultiScaleSTFTDiscriminator``) on the hinge loss, fake
  and real in one batch;
- the codec on the time-domain L1, the multi-scale mel loss, the adversarial (hinge) loss and feature
  matching, their gradients combined by ``fastcodec.balancer.Balancer`` (weights ``--weights``, the
  paper's 0.1 / 1 / 3 / 3 by default), plus the quantizer's commitment loss outside the balance;
- the residual vector quantizer with k-means initialisation, dead-code expiry and quantizer dropout.

Every ``--log-every`` steps rank 0 prints one JSON line (and appends it to OUT/log.jsonl) with each term.
Every ``--ckpt-every`` steps and at the end it writes the checkpoint: ``OUT/checkpoint.th``, the
model's state_dict with encodec's keys (``encoder.*``, ``quantizer.vq.layers.*``, ``decoder.*``;
``torch.load(weights_only=True)`` reads it), and ``OUT/config.json``, the architecture in the fields of
transformers' ``EncodecConfig``. ``load_trained(OUT)`` (below) rebuilds the model; where fastcodec has
``EncodecModel.from_pretrained``, that is ``EncodecModel.from_pretrained(OUT/"checkpoint.th",
config=OUT/"config.json")``.

Under torchrun the process group is set up from torchrun's environment (gloo on CPU, nccl on CUDA), the
codec is wrapped in DistributedDataParallel, discriminator gradients and the balancer's gradient norms
are averaged over workers, each worker draws its own segments, and the quantizer is built with
``sync_ema=True`` when its constructor has that keyword (its codebook statistics then agree across
workers; without it, rank 0's codebooks are broadcast at every step).
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
import typing as tp

import numpy as np
import torch
from torch import nn

import fastcodec
from fastcodec import adversarial, losses as L
from fastcodec.balancer import Balancer
from fastcodec.reference import model as ref_model
from fastcodec.reference import quantization as ref_quantization
from fastcodec.reference import seanet as ref_seanet

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
LOSS_NAMES = ("l1", "msspec", "adv", "feat")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="folder of audio files (searched recursively)")
    p.add_argument("--out", required=True, help="folder for checkpoint.th, config.json and log.jsonl")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=8, help="per worker")
    p.add_argument("--segment", type=float, default=1.0, help="segment length in seconds")
    p.add_argument("--sample-rate", type=int, default=24000)
    p.add_argument("--channels", type=int, default=1)
    # codec (SEANet + RVQ)
    p.add_argument("--n-filters", type=int, default=32)
    p.add_argument("--ratios", default="8,5,4,2", help="SEANet ratios (decoder order), comma separated")
    p.add_argument("--dimension", type=int, default=128)
    p.add_argument("--lstm", type=int, default=2)
    p.add_argument("--n-q", type=int, default=8, help="codebooks")
    p.add_argument("--bins", type=int, default=1024, help="codes per codebook (a power of 2)")
    p.add_argument("--kmeans-iters", type=int, default=50)
    p.add_argument("--dead-code-threshold", type=float, default=2.0, help="threshold_ema_dead_code")
    p.add_argument("--no-q-dropout", action="store_true", help="train with all codebooks at every step")
    p.add_argument("--reference-modules", action="store_true",
                   help="train fastcodec.reference's modules instead of the fast ones")
    # discriminator and losses
    p.add_argument("--disc-filters", type=int, default=32)
    p.add_argument("--disc-n-ffts", default="1024,2048,512", help="STFT sizes; hops n_fft/4, windows n_fft")
    p.add_argument("--mel-range", default="6,11", help="multi-scale mel: scales 2**a .. 2**(b-1)")
    p.add_argument("--n-mels", type=int, default=64)
    p.add_argument("--weights", default="l1=0.1,msspec=1,adv=3,feat=3",
                   help="balancer weights; a weight of 0 drops the term (adv=0,feat=0: no discriminator)")
    p.add_argument("--no-balance", action="store_true", help="plain weighted sum of gradients")
    # optimisation
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--disc-lr", type=float, default=3e-4)
    p.add_argument("--max-norm", type=float, default=0.0, help="gradient clipping (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no log lines on stdout (log.jsonl is still written)")
    args = p.parse_args(argv)
    args.ratios = [int(r) for r in args.ratios.split(",")]
    args.disc_n_ffts = [int(n) for n in args.disc_n_ffts.split(",")]
    args.mel_range = [int(n) for n in args.mel_range.split(",")]
    args.weights = {k: float(v) for k, v in (kv.split("=") for kv in args.weights.split(","))}
    unknown = set(args.weights) - set(LOSS_NAMES)
    if unknown:
        p.error(f"--weights: unknown terms {sorted(unknown)}; known: {', '.join(LOSS_NAMES)}")
    if args.bins < 2 or args.bins & (args.bins - 1):
        p.error(f"--bins must be a power of 2 >= 2, got {args.bins}")
    if len(args.mel_range) != 2 or args.mel_range[1] <= args.mel_range[0]:
        p.error(f"--mel-range must be a,b with a < b, got {args.mel_range}")
    for name in ("steps", "batch_size", "log_every", "ckpt_every", "n_q", "n_filters", "dimension"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# -- data -------------------------------------------------------------------------------------------------

def load_folder(folder: str, sample_rate: int, channels: int) -> tp.List[np.ndarray]:
    """Every audio file under ``folder`` as float32 (channels, samples) at ``sample_rate``."""
    import soundfile as sf
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"data folder not found: {folder}")
    paths = sorted(os.path.join(root, f) for root, _, files in os.walk(folder) for f in files
                   if f.lower().endswith(AUDIO_EXTENSIONS))
    if not paths:
        raise ValueError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) under {folder}")
    clips = []
    for path in paths:
        wav, sr = sf.read(path, dtype="float32", always_2d=True)  # (samples, file channels)
        if sr != sample_rate:
            import soxr
            wav = soxr.resample(wav, sr, sample_rate).astype(np.float32)
        wav = wav.T
        if wav.shape[0] != channels:
            if channels == 1:
                wav = wav.mean(0, keepdims=True)
            elif wav.shape[0] > channels:
                wav = wav[:channels]
            else:
                wav = np.repeat(wav[:1], channels, axis=0)
        clips.append(np.ascontiguousarray(wav))
    return clips


class SegmentSampler:
    """Random fixed-length segments of the clips (clips shorter than a segment are zero-padded),
    drawn with a generator of its own."""

    def __init__(self, clips: tp.List[np.ndarray], length: int, seed: int):
        self.clips, self.length = clips, length
        self.rng = np.random.default_rng(seed)
        weights = np.array([max(c.shape[1], 1) for c in clips], dtype=np.float64)
        self.p = weights / weights.sum()

    def batch(self, batch_size: int) -> torch.Tensor:
        out = np.zeros((batch_size, self.clips[0].shape[0], self.length), dtype=np.float32)
        for b in range(batch_size):
            clip = self.clips[self.rng.choice(len(self.clips), p=self.p)]
            start = self.rng.integers(0, max(clip.shape[1] - self.length, 0) + 1)
            seg = clip[:, start:start + self.length]
            out[b, :, :seg.shape[1]] = seg
        return torch.from_numpy(out)


# -- model ------------------------------------------------------------------------------------------------

def model_config(args: argparse.Namespace) -> dict:
    """The architecture as transformers' ``EncodecConfig`` fields (what config.json holds)."""
    hop = math.prod(args.ratios)
    frame_rate = math.ceil(args.sample_rate / hop)
    nbits = int(math.log2(args.bins))
    counts = sorted({max(1, args.n_q // 4), max(1, args.n_q // 2), args.n_q})
    bandwidths = [k * frame_rate * nbits / 1000 for k in counts]
    # transformers' num_quantizers = int(1000 * bw[-1] // (frame_rate * nbits)) must give back n_q
    assert int(1000 * bandwidths[-1] // (frame_rate * nbits)) == args.n_q, (bandwidths, frame_rate, nbits)
    return dict(model_type="encodec", target_bandwidths=bandwidths, sampling_rate=args.sample_rate,
                audio_channels=args.channels, normalize=False, chunk_length_s=None, overlap=None,
                hidden_size=args.dimension, num_filters=args.n_filters, num_residual_layers=1,
                upsampling_ratios=list(args.ratios), norm_type="weight_norm", kernel_size=7, last_kernel_size=7,
                residual_kernel_size=3, dilation_growth_rate=2, use_causal_conv=True, pad_mode="reflect",
                compress=2, num_lstm_layers=args.lstm, trim_right_ratio=1.0, codebook_size=args.bins,
                codebook_dim=args.dimension, use_conv_shortcut=True)


def _accepts(cls, name: str) -> bool:
    """Whether ``cls(...)`` takes the keyword ``name`` (looks through ``*args, **kwargs`` wrappers)."""
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            params = inspect.signature(klass.__init__).parameters
            if name in params:
                return True
            if not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params.values()):
                return False
    return False


def build_model(config: dict, reference: bool = False, quantizer_kwargs: tp.Optional[dict] = None) -> nn.Module:
    """An EnCodec model of ``config``'s architecture: ``fastcodec.EncodecModel`` (fast modules) or the reference."""
    seanet = dict(channels=config["audio_channels"], dimension=config["hidden_size"], n_filters=config["num_filters"],
                  n_residual_layers=config["num_residual_layers"], ratios=list(config["upsampling_ratios"]),
                  norm=config["norm_type"], kernel_size=config["kernel_size"],
                  last_kernel_size=config["last_kernel_size"], residual_kernel_size=config["residual_kernel_size"],
                  dilation_base=config["dilation_growth_rate"], causal=config["use_causal_conv"],
                  pad_mode=config["pad_mode"], true_skip=not config["use_conv_shortcut"],
                  compress=config["compress"], lstm=config["num_lstm_layers"])
    hop = math.prod(config["upsampling_ratios"])
    frame_rate = math.ceil(config["sampling_rate"] / hop)
    nbits = int(math.log2(config["codebook_size"]))
    n_q = int(1000 * config["target_bandwidths"][-1] // (frame_rate * nbits))
    if reference:
        model_cls, enc, dec, rvq = (ref_model.EncodecModel, ref_seanet.SEANetEncoder, ref_seanet.SEANetDecoder,
                                    ref_quantization.ResidualVectorQuantizer)
    else:
        model_cls, enc, dec, rvq = (fastcodec.EncodecModel, fastcodec.SEANetEncoder, fastcodec.SEANetDecoder,
                                    fastcodec.ResidualVectorQuantizer)
    qkw = dict(dimension=config["hidden_size"], n_q=n_q, bins=config["codebook_size"], decay=0.99,
               kmeans_init=True, kmeans_iters=50, threshold_ema_dead_code=2)
    qkw.update(quantizer_kwargs or {})
    if "sync_ema" in qkw and not _accepts(rvq, "sync_ema"):
        qkw.pop("sync_ema")
    return model_cls(enc(**seanet), dec(**seanet, trim_right_ratio=config["trim_right_ratio"]), rvq(**qkw),
                     config["target_bandwidths"], config["sampling_rate"], config["audio_channels"],
                     normalize=config["normalize"], segment=config["chunk_length_s"], name="train_encodec")


def save_checkpoint(model: nn.Module, config: dict, out: str) -> None:
    """OUT/checkpoint.th (encodec-style state_dict) and OUT/config.json, each written atomically."""
    os.makedirs(out, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(out, "checkpoint.th.tmp"))
    os.replace(os.path.join(out, "checkpoint.th.tmp"), os.path.join(out, "checkpoint.th"))
    with open(os.path.join(out, "config.json.tmp"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(os.path.join(out, "config.json.tmp"), os.path.join(out, "config.json"))


def load_trained(out: str, reference: bool = False) -> nn.Module:
    """The trained model from OUT (``EncodecModel.from_pretrained`` where fastcodec has it), in eval mode."""
    th, cfg = os.path.join(out, "checkpoint.th"), os.path.join(out, "config.json")
    if not reference and hasattr(fastcodec.EncodecModel, "from_pretrained"):
        return fastcodec.EncodecModel.from_pretrained(th, config=cfg).eval()
    with open(cfg) as f:
        config = json.load(f)
    model = build_model(config, reference=reference)
    model.load_state_dict(torch.load(th, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


class Codec(nn.Module):
    """encoder -> quantizer (training: k-means init, EMA, expiry, dropout) -> decoder, for DDP."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        m = self.model
        z = m.encoder(x)
        q = m.quantizer(z, m.frame_rate)
        y = m.decoder(q.x)[..., :x.shape[-1]]
        return y, q.penalty, q.codes


# -- training ---------------------------------------------------------------------------------------------

def _dist_setup() -> tp.Tuple[int, int, torch.device]:
    import torch.distributed as dist
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)  # MASTER_ADDR/PORT, RANK, WORLD_SIZE from torchrun
    return dist.get_rank(), dist.get_world_size(), device


def train(args: argparse.Namespace) -> tp.List[dict]:
    """Run the training; returns the logged records (rank 0; other ranks: [])."""
    import torch.distributed as dist
    rank, world, device = _dist_setup()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # same initial weights (and quantizer-dropout draws) on every worker
    clips = load_folder(args.data, args.sample_rate, args.channels)
    length = int(round(args.segment * args.sample_rate))
    sampler = SegmentSampler(clips, length, seed=args.seed * 1000 + rank)  # each worker its own segments

    config = model_config(args)
    qkw = dict(q_dropout=not args.no_q_dropout, kmeans_iters=args.kmeans_iters,
               threshold_ema_dead_code=args.dead_code_threshold)
    if world > 1:
        qkw["sync_ema"] = True  # dropped by build_model when the quantizer does not take it
    model = build_model(config, reference=args.reference_modules, quantizer_kwargs=qkw).to(device).train()
    synced_ema = world > 1 and _accepts(type(model.quantizer), "sync_ema")
    codec: nn.Module = Codec(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        # rank 0's buffers (codebooks) are broadcast at every forward unless the quantizer syncs its EMA
        ddp_params = inspect.signature(DistributedDataParallel).parameters
        sync_kw = "forward_sync_buffers" if "forward_sync_buffers" in ddp_params else "broadcast_buffers"
        codec = DistributedDataParallel(codec, device_ids=[device.index] if device.type == "cuda" else None,
                                        **{sync_kw: not synced_ema})
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.5, 0.9))

    weights = {k: v for k, v in args.weights.items() if v > 0}
    use_adv = "adv" in weights or "feat" in weights
    adv_loss = None
    if use_adv:
        disc = adversarial.MultiScaleSTFTDiscriminator(
            filters=args.disc_filters, in_channels=args.channels, n_ffts=args.disc_n_ffts,
            hop_lengths=[n // 4 for n in args.disc_n_ffts], win_lengths=args.disc_n_ffts).to(device)
        if world > 1:
            for p in disc.parameters():
                dist.broadcast(p.data, 0)
        disc_opt = torch.optim.Adam(disc.parameters(), lr=args.disc_lr, betas=(0.5, 0.9))
        adv_loss = adversarial.AdversarialLoss(disc, disc_opt, loss_feat=adversarial.FeatureMatchingLoss())
    msspec = L.MultiScaleMelSpectrogramLoss(args.sample_rate, range_start=args.mel_range[0],
                                            range_end=args.mel_range[1], n_mels=args.n_mels)
    balancer = Balancer(weights, balance_grads=not args.no_balance, monitor=True)

    records: tp.List[dict] = []
    log_path = os.path.join(args.out, "log.jsonl")
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        open(log_path, "w").close()
    t0 = time.time()
    for step in range(1, args.steps + 1):
        x = sampler.batch(args.batch_size).to(device)
        y, penalty, codes = codec(x)
        metrics = {}
        if adv_loss is not None:
            metrics["d_loss"] = adv_loss.train_adv(y, x).item()
        terms: tp.Dict[str, torch.Tensor] = {}
        if "l1" in weights:
            terms["l1"] = L.time_l1_loss(y, x)
        if "msspec" in weights:
            terms["msspec"] = msspec(y, x)
        if adv_loss is not None:
            adv, feat = adv_loss(y, x)
            if "adv" in weights:
                terms["adv"] = adv
            if "feat" in weights:
                terms["feat"] = feat
        opt.zero_grad(set_to_none=True)
        g_loss = balancer.backward(terms, y, other=penalty)
        if args.max_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_norm)
        opt.step()
        if rank == 0 and (step % args.log_every == 0 or step == 1 or step == args.steps):
            with torch.no_grad():
                metrics.update({k: v.item() for k, v in terms.items()})
                if "l1" not in terms:
                    metrics["l1"] = L.time_l1_loss(y, x).item()
                metrics["penalty"] = float(penalty)
                metrics["g_loss"] = float(g_loss)
                metrics["si_snr_db"] = -L.si_snr(y.detach(), x, args.sample_rate, segment=None).item()
                metrics["n_q"] = int(codes.shape[1])
                metrics.update({k: float(v) for k, v in balancer.metrics.items()})
            rec = {"step": step, "time": round(time.time() - t0, 3), **{k: round(v, 6) if isinstance(v, float) else v
                                                                      for k, v in metrics.items()}}
            records.append(rec)
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if not args.quiet:
                print(json.dumps(rec), flush=True)
        if rank == 0 and (step % args.ckpt_every == 0 or step == args.steps):
            save_checkpoint(model, config, args.out)
    if world > 1:
        # every worker must hold the same weights (DDP) and codebooks (sync_ema or rank 0's broadcast)
        sums = torch.stack([torch.stack([t.detach().double().sum() for t in model.parameters()]).sum(),
                            torch.stack([t.detach().double().sum() for t in model.buffers()]).sum()]).to(device)
        gathered = [torch.zeros_like(sums) for _ in range(world)]
        dist.all_gather(gathered, sums)
        if rank == 0:
            rec = {"step": args.steps, "params_in_sync": all(bool(torch.equal(g[0], sums[0])) for g in gathered),
                   "buffers_in_sync": all(bool(torch.equal(g[1], sums[1])) for g in gathered), "sync_ema": synced_ema}
            records.append(rec)
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if not args.quiet:
                print(json.dumps(rec), flush=True)
        dist.barrier()
    return records


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
