"""Tiny-data helpers shared by the audio/ecdc/tokenize tests: randomized models (no downloads), WAV files."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import soundfile as sf
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread (autouse where imported). The ops on these milliseconds of audio are too small to share:
    with 2 threads every op meets an OpenMP barrier, and on a loaded machine it waits there for a descheduled
    thread (measured: a test_ecdc test 36 s with 2 threads, 5 s with 1, at load average 15 on 2 vCPUs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomize(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Perturb every weight and give the codebooks random entries (a fresh preset's are all zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for layer in model.quantizer.vq.layers:
            cb = layer._codebook
            cb.embed.copy_(torch.randn(cb.embed.shape, generator=g) * 0.5)
            cb.embed_avg.copy_(cb.embed)
            cb.cluster_size.fill_(1.0)
            cb.inited.fill_(1.0)
    return model.eval()


def encodec_model_module(oracle):
    # encodec.utils imports torchaudio (file I/O only, never called here); it does not load next to torch 2.13
    sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
    return oracle("encodec.model")


def write_wav(path, seconds: float, sr: int = 24_000, channels: int = 1, seed: int = 0, subtype="FLOAT"):
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    x = 0.3 * np.sin(2 * np.pi * (110 + 40 * seed) * t)[:, None] + 0.05 * rng.standard_normal((n, channels))
    sf.write(str(path), x.astype(np.float32), sr, subtype=subtype)
    return path


def tiny_model(seed: int = 1, causal: bool = True):
    """A small fastcodec EncodecModel: 8 kHz mono, hop 8 (1000 frames/s), 4 codebooks of 64 entries of
    dimension 16, LSTM 1; 6 kbps per codebook (6/12/24 kbps = 1/2/4 codebooks). Same code paths, milliseconds."""
    import fastcodec
    from fastcodec.quantization import ResidualVectorQuantizer
    from fastcodec.seanet import SEANetDecoder, SEANetEncoder

    torch.manual_seed(seed)
    kw = dict(channels=1, dimension=16, n_filters=4, n_residual_layers=1, ratios=[4, 2], norm="weight_norm",
              causal=causal, pad_mode="reflect", true_skip=False, compress=2, lstm=1)
    model = fastcodec.EncodecModel(SEANetEncoder(**kw), SEANetDecoder(**kw, trim_right_ratio=1.0),
                                   ResidualVectorQuantizer(dimension=16, n_q=4, bins=64), [6.0, 12.0, 24.0],
                                   8_000, 1, name="tiny")
    return randomize(model, seed)
