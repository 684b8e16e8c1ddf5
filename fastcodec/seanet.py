"""``fastcodec.SEANetEncoder`` / ``SEANetDecoder``: the drop-in, fast SEANet.

Same arguments, attributes and ``state_dict`` as audiocraft's (they subclass our reference). The forward walks
the plan compiled once from ``self.model`` (``fastcodec.steps``: the same steps that streaming walks): each
``ELU -> StreamableConv1d`` pair is one ``fastcodec::conv1d`` call (padding and ELU inside the kernel, no padded
copy), each residual block's last conv adds the shortcut in its epilogue (or the whole block is one
``fastcodec::resblock``), each ``ELU -> StreamableConvTranspose1d`` one ``fastcodec::conv_transpose1d`` call (trim
included), the LSTM one ``fastcodec::lstm`` (an opaque op, so ``torch.compile(fullgraph=True)`` traces the whole
module). Weight-norm weights are folded once per parameter change. Other activations, norms (time_group_norm)
and modules run as they are. ``FASTCODEC_BACKEND=reference`` (or ``FASTCODEC_CONV_BACKEND``) runs the reference
forward.
"""
from __future__ import annotations

import warnings

import torch

from . import _backend, _hooks, _pool
from . import precision as _precision
from .precision import check_precision
from .reference import seanet as ref_seanet
from .steps import compile_plan, set_precision
from .streaming import StreamingMixin


# per-module attributes that are derived or per-thread, never copied or pickled (rebuilt on use)
_TRANSIENT = ("_plan", "_activation_pool_obj", "_fastcodec_streaming")
_warned_dtypes: set = set()


class _FastSEANet:
    def __init__(self, *args, precision: str = "float32", **kwargs):
        super().__init__(*args, **kwargs)
        self.__dict__["_precision"] = check_precision(precision)
        self._fast_plan()  # built eagerly: a plan built inside torch.compile would trace nn.LSTM

    @property
    def precision(self) -> str:
        """"float32" (default, exact) or "bf16": bf16 operands, float32 accumulation (``fastcodec.precision``).
        Settable; a stream state made at one precision is refused at the other."""
        return self.__dict__.get("_precision", "float32")

    @precision.setter
    def precision(self, value: str) -> None:
        self.__dict__["_precision"] = check_precision(value)
        set_precision(self._fast_plan(), value)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in _TRANSIENT}

    def __setstate__(self, state):
        super().__setstate__(state)
        self._fast_plan()

    def _fast_plan(self) -> list:
        plan = self.__dict__.get("_plan")
        if plan is None:
            plan = compile_plan(self.model, self.precision)
            self.__dict__["_plan"] = plan
        return plan

    def _use_reference(self, x: torch.Tensor) -> bool:
        if torch.compiler.is_compiling():
            return False
        if self.precision == "bf16":
            self._check_bf16(x)
            return False  # the plan's steps round the operands; the ops pick the backend (reference included)
        if _backend.choose("conv", x.device) == "reference" or _hooks.has_inner_hooks(self):
            return True
        if x.dtype != torch.float32:
            if x.is_floating_point() and x.dtype not in _warned_dtypes:  # others: the reference raises
                _warned_dtypes.add(x.dtype)
                warnings.warn(f"fastcodec: the SEANet kernels are float32-only; {x.dtype} input runs the "
                              "reference code", RuntimeWarning, stacklevel=4)
            return True
        return False

    def _check_bf16(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"{type(self).__name__}: precision='bf16' takes float32 input (bf16 operands, float32 "
                            f"accumulation and activations), got {got}; use precision='float32' for other dtypes")
        if _hooks.has_inner_hooks(self):
            raise RuntimeError(f"{type(self).__name__}: precision='bf16' runs the plan's steps, which never call the "
                               "hooks on inner modules (or global module hooks); remove them, or use "
                               "precision='float32', where they fire as in audiocraft")
        _precision.warn_emulated(x.device)

    def _activation_pool(self, x: torch.Tensor) -> _pool.ActivationPool | None:
        """The module's pool of layer outputs (fastcodec/_pool.py) for CPU float32 inference, else None."""
        if torch.compiler.is_compiling() or x.device.type != "cpu" or x.dtype != torch.float32:
            return None
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return None
        if _pool.cap_bytes() == 0 or not _pool.supported():
            return None
        pool = self.__dict__.get("_activation_pool_obj")
        if pool is None:
            pool = self.__dict__["_activation_pool_obj"] = _pool.ActivationPool()
        return pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_reference(x) if isinstance(x, torch.Tensor) or self.precision == "bf16" else True:
            return super().forward(x)
        self._check(x)
        with _pool.active(self._activation_pool(x)) as pool:
            for step in self._fast_plan():
                x = step(x)
        # the caller's output never lives in the pool (the next call would overwrite it)
        return x.clone() if pool is not None and pool.owns(x) else x


class SEANetEncoder(StreamingMixin, _FastSEANet, ref_seanet.SEANetEncoder):
    """Drop-in for ``audiocraft.modules.SEANetEncoder``. x: (B, channels, T) -> (B, dimension, ceil(T / hop))."""

    def _check(self, x: torch.Tensor) -> None:
        if not torch.compiler.is_compiling():
            ref_seanet._check_input(self, x, self.channels, "SEANetEncoder")


class SEANetDecoder(StreamingMixin, _FastSEANet, ref_seanet.SEANetDecoder):
    """Drop-in for ``audiocraft.modules.SEANetDecoder``. z: (B, dimension, T) -> (B, channels, T * hop)."""

    def _check(self, x: torch.Tensor) -> None:
        if not torch.compiler.is_compiling():
            ref_seanet._check_input(self, x, self.dimension, "SEANetDecoder")
