"""The audio subcommands of ``fastcodec``: encode, decode, tokenize (wired into ``fastcodec.cli``).

    fastcodec encode IN.wav OUT.ecdc [--bandwidth 6] --model PATH|24khz|48khz|32khz [--random-weights] [--lm LM.th]
    fastcodec decode IN OUT.wav --model ...    IN: .ecdc, a tokenized .npy/.npz, a .pt/.npy codes array
                                               (integers, (K, T) or (1, K, T)), or JASCO latents (floats,
                                               .npy/.pt/.safetensors, with --mean/--std or keys mean/std)
    fastcodec tokenize SRC_DIR_OR_MANIFEST OUT_DIR --model ... [--bandwidth 6]   (also under torchrun)
"""
from __future__ import annotations

import os
import sys
import typing as tp

import torch

from .precision import PRECISIONS

PRESETS = ("24khz", "48khz", "32khz")
NO_NETWORK = ("pretrained weights are not downloaded (fastcodec never uses the network): pass --model PATH "
              "(an encodec .th, an audiocraft checkpoint or a Hugging Face folder)")


class ModelError(ValueError):
    """--model cannot be resolved; the message says why and what to pass."""


def resolve_model(spec: str, random_weights: bool = False):
    """``24khz|48khz|32khz`` (presets: random weights, only with ``random_weights``) or a checkpoint PATH.

    A PATH goes through ``EncodecModel.from_pretrained`` where fastcodec has it; otherwise a file is loaded
    into the 24 kHz (mono input) or 48 kHz (stereo input) preset with ``fastcodec.load_checkpoint``.
    """
    from . import EncodecModel, load_checkpoint
    from .checkpoint import CheckpointError, read_state_dict

    if spec in PRESETS:
        if not random_weights:
            raise ModelError(f"--model {spec}: {NO_NETWORK}; or add --random-weights to use the preset's "
                             "architecture with random weights (tests, benchmarks)")
        make = getattr(EncodecModel, f"encodec_model_{spec}", None)
        if make is None:
            raise ModelError(f"--model {spec}: this fastcodec has no {spec} preset")
        return make().eval()
    if random_weights:
        raise ModelError(f"--random-weights goes with a preset name ({', '.join(PRESETS)}), not a path")
    if not os.path.exists(spec):
        raise ModelError(f"--model {spec}: no such file or folder, and not a preset ({', '.join(PRESETS)})")
    if hasattr(EncodecModel, "from_pretrained"):
        try:
            return EncodecModel.from_pretrained(spec).eval()
        except (OSError, ValueError) as e:
            raise ModelError(f"--model {spec}: {e}") from None
    if os.path.isdir(spec):
        raise ModelError(f"--model {spec}: loading a folder needs EncodecModel.from_pretrained, which this "
                         "fastcodec lacks; pass the checkpoint file")
    try:
        state = read_state_dict(spec)
        w = state.get("encoder.model.0.conv.conv.weight_v", state.get("encoder.model.0.conv.conv.weight"))
        if w is None:
            raise ModelError(f"--model {spec}: not an encodec/audiocraft EnCodec state_dict "
                             "(no encoder.model.0.conv.conv.weight[_v])")
        model = {1: EncodecModel.encodec_model_24khz, 2: EncodecModel.encodec_model_48khz}.get(w.shape[1])
        if model is None:
            raise ModelError(f"--model {spec}: a {w.shape[1]}-channel encoder is neither preset's")
        return load_checkpoint(model(), state).eval()
    except CheckpointError as e:
        raise ModelError(f"--model {spec}: {e}") from None


