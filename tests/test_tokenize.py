"""``fastcodec tokenize``: codes equal to one clip at a time, resumable after a crash, corrupt files reported,
long files streamed with the same codes, and 2 ranks under torchrun equal to 1 process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastcodec.audio import load_for_model
from fastcodec.tokenize import FAIL_AFTER_ENV, Tokenizer, list_sources, load_codes
from tests.codec_fixtures import one_thread, tiny_model, write_wav  # noqa: F401  (autouse)
from tests.utils import check_codes_equivalent

BW = 24.0  # the tiny model's 4 codebooks
SR = 8_000


@pytest.fixture(scope="module")
def model():
    m = tiny_model()
    m.set_target_bandwidth(BW)
    return m


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    (d / "sub").mkdir()
    # distinct lengths (each batch mixes lengths), one stereo 16 kHz file (converted), one corrupt file
    write_wav(d / "a.wav", 0.05, sr=SR, seed=1)
    write_wav(d / "b.flac", 0.11, sr=SR, seed=2, subtype="PCM_16")
    write_wav(d / "sub" / "c.wav", 0.08, sr=SR, seed=3)
    write_wav(d / "sub" / "d.wav", 0.07, sr=16_000, channels=2, seed=4)
    (d / "sub" / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio at all")
    (d / "notes.txt").write_text("not audio: ignored")
    return d


def _outputs(out) -> dict:
    errors = (out / "errors.jsonl").read_text().splitlines()
    res = {"manifest": (out / "manifest.jsonl").read_text(), "errors": [json.loads(x)["key"] for x in errors]}
    for line in res["manifest"].splitlines():
        e = json.loads(line)
        res[e["key"]] = np.load(out / e["codes"])
    return res


def test_codes_equal_one_clip_at_a_time(model, clips, tmp_path, capsys):
    out = tmp_path / "tok"
    sources = list_sources(clips)
    assert [s.key for s in sources] == ["a.wav", "b.flac", "sub/broken.wav", "sub/c.wav", "sub/d.wav"]
    s = Tokenizer(model, out, BW, batch_seconds=0.25, progress=False).run(sources)
    assert (s.done, s.skipped, [e["key"] for e in s.errors]) == (4, 0, ["sub/broken.wav"])
    assert "skipping" in capsys.readouterr().err and "broken.wav" in (out / "errors.jsonl").read_text()
    entries = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [e["key"] for e in entries] == ["a.wav", "b.flac", "sub/c.wav", "sub/d.wav"]
    info = json.loads((out / "info.json").read_text())
    assert (info["sample_rate"], info["frame_rate"], info["n_q"]) == (SR, 1000, 4)
    for e in entries:
        wav = load_for_model(e["path"], SR, 1)
        with torch.no_grad():
            ref = model.encode(wav[None])[0][0][0]
        codes = np.load(out / e["codes"])
        assert codes.dtype == np.int16 and e["frames"] == codes.shape[1] == ref.shape[1]
        assert e["num_samples"] == wav.shape[-1]
        # the simple encode_batch runs each length alone: the very same computation, the same codes
        assert torch.equal(torch.from_numpy(codes.astype(np.int64)), ref)
        assert torch.equal(load_codes(out / e["codes"])[0], ref)


def test_crash_then_resume_gives_the_same_outputs(model, clips, tmp_path, monkeypatch):
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    Tokenizer(model, clean, BW, batch_seconds=0.01, progress=False).run(list_sources(clips))
    monkeypatch.setenv(FAIL_AFTER_ENV, "2")  # batches of one clip: dies after the second
    with pytest.raises(RuntimeError, match="test hook"):
        Tokenizer(model, crashed, BW, batch_seconds=0.01, progress=False).run(list_sources(clips))
    done = sorted(p.name for p in (crashed / "codes").rglob("*.json"))
    assert len(done) == 2 and not list(crashed.rglob(".tmp-*")) and not (crashed / "manifest.jsonl").exists()
    monkeypatch.delenv(FAIL_AFTER_ENV)
    s = Tokenizer(model, crashed, BW, batch_seconds=0.01, progress=False).run(list_sources(clips))
    assert (s.done, s.skipped, len(s.errors)) == (2, 2, 1)  # the corrupt file is retried and reported again
    a, b = _outputs(clean), _outputs(crashed)
    assert a.keys() == b.keys() and a["manifest"] == b["manifest"] and a["errors"] == b["errors"]
    for k in a:
        if k not in ("manifest", "errors"):
            assert np.array_equal(a[k], b[k]), k
    with pytest.raises(ValueError, match="other settings"):
        Tokenizer(model, crashed, 12.0, progress=False).run(list_sources(clips))


def test_long_file_streams_with_one_pass_codes(model, tmp_path, capsys):
    write_wav(tmp_path / "long.wav", 0.6, sr=SR, seed=7)
    tok = Tokenizer(model, tmp_path / "out", BW, long_seconds=0.2, chunk_seconds=0.13, progress=True)
    assert tok.streamable
    tok.run(list_sources(tmp_path))
    err = capsys.readouterr().err  # the progress bar: hours of audio and the real-time factor
    assert "0.000/0.000 h of audio" in err and "x real time" in err
    codes = torch.from_numpy(np.load(tmp_path / "out" / "codes" / "long.wav.npy").astype(np.int64))[None]
    wav = load_for_model(tmp_path / "long.wav", SR, 1)[None]
    with torch.no_grad():
        expected = model.encode(wav)[0][0]
        emb = model.encoder(wav)
    books = torch.stack([layer._codebook.embed for layer in model.quantizer.vq.layers])
    # streaming rounds the LSTM's float32 steps differently (~1e-7): codes equal up to certified near-ties
    ok, flips, detail = check_codes_equivalent(codes, expected, emb, books)
    assert ok, detail


def _rank(rank: int, port: int, argv: list, backend: str) -> None:
    # what torchrun gives each process: its rank, the world size and the rendezvous address
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), FASTCODEC_BACKEND=backend)
    torch.set_num_threads(1)
    from fastcodec import cli, codec_cli
    args = cli._parser().parse_args(argv)
    rc = codec_cli.tokenize(args, model=tiny_model())
    if rc != 1:  # 1: the corrupt file failed and was reported
        raise SystemExit(f"rank {rank}: exit status {rc}")


def _two_ranks_equal_one(model, clips, tmp_path, launch) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    Tokenizer(model, one, BW, progress=False).run(list_sources(clips))
    launch([str(clips), str(two), "--bandwidth", str(BW)])
    a, b = _outputs(one), _outputs(two)
    assert a.keys() == b.keys() and a["manifest"] == b["manifest"]
    assert a["errors"] == b["errors"] == ["sub/broken.wav"]
    for k in a:
        if k not in ("manifest", "errors"):
            assert np.array_equal(a[k], b[k]), k


def test_two_ranks_equal_one_process(model, clips, tmp_path, monkeypatch, capfd):
    """2 processes, as torchrun starts them (env rendezvous, gloo), forked from this one: no second torch import.
    The reference backend everywhere: the forked ranks then run no OpenMP region and load no extension."""
    import socket

    import torch.multiprocessing as mp
    monkeypatch.setenv("FASTCODEC_BACKEND", "reference")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    def launch(argv):
        mp.start_processes(_rank, args=(port, ["tokenize", *argv, "--model", "tiny", "--quiet"], "reference"),
                           nprocs=2, start_method="fork")

    _two_ranks_equal_one(model, clips, tmp_path, launch)
    err = capfd.readouterr().err
    assert "rank 0/2" in err and "rank 1/2" in err and "broken.wav" in err


@pytest.mark.skipif(os.environ.get("FASTCODEC_TEST_TORCHRUN") == "0",
                    reason="FASTCODEC_TEST_TORCHRUN=0: three fresh interpreters, ~10 s on 2 cores")
def test_torchrun_two_ranks_equal_one_process(model, clips, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTCODEC_BACKEND", "reference")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    worker = os.path.join(os.path.dirname(__file__), "tokenize_worker.py")

    def launch(argv):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            worker, *argv], capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 1, r.stderr[-3000:]  # 1: a file failed (the corrupt one), reported
        assert "rank 0/2" in r.stderr and "rank 1/2" in r.stderr and "broken.wav" in r.stderr

    _two_ranks_equal_one(model, clips, tmp_path, launch)


@pytest.mark.parametrize("segmented", [False, True])
def test_decode_reads_tokenized_files(tmp_path, monkeypatch, segmented):
    from fastcodec import cli, codec_cli
    from fastcodec.audio import read_audio
    m = tiny_model()
    if segmented:  # the 48 kHz model's scheme: volume-normalised 20 ms segments with overlap -> .npz
        m.segment, m.normalize = 0.02, True
    write_wav(tmp_path / "x.wav", 0.05, sr=SR, seed=9)
    Tokenizer(m, tmp_path / "tok", 12.0, progress=False).run(list_sources(tmp_path))
    name = tmp_path / "tok" / "codes" / ("x.wav.npz" if segmented else "x.wav.npy")
    codes, frames = load_codes(name)
    with torch.no_grad():
        encoded = m.encode(load_for_model(tmp_path / "x.wav", SR, 1)[None])
        expected = m.decode(frames if segmented else [(codes[None], None)])[0, :, :400]
    assert torch.equal(torch.cat([c for c, _ in encoded], -1)[0], codes)
    if segmented:
        assert len(frames) == 3 and all(torch.equal(f[1], e[1]) for f, e in zip(frames, encoded))
    monkeypatch.setattr(codec_cli, "resolve_model", lambda spec, rw=False: m)
    assert cli.main(["decode", str(name), str(tmp_path / "out.wav"), "--model", "tiny"]) == 0
    out, sr = read_audio(tmp_path / "out.wav")
    assert sr == SR and out.shape == (1, 400)  # trimmed to the source's length by the entry next to the codes
    assert (out - expected.clamp(-0.99, 0.99)).abs().max() <= 1 / 32768
