"""Fused SEANet convolutions: ``fastcodec::conv1d`` (pad -> ELU -> conv -> residual add in one op) and
``fastcodec::conv_transpose1d`` (ELU -> transposed conv -> trim, the decoder's upsampling).

``y = conv1d(act(pad1d(x, (pad_left, pad_right), pad_mode)), weight, bias, stride, dilation) (+ skip)``

- ``x``: (B, C_in, T) float32, any strides; ``weight``: (C_out, C_in, K); ``bias``: (C_out,) or None;
  ``skip``: (B, C_out, T_out) or None; ``y``: (B, C_out, T_out) contiguous, with
  ``T_out = (pad_left + T + pad_right - ((K - 1) * dilation + 1)) // stride + 1``.
- ``pad1d`` is audiocraft's: ``constant`` pads zeros; ``reflect`` mirrors, and an input no longer than the
  pad is first zero-extended to ``max(pad) + 1`` samples (the zeros are reflected too, then cut off);
  ``replicate`` repeats the edge samples.
- ``act`` is ``ELU(alpha=elu_alpha)`` applied to the input (before padding; the two commute), or none.
  SEANet puts an ELU in front of every conv except the first and the shortcut.

Backends (``fastcodec._backend.choose("conv", device)``): ``cpp`` (csrc/conv1d_cpu.cpp, padding and ELU
done while packing the input, no padded copy), ``cuda`` (csrc/conv1d_cuda.cu, see ``_cuda_lib``; `auto` uses
it only on GPUs where it was measured faster than cuDNN, ``_backend.CUDA_CONV_MEASURED_FASTER``) and
``reference`` (plain PyTorch, the oracle). The backward always runs in ATen.

The transposed conv runs on the CPU as ``stride`` interleaved ordinary convs of ``ceil(K / stride)`` taps
through the same kernel (faster than ELU + F.conv_transpose1d + trim on each of the 24 kHz decoder's four layers;
measured: bench/results/design-measurements.md); on CUDA its ``cuda`` backend is cuDNN through ATen.

Weights: the C++ kernel wants a packed copy. ``_packed_weight`` caches it per weight tensor and
``weight_norm_weight(v, g)`` folds ``g * v / ||v||`` once per change of ``v`` or ``g``, both under the one
cache rule of ``fastcodec._cache`` (identity, version and a content fingerprint of the sources), so any
write repacks and nothing else does.

Shapes, paddings and argument checks live in ``fastcodec.ops.conv_args`` (re-exported here).
"""
from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import shutil
import subprocess
import threading
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import _backend, _build, _cache, _pool
from ..reference.conv import pad1d
from .conv_args import (  # noqa: F401  (re-exported: fastcodec.ops.conv is where callers import them from)
    _PAD_CODE, PAD_MODES, _check_elu_alpha, _check_int, _check_tensor, _check_x_weight, _describe, _devices_named,
    _effective_stride, _pad1d_backward, check_conv1d_args, check_conv_transpose1d_args, conv1d_output_length,
    conv_transpose1d_output_length, streamable_padding, streamable_trim)

IMPLS: dict[str, Callable] = {}


def register_impl(backend: str):
    def deco(fn):
        IMPLS[backend] = fn
        return fn

    return deco


# ---------------------------------------------------------------------------------------------
# reference implementation (the oracle for every other backend)
# ---------------------------------------------------------------------------------------------


def conv1d_reference(x, weight, bias=None, skip=None, stride=1, dilation=1, pad_left=0, pad_right=0,
                     pad_mode="constant", elu_alpha=None):
    """Plain PyTorch, in audiocraft's order: ELU, pad1d, F.conv1d, + skip. Any float dtype (tests use float64)."""
    if elu_alpha is not None:
        x = F.elu(x, elu_alpha)
    y = F.conv1d(pad1d(x, (pad_left, pad_right), pad_mode), weight, bias, stride, 0, dilation)
    return y if skip is None else y + skip


