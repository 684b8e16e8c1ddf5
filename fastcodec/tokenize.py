"""Tokenize an audio collection: every file -> its codes, resumable, crash-safe, shardable under torchrun.

    tokenize(model, "clips/", "tokens/", bandwidth=6.0)

Output (documented in docs/tokenize.md)::

    tokens/info.json              model name, sample rate, frame rate, codebooks, bandwidth, format version
    tokens/codes/<rel>.npy        int16 codes (K, T) of the source file <rel> (its path under the source
                                  folder, extension kept); models with segments (48 kHz) write <rel>.npz
                                  with codes (K, sum of T_i), frame_lengths (T_i) and scales (one per segment)
    tokens/codes/<rel>.json       the file's manifest entry; written last: its presence marks the file done
    tokens/errors/<rel>.json      why a file could not be tokenized (removed when a rerun succeeds)
    tokens/manifest.jsonl         one entry per tokenized file, sorted by path (merged at the end)
    tokens/errors.jsonl           one entry per file that failed (also printed on stderr)

Every file is written to a temporary name and renamed (``os.replace``), the entry after the codes, so a
killed run leaves only complete files; a rerun skips the files whose entry exists and loses at most the
batch in flight. Clips are sorted by length and batched (``fastcodec.ragged.encode_batch``: codes equal to
one clip at a time); files longer than ``long_seconds`` go alone: causal models stream them in chunks
(the same codes as one pass, up to certified near-ties of float32 rounding), models with segments encode
segment by segment, others in one pass. Under ``torchrun`` every rank takes every ``world_size``-th file
of the sorted list; rank 0 merges the manifest after a barrier.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import sys
import time
import typing as tp
from dataclasses import dataclass, field

import numpy as np
import torch

from . import ragged
from .audio import AudioError, atomic_write_bytes, audio_extensions, audio_info, convert_audio, read_audio

FORMAT_VERSION = 1
FAIL_AFTER_ENV = "FASTCODEC_TOKENIZE_FAIL_AFTER"  # tests: raise after N batches, as a crash would


class TokenizeError(ValueError):
    """The sources or the output folder cannot be used; the message says which and why."""


@dataclass
class Source:
    path: str  # as found (absolute for folders, as listed for manifests, resolved against the manifest's folder)
    key: str  # the output name under codes/, unique


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    errors: list = field(default_factory=list)
    audio_seconds: float = 0.0
    wall_seconds: float = 0.0
    failed_total: int = 0  # files of every rank with an error record (read after the barrier)

    @property
    def realtime_factor(self) -> float:
        return self.audio_seconds / self.wall_seconds if self.wall_seconds > 0 else float("nan")


def list_sources(src: tp.Union[str, os.PathLike]) -> list[Source]:
    """A folder (every audio file under it, recursively) or a manifest (.txt/.lst: one path per line;
    .jsonl: objects with "path"; relative paths are relative to the manifest's folder), sorted by key."""
    src = os.fspath(src)
    if os.path.isdir(src):
        exts = audio_extensions()
        found = []
        for root, dirs, files in os.walk(src):
            dirs.sort()
            for f in sorted(files):
                if os.path.splitext(f)[1].lower() in exts and not f.startswith("."):
                    p = os.path.join(root, f)
                    found.append(Source(os.path.abspath(p), os.path.relpath(p, src).replace(os.sep, "/")))
        if not found:
            raise TokenizeError(f"{src}: no audio files found (extensions {', '.join(sorted(exts))})")
        return found
    if not os.path.isfile(src):
        raise TokenizeError(f"{src}: no such folder or manifest file")
    base = os.path.dirname(os.path.abspath(src))
    paths = []
    with open(src, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if src.endswith(".jsonl"):
                try:
                    p = json.loads(line)["path"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise TokenizeError(f"{src}:{n}: expected a JSON object with a \"path\"") from None
            else:
                p = line
            paths.append(p)
    if not paths:
        raise TokenizeError(f"{src}: the manifest lists no files")
    out, seen = [], {}
    for p in paths:
        full = p if os.path.isabs(p) else os.path.join(base, p)
        rel = os.path.relpath(full, base).replace(os.sep, "/")
        key = rel if not rel.startswith("../") else \
            hashlib.sha1(os.path.abspath(full).encode()).hexdigest()[:12] + "_" + os.path.basename(full)
        if key in seen:
            continue  # listed twice
        seen[key] = True
        out.append(Source(full, key))
    return sorted(out, key=lambda s: s.key)


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, sort_keys=True) + "\n").encode("utf-8")


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _npz_bytes(**arrays) -> bytes:
    import io
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


class Tokenizer:
    """Tokenize ``sources`` into ``out_dir`` with ``model`` (see the module docstring)."""

    def __init__(self, model, out_dir, bandwidth: tp.Optional[float] = None, *, model_spec: str = "",
                 batch_seconds: float = 160.0, max_batch: int = 64, long_seconds: float = 600.0,
                 chunk_seconds: float = 10.0, device="cpu", rank: int = 0, world_size: int = 1,
                 barrier: tp.Optional[tp.Callable[[], None]] = None, progress: bool = True, log=None):
        if bandwidth is not None:
            model.set_target_bandwidth(bandwidth)  # ValueError naming the supported ones
        for name, v in (("batch_seconds", batch_seconds), ("long_seconds", long_seconds),
                        ("chunk_seconds", chunk_seconds), ("max_batch", max_batch)):
            if not v > 0:
                raise ValueError(f"{name} must be positive, got {v}")
        if model.quantizer.bins > 32768:
            raise ValueError(f"codes are stored as int16: codebooks of {model.quantizer.bins} entries do not fit")
        if not (0 <= rank < world_size):
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.model, self.out = model.eval(), os.fspath(out_dir)
        self.bandwidth, self.spec = bandwidth, model_spec
        self.batch_seconds, self.max_batch = batch_seconds, max_batch
        self.long_seconds, self.chunk_seconds = long_seconds, chunk_seconds
        self.device, self.rank, self.world = torch.device(device), rank, world_size
        self.barrier, self.progress = barrier, progress
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.segmented = model.segment is not None
        try:
            model.encode_state(1)
            self.streamable = True
        except (AttributeError, ValueError):  # not a fastcodec model, or NotStreamableError: non-causal etc.
            self.streamable = False

    # -- paths ------------------------------------------------------------------------------
    def _codes_path(self, key: str) -> str:
        return os.path.join(self.out, "codes", key + (".npz" if self.segmented else ".npy"))

    def _entry_path(self, key: str) -> str:
        return os.path.join(self.out, "codes", key + ".json")

    def _error_path(self, key: str) -> str:
        return os.path.join(self.out, "errors", key + ".json")

    def info(self) -> dict:
        m = self.model
        return {"format": FORMAT_VERSION, "model": m.name, "model_spec": self.spec, "sample_rate": m.sample_rate,
                "channels": m.channels, "frame_rate": m.frame_rate, "bandwidth": m.bandwidth,
                "n_q": m.quantizer.num_codebooks, "bins": m.quantizer.bins, "codes_dtype": "int16",
                "segment": m.segment, "precision": getattr(m, "precision", "float32"),
                "layout": "npz: codes (K, T), frame_lengths, scales" if self.segmented else "npy: codes (K, T)"}

    def _prepare_out(self) -> None:
        os.makedirs(os.path.join(self.out, "codes"), exist_ok=True)
        info, path = self.info(), os.path.join(self.out, "info.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
            old.setdefault("precision", "float32")  # folders written before the precision option
            diff = {k: (old.get(k), v) for k, v in info.items() if k != "model_spec" and old.get(k) != v}
            if diff:
                raise TokenizeError(f"{self.out} holds codes made with other settings ({diff}): use another "
                                    "output folder, or delete it to start over")
        else:
            atomic_write_bytes(path, _json_bytes(info))

    # -- the run ----------------------------------------------------------------------------
    def run(self, sources: tp.Sequence[Source]) -> Summary:
        t0 = time.perf_counter()
        self._prepare_out()
        summary = Summary()
        mine = [s for i, s in enumerate(sources) if i % self.world == self.rank]
        todo = []
        for s in mine:
            if os.path.exists(self._entry_path(s.key)):
                summary.skipped += 1
                continue
            try:
                todo.append((s, audio_info(s.path)))
            except AudioError as e:
                self._error(s, e, summary)
        todo.sort(key=lambda si: (si[1].duration, si[0].key))
        batches = self._batches(todo)
        total_h = sum(i.duration for _, i in todo) / 3600
        bar = self._bar(total_h)
        fail_after = int(os.environ.get(FAIL_AFTER_ENV, "0") or 0)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # reads the next batch while this one encodes
            nxt = pool.submit(self._load, batches[0]) if batches else None
            for b in range(len(batches)):
                loaded = nxt.result()
                nxt = pool.submit(self._load, batches[b + 1]) if b + 1 < len(batches) else None
                self._encode_and_write(loaded, summary)
                if bar is not None:
                    bar.set_postfix_str(f"{summary.audio_seconds / max(time.perf_counter() - t0, 1e-9):.1f}x "
                                        "real time", refresh=False)
                    bar.update(sum(i.duration for _, i in batches[b]) / 3600)
                if fail_after and b + 1 >= fail_after:
                    raise RuntimeError(f"{FAIL_AFTER_ENV}={fail_after}: stopping after {b + 1} batches (test hook)")
        if bar is not None:
            bar.close()
        summary.wall_seconds = time.perf_counter() - t0
        if self.barrier is not None:
            self.barrier()
        summary.failed_total = sum(os.path.exists(self._error_path(s.key)) for s in sources)
        if self.rank == 0:
            self.merge(sources)
        return summary

    def _bar(self, total_h: float):
        if not self.progress:
            return None
        from tqdm import tqdm
        label = "tokenize" + (f" rank {self.rank}/{self.world}" if self.world > 1 else "")
        return tqdm(total=total_h, desc=label, unit="h", file=sys.stderr, dynamic_ncols=True,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.3f}/{total:.3f} h of audio "
                               "[{elapsed}<{remaining}{postfix}]")

    def _batches(self, todo):
        """Consecutive clips (sorted by length) while the padded batch fits ``batch_seconds``; long ones alone."""
        batches, cur = [], []
        for s, info in todo:
            if info.duration > self.long_seconds:
                batches.append([(s, info)])
                continue
            if cur and (len(cur) + 1) * info.duration > self.batch_seconds or len(cur) >= self.max_batch:
                batches.append(cur)
                cur = []
            cur.append((s, info))
        if cur:
            batches.append(cur)
        return batches

    def _load(self, batch):
        out = []
        for s, info in batch:
            try:
                wav, sr = read_audio(s.path)
                out.append((s, info, convert_audio(wav, sr, self.model.sample_rate, self.model.channels), None))
            except (AudioError, ValueError, RuntimeError) as e:
                out.append((s, info, None, e))
        return out

    def _encode_and_write(self, loaded, summary: Summary) -> None:
        ok = [(s, info, wav) for s, info, wav, err in loaded if err is None]
        for s, _, _, err in loaded:
            if err is not None:
                self._error(s, err, summary)
        if not ok:
            return
        if len(ok) == 1 and ok[0][1].duration > self.long_seconds:
            results = [self._encode_long(ok[0][2].to(self.device))]
        else:
            results = ragged.encode_batch(self.model, [w.to(self.device) for _, _, w in ok], self.bandwidth)
        for (s, info, wav), frames in zip(ok, results):
            self._write(s, info, wav.shape[-1], frames)
            summary.done += 1
            summary.audio_seconds += info.duration

    def _encode_long(self, wav: torch.Tensor):
        """One long clip with bounded activations: streamed (causal), by segments, or one pass."""
        model = self.model
        if self.bandwidth is not None:
            model.set_target_bandwidth(self.bandwidth)
        with torch.no_grad():
            if not self.streamable:  # segmented models encode segment by segment inside encode()
                return model.encode(wav[None])
            state = model.encode_state(1)
            step = max(1, int(self.chunk_seconds * model.sample_rate))
            parts = []
            for off in range(0, wav.shape[-1], step):
                codes, state = model.stream_encode(wav[None, :, off:off + step], state)
                parts.append(codes)
            parts.append(model.stream_encode_flush(state))
            return [(torch.cat(parts, -1), None)]

    def _write(self, s: Source, info, num_samples: int, frames) -> None:
        codes = torch.cat([c for c, _ in frames], -1)[0].to("cpu", torch.int16).numpy()
        entry = {"path": s.path, "key": s.key, "codes": os.path.relpath(self._codes_path(s.key), self.out),
                 "duration": info.duration, "source_sample_rate": info.sample_rate,
                 "source_channels": info.channels, "num_samples": int(num_samples),
                 "sample_rate": self.model.sample_rate, "frame_rate": self.model.frame_rate,
                 "frames": int(codes.shape[-1]), "n_q": int(codes.shape[0])}
        path = self._codes_path(s.key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if self.segmented:
            lengths = np.array([c.shape[-1] for c, _ in frames], dtype=np.int64)
            scales = np.array([float(sc.reshape(-1)[0]) if sc is not None else 1.0 for _, sc in frames],
                              dtype=np.float32)
            atomic_write_bytes(path, _npz_bytes(codes=codes, frame_lengths=lengths, scales=scales))
        else:
            atomic_write_bytes(path, _npy_bytes(codes))
        atomic_write_bytes(self._entry_path(s.key), _json_bytes(entry))  # last: marks the file done
        try:
            os.unlink(self._error_path(s.key))
        except FileNotFoundError:
            pass

    def _error(self, s: Source, e: Exception, summary: Summary) -> None:
        rec = {"path": s.path, "key": s.key, "error": f"{type(e).__name__}: {e}"}
        summary.errors.append(rec)
        self.log(f"fastcodec tokenize: skipping {'' if s.path in str(e) else s.path + ': '}{e}")
        path = self._error_path(s.key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_bytes(path, _json_bytes(rec))

    def merge(self, sources: tp.Sequence[Source]) -> tuple[int, int]:
        """Write manifest.jsonl (done files) and errors.jsonl (failed ones) from the per-file records."""
        lines, errs = [], []
        for s in sources:
            for path, dest in ((self._entry_path(s.key), lines), (self._error_path(s.key), errs)):
                if os.path.exists(path):
                    with open(path, encoding="utf-8") as f:
                        dest.append(f.read().strip())
                    break
        atomic_write_bytes(os.path.join(self.out, "manifest.jsonl"), "".join(x + "\n" for x in lines).encode())
        atomic_write_bytes(os.path.join(self.out, "errors.jsonl"), "".join(x + "\n" for x in errs).encode())
        return len(lines), len(errs)


def tokenize(model, src, out_dir, bandwidth: tp.Optional[float] = None, **kwargs) -> Summary:
    """Tokenize the folder or manifest ``src`` into ``out_dir`` (keyword arguments: ``Tokenizer``'s)."""
    return Tokenizer(model, out_dir, bandwidth, **kwargs).run(list_sources(src))


def load_codes(path) -> tuple[torch.Tensor, tp.Optional[list]]:
    """Read a tokenized file: ``.npy`` -> (codes (K, T) int64, None); ``.npz`` -> (codes, frames for
    ``model.decode``: one ``(codes (1, K, T_i), scale (1, 1))`` per segment)."""
    path = os.fspath(path)
    if path.endswith(".npz"):
        with np.load(path) as z:
            codes = torch.from_numpy(z["codes"].astype(np.int64))
            lengths, scales = z["frame_lengths"].tolist(), z["scales"]
        frames, off = [], 0
        for n, sc in zip(lengths, scales):
            frames.append((codes[None, :, off:off + n], torch.tensor([[float(sc)]], dtype=torch.float32)))
            off += n
        return codes, frames
    return torch.from_numpy(np.load(path).astype(np.int64)), None
