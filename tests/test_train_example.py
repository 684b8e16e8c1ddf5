"""examples/train_encodec.py: a few dozen steps on synthetic audio with all five terms, k-means init,
dead-code expiry and quantizer dropout; the reconstruction loss falls and the checkpoint loads back.

CI-sized: 8 kHz, 512-sample segments, a 4-filter SEANet with ratios 4,4, 4 codebooks of 32 codes,
discriminator scales 32-128, mel scales 32-128, one thread (tiny shapes: threads cost more than they give).
"""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from .utils import assert_codes_equivalent

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "train_encodec.py")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_encodec_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_clips(folder, sr=8000, n=3, seconds=0.5):
    import soundfile as sf
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        t = np.arange(int(sr * seconds)) / sr
        x = sum(0.2 * np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in rng.uniform(100, 1500, size=3))
        sf.write(os.path.join(folder, f"clip{i}.wav"), (x + 0.01 * rng.standard_normal(t.size)).astype(np.float32), sr)
    # a stereo file at another rate: resampled and averaged to mono
    sf.write(os.path.join(folder, "stereo.flac"), rng.uniform(-0.3, 0.3, size=(6000, 2)).astype(np.float32), 12000)


TINY = ["--steps", "20", "--batch-size", "2", "--segment", "0.064", "--sample-rate", "8000", "--n-filters", "4",
        "--ratios", "4,4", "--dimension", "16", "--lstm", "0", "--n-q", "4", "--bins", "32", "--kmeans-iters", "3",
        "--disc-filters", "4", "--disc-n-ffts", "64,128,32", "--mel-range", "5,8", "--n-mels", "16", "--lr", "3e-3",
        "--disc-lr", "1e-3", "--log-every", "1", "--ckpt-every", "10", "--threads", "1", "--quiet"]


def test_training_reduces_reconstruction_loss_and_checkpoint_loads(example, tmp_path):
    data, out = str(tmp_path / "data"), str(tmp_path / "run")
    _write_clips(data)
    n_threads = torch.get_num_threads()
    try:
        records = example.train(example.parse_args([data, "--out", out] + TINY))
    finally:
        torch.set_num_threads(n_threads)
    assert [r["step"] for r in records] == list(range(1, 21))
    for key in ("l1", "msspec", "adv", "feat", "penalty", "d_loss", "g_loss", "si_snr_db", "ratio_msspec"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert {r["n_q"] for r in records} - {4}, "quantizer dropout never dropped a codebook"
    first = np.mean([r["msspec"] + r["l1"] for r in records[:4]])
    last = np.mean([r["msspec"] + r["l1"] for r in records[-4:]])
    assert last < 0.8 * first, (first, last)
    with open(os.path.join(out, "log.jsonl")) as f:
        assert len(f.read().splitlines()) == 20
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["upsampling_ratios"] == [4, 4] and config["codebook_size"] == 32
    state = torch.load(os.path.join(out, "checkpoint.th"), weights_only=True)
    assert "quantizer.vq.layers.3._codebook.embed" in state and "encoder.model.0.conv.conv.weight_v" in state
    assert all(bool(state[f"quantizer.vq.layers.{i}._codebook.inited"]) for i in range(4))  # k-means ran
    model = example.load_trained(out)
    ref = example.load_trained(out, reference=True)
    for m in (model, ref):
        loaded = m.state_dict()
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    x = torch.from_numpy(example.load_folder(data, 8000, 1)[0][None, :, :1024])
    with torch.no_grad():
        z = ref.encoder(x)
        assert_codes_equivalent(model.quantizer.encode(z), ref.quantizer.encode(z), z, ref.quantizer.codebooks())
        y = model(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_bad_arguments(example, tmp_path):
    with pytest.raises(SystemExit):
        example.parse_args([str(tmp_path), "--out", str(tmp_path), "--weights", "l1=1,mel=2"])
    with pytest.raises(SystemExit):
        example.parse_args([str(tmp_path), "--out", str(tmp_path), "--bins", "100"])
    with pytest.raises(ValueError, match="no audio files"):
        example.load_folder(str(tmp_path), 8000, 1)


@pytest.mark.skipif(os.environ.get("FASTCODEC_TEST_TORCHRUN") == "0",
                    reason="FASTCODEC_TEST_TORCHRUN=0: three fresh interpreters, ~15 s on 2 cores")
def test_trains_under_torchrun_two_ranks(tmp_path):
    """The example under ``torchrun --nproc_per_node 2`` (gloo): DDP weights and the sync_ema codebooks end the
    same on both ranks, and the checkpoint loads back."""
    import subprocess
    import sys

    data, out = str(tmp_path / "data"), str(tmp_path / "run")
    _write_clips(data)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    steps = ["--steps", "6", "--ckpt-every", "6"]
    args = [a for i, a in enumerate(TINY) if a not in ("--steps", "--ckpt-every")
            and TINY[i - 1] not in ("--steps", "--ckpt-every")]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        EXAMPLE, data, "--out", out, *args, *steps], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(out, "log.jsonl")) as f:
        records = [json.loads(line) for line in f.read().splitlines()]
    assert [r["step"] for r in records[:-1]] == list(range(1, 7))
    assert records[-1] == {"step": 6, "params_in_sync": True, "buffers_in_sync": True, "sync_ema": True}
    assert all(np.isfinite(r["msspec"]) for r in records[:-1])
    spec = importlib.util.spec_from_file_location("train_encodec_example_ddp", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    state = torch.load(os.path.join(out, "checkpoint.th"), weights_only=True)
    loaded = mod.load_trained(out).state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
