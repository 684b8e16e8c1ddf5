"""What ``fastcodec bench`` and ``pytest bench/`` measure: operations, shapes and suites (``CASES``,
``select``), and ``build``, which makes a case runnable.

The builders live beside this module: ``build_rvq`` (the quantizer ops) and ``build_seanet`` (SEANet offline,
streaming, the whole codec); what they share, the providers of each case (``SOURCES``, ``load_class``) and the
checks against the oracle, is in ``case_base``. The names other code uses are importable from here.
"""
from __future__ import annotations

from typing import Callable

from .build_rvq import _build_rvq
from .build_seanet import (  # noqa: F401  (re-exported)
    SEANET_CONFIGS, _build_codec, _build_seanet, _build_streaming, _conv_lstm_flops, _onnx_impl, decoder_context,
    encoder_context)
from .case_base import FRAME_RATE, SOURCES, Case, Options, load_class  # noqa: F401  (re-exported)
from .harness import Built

OPS: dict[str, str] = {
    "rvq_encode": "RVQ encode: codes of every layer",
    "rvq_forward": "RVQ forward (eval): quantized + codes",
    "rvq_train": "RVQ train step: forward + backward + EMA codebook update",
    "rvq_decode": "RVQ decode: codes -> sum of codewords",
    "rvq_kmeans": "RVQ k-means init: first training call",
    "seanet_encoder": "SEANet encoder, offline",
    "seanet_decoder": "SEANet decoder, offline",
    "seanet_streaming": "SEANet streaming: one 320-sample chunk",
    "codec": "whole codec: encoder -> RVQ encode -> RVQ decode -> decoder",
}


BUILDERS: dict[str, Callable[[Case, Options], Built]] = {
    "rvq_encode": _build_rvq, "rvq_forward": _build_rvq, "rvq_train": _build_rvq, "rvq_decode": _build_rvq,
    "rvq_kmeans": _build_rvq, "seanet_encoder": _build_seanet, "seanet_decoder": _build_seanet,
    "seanet_streaming": _build_streaming, "codec": _build_codec,
}


def _rvq(op: str, B: int, T: int, K: int, suites: tuple[str, ...], bins: int = 1024, D: int = 128,
         compiled_in: tuple[str, ...] = ("full",), **extra) -> Case:
    cid = f"B{B}-T{T}-K{K}" + (f"-bins{bins}-D{D}" if (bins, D) != (1024, 128) else "")
    return Case(op, cid, dict(B=B, T=T, K=K, bins=bins, D=D, **extra), suites, compiled_in)


def _seanet(op: str, config: str, B: int, seconds: float, suites: tuple[str, ...],
            compiled_in: tuple[str, ...] = ("full",)) -> Case:
    return Case(op, f"{config}-B{B}-{seconds:g}s", dict(config=config, B=B, seconds=seconds), suites, compiled_in)


