"""What every case builder shares: the providers (``SOURCES``, found at run time by ``load_class``), the
``Case``/``Options`` records, and the checks against the oracle.

Providers: the fast modules (``fastcodec.ResidualVectorQuantizer``, ``fastcodec.SEANetEncoder/SEANetDecoder``),
the reference (``fastcodec.reference.*``), audiocraft (imported like the tests do, without its heavy package
__init__), the ``torch.compile``d reference and, for SEANet on CPU, onnxruntime on the exported reference. A
missing one shows as "n/a" with the reason. Every provider of a case gets the same random weights (one
state_dict, loaded strictly) and the same input; the oracle is the reference, or audiocraft where the reference
is missing.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from fastcodec._oracles import OracleUnavailable, import_oracle

from .harness import Built, Check, Missing, compare_codes, compare_float_dict, float_tolerance

# kind -> provider -> (module, attribute); tests point these at stand-ins
SOURCES: dict[str, dict[str, tuple[str, str]]] = {
    "rvq": {
        "fastcodec": ("fastcodec", "ResidualVectorQuantizer"),
        "reference": ("fastcodec.reference.quantization", "ResidualVectorQuantizer"),
        "audiocraft": ("audiocraft.quantization.vq", "ResidualVectorQuantizer"),
    },
    "encoder": {
        "fastcodec": ("fastcodec", "SEANetEncoder"),
        "reference": ("fastcodec.reference.seanet", "SEANetEncoder"),
        "audiocraft": ("audiocraft.modules.seanet", "SEANetEncoder"),
    },
    "decoder": {
        "fastcodec": ("fastcodec", "SEANetDecoder"),
        "reference": ("fastcodec.reference.seanet", "SEANetDecoder"),
        "audiocraft": ("audiocraft.modules.seanet", "SEANetDecoder"),
    },
    # streaming rows: fastcodec's stateful streaming classes (its conv steps are where fast convs plug in)
    "stream_encoder": {
        "fastcodec": ("fastcodec.streaming", "StreamingSEANetEncoder"),
        "reference": ("fastcodec.reference.seanet", "SEANetEncoder"),
        "audiocraft": ("audiocraft.modules.seanet", "SEANetEncoder"),
    },
    "stream_decoder": {
        "fastcodec": ("fastcodec.streaming", "StreamingSEANetDecoder"),
        "reference": ("fastcodec.reference.seanet", "SEANetDecoder"),
        "audiocraft": ("audiocraft.modules.seanet", "SEANetDecoder"),
    },
}

FRAME_RATE = 75  # 24 kHz / hop 320


@dataclass
class Case:
    op: str
    id: str
    params: dict
    suites: tuple[str, ...]
    # torch.compile costs 5-60 s of CPU per case here: the quick suite compiles only where this says
    compiled_in: tuple[str, ...] = ("full",)


@dataclass
class Options:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    suite: str = "quick"
    threads: int = 1


def _compiled_reason(case: Case, classes: dict, opts: Options) -> str | None:
    if opts.suite not in case.compiled_in:
        return f"torch.compile not run in the {opts.suite} suite (compile time)" + (
            "; see --full" if "full" in case.compiled_in and opts.suite != "full" else "")
    if isinstance(classes["reference"], str):
        return "needs the reference: " + classes["reference"]
    return None


def load_class(kind: str, provider: str) -> type | str:
    """The provider's class, or the reason it is not available."""
    module, attr = SOURCES[kind][provider]
    try:
        if module.split(".")[0] in ("audiocraft", "encodec"):
            mod = import_oracle(module)
        else:
            mod = importlib.import_module(module)
    except OracleUnavailable as e:
        return Missing(f"{provider}: {e}")
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return f"{module} is not available yet"
        return f"{module} cannot be imported: {e}"
    except Exception as e:
        return f"{module} cannot be imported: {type(e).__name__}: {e}"
    cls = getattr(mod, attr, None)
    if cls is None:
        return f"{module}.{attr} is not available yet"
    return cls


def _classes(kind: str) -> tuple[dict[str, type | str], str | None]:
    """Classes per provider and the oracle provider (reference, else audiocraft, else None)."""
    classes = {p: load_class(kind, p) for p in ("fastcodec", "reference", "audiocraft")}
    oracle = next((p for p in ("reference", "audiocraft") if not isinstance(classes[p], str)), None)
    return classes, oracle


def _no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run():
        with torch.no_grad():
            return fn()

    return run


NO_ORACLE = "no oracle: neither the reference nor audiocraft is available"


def _unavailable(reason: str, *names: str) -> Built:
    return Built({n: reason for n in names}, check=lambda out: Check(False, reason), notes=[reason])


def _float_tols(exp: dict, exp64: dict, keys: list[str]) -> tuple[dict[str, float], list[str]]:
    """Per-output tolerances from the float64 oracle run (valid only where it chose the same codes)."""
    same = "codes" not in exp or torch.equal(exp["codes"].cpu(), exp64["codes"].cpu())
    tols = {k: float_tolerance(exp[k], exp64[k] if same else exp[k]) for k in keys}
    notes = [] if same else ["the float64 oracle chose other codes at near-ties: float tolerances are 1 ulp"]
    return tols, notes


def _codes_then_floats(exp: dict, tols: dict[str, float], x_q: torch.Tensor, codebooks: torch.Tensor):
    """Check: codes up to certified near-ties, then float outputs (only when every code agrees)."""

    def check(out: dict) -> Check:
        c = compare_codes(out["codes"], exp["codes"], x_q, codebooks)
        if not c.ok:
            return c
        if c.flips:
            return Check(True, c.detail + "; float outputs not compared", flips=c.flips)
        f = compare_float_dict(out, exp, tols)
        return Check.all([c, f]) if tols else c

    return check


@dataclass
class _Family:
    """One module family of a case: its classes per provider, the oracle provider, and ``make``."""
    classes: dict[str, type | str]
    oracle: str
    make: Callable[..., torch.nn.Module]  # make(cls, dtype=float32): built, loaded, on the device, eval

    def oracle_module(self, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        return self.make(self.classes[self.oracle], dtype)