IMPLS["reference"] = conv1d_reference


# ---------------------------------------------------------------------------------------------
# weight caches
# ---------------------------------------------------------------------------------------------


_packed_cache = _cache.TensorCache()
_folded_cache = _cache.TensorCache()


def weight_norm_weight(weight_v: torch.Tensor, weight_g: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``weight_g * weight_v / ||weight_v||`` (norm over all dims but ``dim``), as ``torch._weight_norm``.

    When autograd needs it (grad enabled and v or g requires grad) it is recomputed per call so
    gradients flow; otherwise it is folded once per change of v or g and the same tensor comes back.
    """
    if torch.is_grad_enabled() and (weight_v.requires_grad or weight_g.requires_grad):
        return torch._weight_norm(weight_v, weight_g, dim)

    def fold():
        # a normal tensor even under inference_mode: it needs a version counter to key the packed cache
        with torch.inference_mode(False):
            return torch._weight_norm(weight_v.detach(), weight_g.detach(), dim)

    return _folded_cache.get((weight_v, weight_g), fold, (dim,))


def _packed_weight(weight: torch.Tensor) -> torch.Tensor:
    return _packed_cache.get((weight,), lambda: _cpu_ext().pack_weight(weight.detach()), ("conv",))


def _packed_weight_transposed(weight: torch.Tensor, stride: int) -> torch.Tensor:
    ext = _cpu_ext()
    return _packed_cache.get((weight,), lambda: ext.pack_weight(ext.polyphase_weight(weight.detach(), stride)),
                             ("transposed", stride))


# ---------------------------------------------------------------------------------------------
# cpp backend
# ---------------------------------------------------------------------------------------------


def _cpu_ext():
    return _build.load_named("conv_cpu")


_backend.register_probe("conv", "cpp", _backend.probe_by_loading(_cpu_ext))


# No ATen dispatch for any shape: on every SEANet encoder layer this kernel was at least as fast as the
# pad + ELU + F.conv1d it replaces; F.conv1d alone is a little faster on a few layers but needs that padded copy
# (measured: bench/results/design-measurements.md).
@register_impl("cpp")
def _conv1d_cpp(x, weight, bias, skip, stride, dilation, pad_left, pad_right, pad_mode, elu_alpha):
    c_out, _, k = weight.shape
    stride = _effective_stride(x.shape[2], k, stride, dilation, pad_left, pad_right)
    t_out = conv1d_output_length(x.shape[2], k, stride, dilation, pad_left, pad_right)
    out = _pool.empty((x.shape[0], c_out, t_out), x)  # every element is written
    _cpu_ext().conv1d(x, _packed_weight(weight), bias, skip, out, c_out, k, stride, dilation, pad_left, pad_right,
                      _PAD_CODE[pad_mode], elu_alpha)
    return out


# ---------------------------------------------------------------------------------------------
# cuda backend: csrc/conv1d_cuda.cu built by plain nvcc into a shared library and called with ctypes.
# The .cu has no torch headers (extern "C" launchers on raw pointers and a cudaStream_t), so the
# binary does not depend on torch's C++ ABI and is exactly what CI compile-checks without a GPU.
# ---------------------------------------------------------------------------------------------


class _Conv1dParams(ctypes.Structure):
    """Mirror of FcConv1dParams (csrc/conv1d_params.h); its size is checked against the library's."""

    _fields_ = [(n, ctypes.c_void_p) for n in ("x", "weight", "bias", "skip", "out")] + [
        (n, ctypes.c_int64)
        for n in ("batch", "c_in", "c_out", "t_in", "t_out", "kernel", "stride", "dilation", "pad_left",
                  "pad_right", "reflect_len", "x_stride_b", "x_stride_c", "x_stride_t", "skip_stride_b",
                  "skip_stride_c", "skip_stride_t", "out_stride_b", "out_stride_c")
    ] + [("pad_mode", ctypes.c_int32), ("has_elu", ctypes.c_int32), ("elu_alpha", ctypes.c_float),
         ("reserved", ctypes.c_int32)]


_cuda: dict[str, object] = {}  # arch -> loaded library or the error message of its failed build
_cuda_lock = threading.Lock()
CUDA_SOURCES = ("conv1d_cuda.cu", "conv1d_cuda_body.cuh", "conv1d_params.h")


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


NVCC_MISSING = ("nvcc (the CUDA toolkit's compiler) is needed to build fastcodec's CUDA conv and was not found "
                "on PATH, in $CUDA_HOME/bin or $CUDA_PATH/bin. Fix: install the CUDA toolkit that matches "
                "torch.version.cuda and set CUDA_HOME, or leave FASTCODEC_CONV_BACKEND unset (ATen/cuDNN runs the "
                "convs on CUDA by default)")


def _nvcc_version(nvcc: str) -> str:
    """``nvcc --version``'s release line (part of the build key: a new toolkit must not reuse an old binary)."""
    r = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    lines = [ln.strip() for ln in r.stdout.splitlines() if ln.strip()]
    return lines[-1] if r.returncode == 0 and lines else f"unknown ({nvcc})"


def _cuda_arch(device: torch.device | int | None = None) -> str:
    """Compute capability of ``device`` (the input's, not the current device's), e.g. ``"90"``."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}"


def cuda_build_command(nvcc: str, arch: str, out: str) -> list[str]:
    """nvcc command for ``arch``: SASS for it plus its PTX, so a newer GPU can JIT the kernel."""
    return [nvcc, "-O3", "-shared", "-Xcompiler", "-fPIC",
            f"-gencode=arch=compute_{arch},code=sm_{arch}", f"-gencode=arch=compute_{arch},code=compute_{arch}",
            f"-I{_build.CSRC}", "-o", out, str(_build.CSRC / "conv1d_cuda.cu")]


def cuda_build_dir(nvcc: str, arch: str) -> "os.PathLike":
    """Cache directory keyed by the sources, the arch, the nvcc release and torch (like ``_build``)."""
    h = hashlib.sha256()
    for name in CUDA_SOURCES:
        h.update(name.encode() + b"\0" + (_build.CSRC / name).read_bytes() + b"\0")
    h.update(f"{arch}\0{_nvcc_version(nvcc)}\0{nvcc}\0".encode())
    h.update("\0".join(cuda_build_command(nvcc, arch, "")).encode())
    return _build.cache_root() / f"fastcodec-torch{torch.__version__}" / f"conv_cuda-sm{arch}-{h.hexdigest()[:16]}"


def _cuda_lib(device: torch.device | int | None = None):
    """Build (once per source/arch/nvcc, cached and flock-guarded like ``_build``) and load the CUDA library for
    ``device``'s compute capability."""
    with _cuda_lock:
        arch = _cuda_arch(device)
        got = _cuda.get(arch)
        if isinstance(got, str):
            raise _build.ExtensionBuildError(got)
        if got is not None:
            return got
        try:
            _cuda[arch] = _build_cuda_lib(arch)
        except Exception as e:
            _cuda[arch] = f"fastcodec could not build/load csrc/conv1d_cuda.cu for sm_{arch}: {type(e).__name__}: {e}"
            raise _build.ExtensionBuildError(_cuda[arch]) from e
        return _cuda[arch]


def _build_cuda_lib(arch: str):
    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError(NVCC_MISSING)
    bdir = cuda_build_dir(nvcc, arch)
    bdir.mkdir(parents=True, exist_ok=True)
    so = bdir / "libfastcodec_conv1d_cuda.so"
    with open(bdir / ".fastcodec-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not so.is_file():
                tmp = bdir / f".tmp-{os.getpid()}.so"
                cmd = cuda_build_command(nvcc, arch, str(tmp))
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
                os.replace(tmp, so)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    lib = ctypes.CDLL(str(so))
    lib.fastcodec_conv1d_params_size.restype = ctypes.c_int64
    lib.fastcodec_conv1d_cuda.restype = ctypes.c_int
    lib.fastcodec_conv1d_cuda.argtypes = [ctypes.POINTER(_Conv1dParams), ctypes.c_int, ctypes.c_void_p]
    lib.fastcodec_cuda_error_string.restype = ctypes.c_char_p
    lib.fastcodec_cuda_error_string.argtypes = [ctypes.c_int]
    if lib.fastcodec_conv1d_params_size() != ctypes.sizeof(_Conv1dParams):
        raise RuntimeError("FcConv1dParams layout differs between conv1d_params.h and fastcodec/ops/conv.py")
    return lib


def _cuda_probe() -> _backend.Availability:
    if not torch.cuda.is_available():
        return _backend.Availability(False, "no CUDA device is available")
    try:
        _cuda_lib()
    except _build.ExtensionBuildError as e:
        return _backend.Availability(False, str(e))
    return _backend.Availability(True)


_backend.register_probe("conv", "cuda", _cuda_probe)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def conv1d_params(x, weight, bias, skip, out, stride, dilation, pad_left, pad_right, pad_mode, elu_alpha):
    """The FcConv1dParams of one call (pointers into the given tensors; weight and bias contiguous)."""
    B, c_in, t_in = x.shape
    c_out, _, k = weight.shape
    return _Conv1dParams(
        x=_ptr(x), weight=_ptr(weight), bias=_ptr(bias), skip=_ptr(skip), out=_ptr(out),
        batch=B, c_in=c_in, c_out=c_out, t_in=t_in, t_out=out.shape[2], kernel=k, stride=stride, dilation=dilation,
        pad_left=pad_left, pad_right=pad_right,
        reflect_len=max(t_in, max(pad_left, pad_right) + 1) if pad_mode == "reflect" else t_in,
        x_stride_b=x.stride(0), x_stride_c=x.stride(1), x_stride_t=x.stride(2),
        skip_stride_b=skip.stride(0) if skip is not None else 0,
        skip_stride_c=skip.stride(1) if skip is not None else 0,
        skip_stride_t=skip.stride(2) if skip is not None else 0,
        out_stride_b=out.stride(0), out_stride_c=out.stride(1),
        pad_mode=_PAD_CODE[pad_mode], has_elu=int(elu_alpha is not None),
        elu_alpha=float(elu_alpha) if elu_alpha is not None else 0.0, reserved=0,
    )


@register_impl("cuda")
def _conv1d_cuda(x, weight, bias, skip, stride, dilation, pad_left, pad_right, pad_mode, elu_alpha):
    lib = _cuda_lib(x.device)
    B, c_in, t_in = x.shape
    c_out, _, k = weight.shape
    stride = _effective_stride(t_in, k, stride, dilation, pad_left, pad_right)
    t_out = conv1d_output_length(t_in, k, stride, dilation, pad_left, pad_right)
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    out = torch.empty((B, c_out, t_out), dtype=x.dtype, device=x.device)
    p = conv1d_params(x, weight, bias, skip, out, stride, dilation, pad_left, pad_right, pad_mode, elu_alpha)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    err = lib.fastcodec_conv1d_cuda(ctypes.byref(p), x.device.index or 0, stream)
    if err != 0:
        raise RuntimeError(f"fastcodec conv1d CUDA launch failed: {lib.fastcodec_cuda_error_string(err).decode()}")
    return out


# ---------------------------------------------------------------------------------------------
# the op
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fastcodec::conv1d", mutates_args=())
def conv1d_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    skip: Optional[torch.Tensor] = None,
    stride: int = 1,
    dilation: int = 1,
    pad_left: int = 0,
    pad_right: int = 0,
    pad_mode: str = "constant",
    elu_alpha: Optional[float] = None,
) -> torch.Tensor:
    """The op itself (see the module docstring); ``conv1d`` is the checked Python entry point."""
    check_conv1d_args(x, weight, bias, skip, stride, dilation, pad_left, pad_right, pad_mode, elu_alpha)
    backend = _backend.choose("conv", x.device)
    return IMPLS[backend](x, weight, bias, skip, stride, dilation, pad_left, pad_right, pad_mode, elu_alpha)


@conv1d_op.register_fake
def _(x, weight, bias=None, skip=None, stride=1, dilation=1, pad_left=0, pad_right=0, pad_mode="constant",
      elu_alpha=None):
    check_conv1d_args(x, weight, bias, skip, stride, dilation, pad_left, pad_right, pad_mode, elu_alpha)
    t_out = conv1d_output_length(x.shape[2], weight.shape[2], stride, dilation, pad_left, pad_right)
    return x.new_empty((x.shape[0], weight.shape[0], t_out))


def _setup_context(ctx, inputs, output):
    x, weight, bias, skip, stride, dilation, pad_left, pad_right, pad_mode, elu_alpha = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (stride, dilation, pad_left, pad_right, pad_mode, elu_alpha, bias is not None)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    stride, dilation, pad_left, pad_right, pad_mode, elu_alpha, has_bias = ctx.args
    # needs_input_grad can be shorter than the argument list when trailing optionals are None
    need_x, need_w, need_b, need_skip = (tuple(ctx.needs_input_grad) + (False,) * 4)[:4]
    xe = F.elu(x, elu_alpha) if elu_alpha is not None else x
    padded = pad1d(xe, (pad_left, pad_right), pad_mode)
    grad = grad.contiguous()
    g_pad, g_w, g_b = torch.ops.aten.convolution_backward(
        grad, padded, weight, [weight.shape[0]] if has_bias else None, [stride], [0], [dilation], False, [0], 1,
        [need_x, need_w, need_b and has_bias],
    )
    g_x = None
    if need_x:
        g_x = _pad1d_backward(g_pad, x.shape[-1], pad_left, pad_right, pad_mode)
        if elu_alpha is not None:
            g_x = torch.ops.aten.elu_backward(g_x, elu_alpha, 1.0, 1.0, False, x)
    return g_x, g_w, g_b if need_b else None, grad if need_skip else None, None, None, None, None, None, None


conv1d_op.register_autograd(_backward, setup_context=_setup_context)


def conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, skip: torch.Tensor | None = None,
           stride: int = 1, dilation: int = 1, pad_left: int = 0, pad_right: int = 0, pad_mode: str = "constant",
           elu_alpha: float | None = None) -> torch.Tensor:
    """``fastcodec::conv1d`` with its arguments checked first (TypeError/ValueError naming the problem).

    x: (B, C_in, T); weight: (C_out, C_in, K); bias: (C_out,); skip: (B, C_out, T_out) -> (B, C_out, T_out).
    """
    check_conv1d_args(x, weight, bias, skip, stride, dilation, pad_left, pad_right, pad_mode, elu_alpha)
    return conv1d_op(x, weight, bias, skip, stride, dilation, pad_left, pad_right, pad_mode,
                     None if elu_alpha is None else float(elu_alpha))