S, Q, F, G = ("smoke",), ("quick", "full"), ("full",), ("gpu",)
CASES: list[Case] = [
    _rvq("rvq_encode", 1, 20, 2, S, bins=64, D=16),
    _rvq("rvq_encode", 1, 750, 8, Q),
    _rvq("rvq_encode", 8, 750, 8, Q, compiled_in=Q),
    _rvq("rvq_encode", 32, 750, 8, F),
    _rvq("rvq_encode", 8, 750, 32, F),
    _rvq("rvq_encode", 1, 750, 32, F),
    _rvq("rvq_encode", 32, 750, 32, F),
    _rvq("rvq_encode", 8, 750, 8, F, bins=2048, D=256),
    _rvq("rvq_forward", 1, 20, 2, S, bins=64, D=16),
    _rvq("rvq_forward", 8, 750, 8, Q),
    _rvq("rvq_forward", 8, 750, 32, F),
    _rvq("rvq_train", 1, 20, 2, S, bins=64, D=16),
    _rvq("rvq_train", 1, 750, 8, Q, compiled_in=Q),
    _rvq("rvq_train", 8, 750, 8, F),
    _rvq("rvq_train", 16, 150, 32, F),
    _rvq("rvq_decode", 1, 20, 2, S, bins=64, D=16),
    _rvq("rvq_decode", 8, 750, 8, Q),
    _rvq("rvq_decode", 8, 750, 32, F),
    _rvq("rvq_decode", 32, 750, 8, F),
    _rvq("rvq_kmeans", 1, 20, 2, S, bins=16, D=16, kmeans=True, iters=3),
    _rvq("rvq_kmeans", 1, 150, 1, Q, kmeans=True, iters=10),
    _rvq("rvq_kmeans", 1, 750, 2, F, kmeans=True, iters=10),
    _seanet("seanet_encoder", "24k", 1, 0.1, S),
    _seanet("seanet_encoder", "24k", 1, 1, Q),
    _seanet("seanet_encoder", "24k", 1, 10, Q),
    _seanet("seanet_encoder", "24k", 8, 10, F),
    _seanet("seanet_encoder", "32k", 1, 10, Q),
    _seanet("seanet_encoder", "48k", 1, 10, F),
    _seanet("seanet_decoder", "24k", 1, 0.1, S),
    _seanet("seanet_decoder", "24k", 1, 1, Q),
    _seanet("seanet_decoder", "24k", 1, 10, Q),
    _seanet("seanet_decoder", "24k", 8, 10, F),
    _seanet("seanet_decoder", "32k", 1, 10, Q),
    _seanet("seanet_decoder", "48k", 1, 10, F),
    Case("seanet_streaming", "24k-zeropad-encoder-B1", dict(config="24k-zeropad", side="encoder", B=1), S + Q),
    Case("seanet_streaming", "24k-zeropad-decoder-B1", dict(config="24k-zeropad", side="decoder", B=1), S + Q),
    Case("codec", "24k-B1-0.1s-K2", dict(config="24k", B=1, seconds=0.1, K=2, bins=1024), S),
    Case("codec", "24k-B1-1s-K8", dict(config="24k", B=1, seconds=1, K=8, bins=1024), Q),
    Case("codec", "24k-B1-10s-K8", dict(config="24k", B=1, seconds=10, K=8, bins=1024), F),
    Case("codec", "24k-B8-10s-K8", dict(config="24k", B=8, seconds=10, K=8, bins=1024), F),
    # `fastcodec bench --device cuda`: the first numbers on a GPU, most wanted first (a --budget stops early)
    _rvq("rvq_encode", 32, 750, 32, G, compiled_in=G),
    _rvq("rvq_train", 32, 750, 32, G, compiled_in=G),
    _rvq("rvq_decode", 32, 750, 32, G),
    _seanet("seanet_encoder", "24k", 32, 1, G, compiled_in=G),
    _seanet("seanet_decoder", "24k", 32, 1, G, compiled_in=G),
    _rvq("rvq_encode", 1, 750, 8, G),
    _rvq("rvq_train", 8, 750, 8, G),
]

# per suite: warm-up calls, max and min timed rounds, seconds of timing after which min rounds suffice
SUITE_TIMING: dict[str, dict] = {
    "smoke": dict(warmup=1, reps=3, min_reps=2, budget_s=0.5),
    "quick": dict(warmup=1, reps=9, min_reps=3, budget_s=4.0),
    "full": dict(warmup=3, reps=25, min_reps=5, budget_s=20.0),
    "gpu": dict(warmup=3, reps=25, min_reps=5, budget_s=5.0),
}


def select(suite: str, only: list[str] | None = None) -> list[Case]:
    """The cases of ``suite`` ("smoke", "quick", "full", "gpu"), optionally restricted to some operations."""
    if suite not in SUITE_TIMING:
        raise ValueError(f"unknown suite {suite!r}; choose one of {', '.join(SUITE_TIMING)}")
    unknown = sorted(set(only or ()) - set(OPS))
    if unknown:
        raise ValueError(f"unknown operation(s) {', '.join(unknown)}; choose from {', '.join(OPS)}")
    return [c for c in CASES if suite in c.suites and (not only or c.op in only)]


def build(case: Case, opts: Options) -> Built:
    """Make ``case`` runnable: weights, inputs, oracle outputs, every provider's Impl (or reason)."""
    return BUILDERS[case.op](case, opts)