def add_parsers(sub, device_type) -> None:
    def model_args(p, bandwidth: bool):
        p.add_argument("--model", required=True, metavar="PATH|" + "|".join(PRESETS),
                       help="checkpoint file/folder, or a preset name with --random-weights")
        p.add_argument("--random-weights", action="store_true", help="a preset with random weights (tests)")
        if bandwidth:
            p.add_argument("--bandwidth", type=float, default=6.0, help="kbps (default 6)")
        p.add_argument("--device", default="cpu", type=device_type, help="cpu (default) or cuda[:N]")
        p.add_argument("--precision", default="float32", choices=PRECISIONS,
                       help="SEANet compute precision: float32 (default, exact) or bf16 (bf16 operands, float32 "
                            "accumulation; docs/bf16.md)")

    e = sub.add_parser("encode", help="audio file -> .ecdc (encodec 0.1.1's format)")
    e.add_argument("input")
    e.add_argument("output")
    model_args(e, True)
    e.add_argument("--lm", metavar="PATH", help="entropy code with encodec's language model (use_lm), its weights")
    d = sub.add_parser("decode", help=".ecdc, tokenized codes, a codes array or JASCO latents -> WAV")
    d.add_argument("input")
    d.add_argument("output")
    model_args(d, False)
    d.add_argument("--lm", metavar="PATH", help="encodec's language model weights, for entropy-coded .ecdc files")
    d.add_argument("--mean", help="latents: a number or a .npy/.pt file (default: the input's 'mean', else 0)")
    d.add_argument("--std", help="latents: a number or a .npy/.pt file (default: the input's 'std', else 1)")
    t = sub.add_parser("tokenize", help="a folder or manifest of audio -> codes + manifest (resumable; torchrun)")
    t.add_argument("source", help="a folder (recursive) or a manifest (.txt: one path a line; .jsonl: {\"path\"})")
    t.add_argument("output", help="output folder (rerun to resume)")
    model_args(t, True)
    t.add_argument("--batch-seconds", type=float, default=160.0, help="padded audio per batch (default 160)")
    t.add_argument("--long-seconds", type=float, default=600.0,
                   help="longer files are streamed/segmented alone (default 600)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")


def _with_precision(model, args):
    if args.precision != "float32":
        model.precision = args.precision
    return model


def _load_model(args):
    model = resolve_model(args.model, args.random_weights)
    return _with_precision(model, args).to(args.device)


def encode(args) -> int:
    from .audio import atomic_write_bytes, load_for_model
    from .ecdc import compress

    model = _load_model(args)
    model.set_target_bandwidth(args.bandwidth)
    lm = _load_lm(args, model)
    wav = load_for_model(args.input, model.sample_rate, model.channels).to(args.device)
    atomic_write_bytes(args.output, compress(model, wav, use_lm=lm is not None, lm=lm))
    return 0


def _load_lm(args, model):
    if not args.lm:
        return None
    from .ecdc_lm import load_lm
    return load_lm(model, args.lm).to(args.device)


def _tensor_file(path: str) -> dict[str, torch.Tensor]:
    """A .npy/.npz/.pt/.safetensors file -> named tensors (a bare array is named 'x')."""
    import numpy as np
    if path.endswith(".npy"):
        return {"x": torch.from_numpy(np.load(path, allow_pickle=False))}
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            return {k: torch.from_numpy(z[k]) for k in z.files}
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return dict(load_file(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, torch.Tensor):
        return {"x": obj}
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj)
    raise ValueError(f"{path}: expected a tensor or a dict of tensors")


def _stat(v: tp.Optional[str], found: tp.Optional[torch.Tensor]):
    if v is None:
        return found
    try:
        return float(v)
    except ValueError:
        return next(iter(_tensor_file(v).values())).float()