# ---------------------------------------------------------------------------------------------
# transposed conv: ``fastcodec::conv_transpose1d``, SEANet decoder's ELU -> ConvTranspose1d -> trim
# ---------------------------------------------------------------------------------------------


def conv_transpose1d_reference(x, weight, bias=None, stride=1, trim_left=0, trim_right=0, elu_alpha=None):
    """Plain PyTorch, in audiocraft's order: ELU, F.conv_transpose1d, unpad1d. Any float dtype."""
    if elu_alpha is not None:
        x = F.elu(x, elu_alpha)
    y = F.conv_transpose1d(x, weight, bias, stride)
    return y[..., trim_left:y.shape[-1] - trim_right].contiguous()


IMPLS_T: dict[str, Callable] = {"reference": conv_transpose1d_reference}


def _conv_transpose1d_cpp(x, weight, bias, stride, trim_left, trim_right, elu_alpha):
    c_out, k = weight.shape[1], weight.shape[2]
    length = conv_transpose1d_output_length(x.shape[2], k, stride, trim_left, trim_right)
    out = _pool.empty((x.shape[0], c_out, length), x)  # every element is written
    _cpu_ext().conv_transpose1d(x, _packed_weight_transposed(weight, stride), bias, out, c_out, k, stride, trim_left,
                                elu_alpha)
    return out


