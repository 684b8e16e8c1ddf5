"""The SEANet's compute precision: ``"float32"`` (the default, exact) or ``"bf16"`` (opt-in).

``precision="bf16"`` means: every conv, transposed conv and LSTM multiplies **bf16 operands** (its weights, and
its input after the activation and the padding, rounded to the nearest bf16, ties to even) and **accumulates in
float32**. Biases, activations, residual additions, norms, the LSTM's hidden and cell state (and what one LSTM
layer passes to the next) and every layer's output stay float32. The RVQ keeps its exact search on whatever latent
it receives. A product of two bf16 numbers is exact in float32, so the float32 kernels fed rounded operands
compute exactly these numerics; that is how fastcodec runs them today on every machine ("emulated": same results
as a bf16 kernel with float32 accumulation up to the order of the sums, no speed-up). A native bf16 kernel
(AVX512_BF16 / AMX on CPUs, tensor cores on GPUs) is the route to the speed-up and is not shipped yet;
``fastcodec info`` says which applies to this machine and why.

The contract is per precision: a streamed bf16 codec equals the offline bf16 codec the way a float32 stream
equals the float32 offline pass (same rounding points, sums in another order). Measured fidelity against the
float32 path: docs/bf16.md.
"""
from __future__ import annotations

import warnings

import torch

PRECISIONS = ("float32", "bf16")


def check_precision(value, name: str = "precision") -> str:
    """``value`` if it is a supported precision, else a ValueError naming ``name``."""
    if not isinstance(value, str) or value not in PRECISIONS:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, PRECISIONS))}, got {value!r}")
    return value


def round_bf16(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to the nearest bf16 (ties to even), in ``t``'s dtype. Differentiable (the gradient passes
    through unchanged, as through any cast)."""
    return t.to(torch.bfloat16).to(t.dtype)


def cpu_bf16_isa() -> list[str]:
    """The bf16 instruction sets this CPU reports (``avx512_bf16``, ``amx_bf16``); empty where it has none or
    where the flags cannot be read (not Linux)."""
    from ._backend import _cpuinfo_flags  # the flags the SIMD detection reads

    flags = _cpuinfo_flags() or set()
    return sorted(f for f in ("avx512_bf16", "amx_bf16") if f in flags)


def status(device: str = "cpu") -> dict:
    """How ``precision="bf16"`` runs on ``device``: ``{"mode": "emulated", "reason": ...}`` (the only mode today)."""
    if device == "cuda":
        hw = ("this GPU has bf16 tensor cores" if torch.cuda.is_available()
              and torch.cuda.get_device_capability()[0] >= 8 else "no bf16 tensor cores (or no GPU) here")
    else:
        isa = cpu_bf16_isa()
        hw = (f"this CPU has {' and '.join(isa)}" if isa else
              "this CPU has no AVX512_BF16 or AMX-BF16 (a bf16 kernel would not be faster than float32 here)")
    return {"mode": "emulated",
            "reason": f"bf16 operands on the float32 kernels (same numerics, no speed-up); {hw}, and fastcodec "
                      f"ships no native bf16 kernel yet"}


_warned: set = set()


def warn_emulated(device: torch.device) -> None:
    """Once per process and device type: bf16 numerics run emulated here (``fastcodec info`` explains)."""
    kind = device.type
    if kind in _warned:
        return
    _warned.add(kind)
    warnings.warn(f"fastcodec: precision='bf16' on {kind}: {status(kind)['reason']}. Results are the bf16 "
                  "numerics; speed is the float32 path's or a little slower (see `fastcodec info`)",
                  RuntimeWarning, stacklevel=3)