def decode(args) -> int:
    import json

    from .audio import write_audio
    from .ecdc import bytes_to_frames

    inp = args.input
    if not os.path.isfile(inp):
        raise ValueError(f"{inp}: no such file")
    model = _load_model(args)
    length = None
    with torch.no_grad():
        if inp.endswith(".ecdc"):
            with open(inp, "rb") as f:
                meta, frames = bytes_to_frames(model, f.read(), _load_lm(args, model))
            length = meta["al"]
            wav = model.decode([(c.to(args.device), s if s is None else s.to(args.device)) for c, s in frames])
        else:
            if not inp.endswith((".npy", ".npz", ".pt", ".pth", ".th", ".safetensors")):
                raise ValueError(f"{inp}: decode reads .ecdc, .npy, .npz, .pt or .safetensors files")
            named = _tensor_file(inp)
            entry = os.path.splitext(inp)[0] + ".json"  # a tokenized file's manifest entry: the true length
            if os.path.isfile(entry):
                with open(entry, encoding="utf-8") as f:
                    length = json.load(f).get("num_samples")
            x = named.get("codes", named.get("latents", named.get("x", next(iter(named.values())))))
            if "frame_lengths" in named:  # a tokenized .npz (models with segments)
                from .tokenize import load_codes
                _, frames = load_codes(inp)
                wav = model.decode([(c.to(args.device), s.to(args.device)) for c, s in frames])
            elif not x.is_floating_point():
                codes = x.long()
                if codes.dim() == 2:
                    codes = codes[None]
                if codes.dim() != 3 or codes.shape[0] != 1:
                    raise ValueError(f"{inp}: codes must be (K, T) or (1, K, T), got {tuple(x.shape)}")
                if codes.min() < 0 or codes.max() >= model.quantizer.bins:
                    raise ValueError(f"{inp}: codes must lie in [0, {model.quantizer.bins})")
                if codes.shape[1] > model.quantizer.total_codebooks:
                    raise ValueError(f"{inp}: {codes.shape[1]} codebooks, the model has "
                                     f"{model.quantizer.total_codebooks}")
                if model.segment is not None:
                    raise ValueError(f"{inp}: this model decodes segments with scales: pass a tokenized .npz")
                wav = model.decode([(codes.to(args.device), None)])
            else:  # JASCO's continuous latents
                z = x.float()
                if z.dim() == 2:
                    z = z[None]
                mean = _stat(args.mean, named.get("mean"))
                std = _stat(args.std, named.get("std"))
                fn = getattr(model, "decode_continuous", None) or model.decode_latent
                dev = lambda v: v.to(args.device) if isinstance(v, torch.Tensor) else v  # noqa: E731
                wav = fn(z.to(args.device), dev(mean), dev(std))
    wav = wav[0]
    if length is not None:
        wav = wav[:, :length]
    write_audio(args.output, wav, model.sample_rate)
    return 0


def tokenize(args, model=None) -> int:
    """The ``tokenize`` command; ``model`` replaces ``--model`` (tests give a tiny one)."""
    import torch.distributed as dist

    from .tokenize import Tokenizer, list_sources

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, barrier, device = 0, None, args.device
    if world > 1:  # under torchrun: one process per rank
        rank = int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.device(device).type == "cuda":
            device = f"cuda:{local}"
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
        barrier = dist.barrier
    try:
        sources = list_sources(args.source)
        model = (model if model is not None else resolve_model(args.model, args.random_weights))
        model = _with_precision(model, args).to(device)
        tok = Tokenizer(model, args.output, args.bandwidth, model_spec=args.model,
                        batch_seconds=args.batch_seconds, long_seconds=args.long_seconds, device=device,
                        rank=rank, world_size=world, barrier=barrier, progress=not args.quiet)
        s = tok.run(sources)
        where = f"rank {rank}/{world}: " if world > 1 else ""
        print(f"{where}tokenized {s.done} files ({s.audio_seconds / 3600:.3f} h of audio, "
              f"{s.realtime_factor:.1f}x real time), skipped {s.skipped} already done, {len(s.errors)} failed"
              + (f"; {s.failed_total} files failed in all, listed in {os.path.join(args.output, 'errors.jsonl')}"
                 if s.failed_total else ""), file=sys.stderr)
        return 1 if s.failed_total else 0
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