IMPLS_T["cpp"] = _conv_transpose1d_cpp
# cuda: cuDNN's transposed conv (through ATen) after the ELU; the .cu has no transposed kernel
IMPLS_T["cuda"] = conv_transpose1d_reference


@torch.library.custom_op("fastcodec::conv_transpose1d", mutates_args=())
def conv_transpose1d_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: int = 1,
    trim_left: int = 0,
    trim_right: int = 0,
    elu_alpha: Optional[float] = None,
) -> torch.Tensor:
    """``conv_transpose1d(act(x), weight, bias, stride)[..., trim_left : full - trim_right]``.

    x: (B, C_in, T); weight: (C_in, C_out, K) (ConvTranspose1d layout); bias: (C_out,)
    -> (B, C_out, (T - 1) * stride + K - trim_left - trim_right), contiguous.
    """
    check_conv_transpose1d_args(x, weight, bias, stride, trim_left, trim_right, elu_alpha)
    backend = _backend.choose("conv", x.device)
    return IMPLS_T[backend](x, weight, bias, stride, trim_left, trim_right, elu_alpha)


@conv_transpose1d_op.register_fake
def _(x, weight, bias=None, stride=1, trim_left=0, trim_right=0, elu_alpha=None):
    check_conv_transpose1d_args(x, weight, bias, stride, trim_left, trim_right, elu_alpha)
    length = conv_transpose1d_output_length(x.shape[2], weight.shape[2], stride, trim_left, trim_right)
    return x.new_empty((x.shape[0], weight.shape[1], length))


def _setup_context_t(ctx, inputs, output):
    x, weight, bias, stride, trim_left, trim_right, elu_alpha = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (stride, trim_left, trim_right, elu_alpha, bias is not None)


def _backward_t(ctx, grad):
    x, weight = ctx.saved_tensors
    stride, trim_left, trim_right, elu_alpha, has_bias = ctx.args
    need_x, need_w, need_b = (tuple(ctx.needs_input_grad) + (False,) * 3)[:3]
    xe = F.elu(x, elu_alpha) if elu_alpha is not None else x
    g_full = F.pad(grad, (trim_left, trim_right)).contiguous()  # trimmed samples get no gradient
    g_xe, g_w, g_b = torch.ops.aten.convolution_backward(
        g_full, xe, weight, [weight.shape[1]] if has_bias else None, [stride], [0], [1], True, [0], 1,
        [need_x, need_w, need_b and has_bias],
    )
    g_x = g_xe
    if need_x and elu_alpha is not None:
        g_x = torch.ops.aten.elu_backward(g_xe, elu_alpha, 1.0, 1.0, False, x)
    return g_x, g_w, g_b if need_b else None, None, None, None, None


conv_transpose1d_op.register_autograd(_backward_t, setup_context=_setup_context_t)


def conv_transpose1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
                     trim_left: int = 0, trim_right: int = 0, elu_alpha: float | None = None) -> torch.Tensor:
    """``fastcodec::conv_transpose1d`` with its arguments checked first (TypeError/ValueError).

    x: (B, C_in, T); weight: (C_in, C_out, K); bias: (C_out,) -> (B, C_out, (T-1)*stride + K - trims).
    """
    check_conv_transpose1d_args(x, weight, bias, stride, trim_left, trim_right, elu_alpha)
    return conv_transpose1d_op(x, weight, bias, stride, trim_left, trim_right,
                               None if elu_alpha is None else float(elu_alpha))
