"""``fastcodec.SEANetEncoder`` / ``SEANetDecoder``: the drop-in, fast SEANet.

Same arguments, attributes and ``state_dict`` as audiocraft's (they subclass our reference). The
forward walks a plan compiled once from ``self.model``: each ``ELU -> StreamableConv1d`` pair becomes
one ``fastcodec::conv1d`` call (padding and ELU inside the kernel, no padded copy), each residual
block's last conv adds the shortcut in its epilogue, and each ``ELU -> StreamableConvTranspose1d``
becomes one ``fastcodec::conv_transpose1d`` call (trim included). The LSTM runs through
``fastcodec::lstm`` (the fused C++ LSTM of ``ops/lstm.py`` on CPU float32 with the ``cpp`` conv backend,
else ATen's, behind an opaque op, so ``torch.compile(fullgraph=True)`` traces the whole module).
Weight-norm weights are folded once per parameter change. Other activations,
norms (time_group_norm) and modules run as they are. ``FASTCODEC_BACKEND=reference`` (or
``FASTCODEC_CONV_BACKEND``) runs the reference forward.
"""
from __future__ import annotations

import typing as tp
import warnings

import torch
from torch import nn

from . import _backend, _hooks, _pool
from .ops import conv as conv_ops
from .ops import lstm as lstm_ops
from .reference import seanet as ref_seanet
from .reference.conv import StreamableConv1d, StreamableConvTranspose1d, get_extra_padding_for_conv1d
from .reference.lstm import StreamableLSTM
from .streaming import StreamingMixin


# ---------------------------------------------------------------------------------------------
# fastcodec::lstm: ATen's multi-layer LSTM as an opaque op (dynamo cannot trace nn.LSTM)
# ---------------------------------------------------------------------------------------------


def _lstm_impl(x: torch.Tensor, weights: list[torch.Tensor], num_layers: int) -> torch.Tensor:
    # x: (T, B, C) time-major; weights: [w_ih, w_hh, b_ih, b_hh] per layer
    h0 = x.new_zeros(num_layers, x.shape[1], weights[1].shape[1])
    out = torch._VF.lstm(x, (h0, h0), weights, True, num_layers, 0.0, False, False, False)
    return out[0]


@torch.library.custom_op("fastcodec::lstm", mutates_args=())
def lstm_op(x: torch.Tensor, weights: list[torch.Tensor], num_layers: int) -> torch.Tensor:
    """Multi-layer unidirectional LSTM from zero state. x: (T, B, C) -> (T, B, hidden)."""
    lstm_ops.check_lstm_args(x, weights, num_layers)
    if lstm_ops.use_cpp(x):  # the fused C++ LSTM (forward only; the backward recomputes with ATen)
        return lstm_ops.lstm_cpu(x, weights, num_layers)
    return _lstm_impl(x, weights, num_layers).clone()


@lstm_op.register_fake
def _(x, weights, num_layers):
    lstm_ops.check_lstm_args(x, weights, num_layers)
    return x.new_empty((x.shape[0], x.shape[1], weights[1].shape[1]))


def _lstm_setup(ctx, inputs, output):
    x, weights, num_layers = inputs
    ctx.save_for_backward(x, *weights)
    ctx.num_layers = num_layers


@torch.library.custom_op("fastcodec::lstm_backward", mutates_args=())
def lstm_backward_op(grad: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor],
                     num_layers: int) -> list[torch.Tensor]:
    """Gradients [dx, *dweights] of ``lstm_op`` by recomputing ATen's LSTM (an opaque op, so that
    AOTAutograd traces the backward graph instead of an autograd.grad call inside it)."""
    # recompute (the forward kept no graph); torch.func.vjp, since an op body runs below autograd.
    # oneDNN's LSTM (ATen's CPU default) returns a workspace that vjp cannot carry: the native kernel here
    # (torch.backends.mkldnn.flags would also warn about TF32 on every call)
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        _, vjp = torch.func.vjp(lambda xs, ws: _lstm_impl(xs, ws, num_layers), x, list(weights))
        gx, gws = vjp(grad)
    finally:
        torch._C._set_mkldnn_enabled(enabled)
    return [gx, *gws]


@lstm_backward_op.register_fake
def _(grad, x, weights, num_layers):
    return [torch.empty_like(x)] + [torch.empty_like(w) for w in weights]


def _lstm_backward(ctx, grad):
    x, *weights = ctx.saved_tensors
    gx, *gws = lstm_backward_op(grad.contiguous(), x, weights, ctx.num_layers)
    return (gx if x.requires_grad else None), [g if w.requires_grad else None for g, w in zip(gws, weights)], None


lstm_op.register_autograd(_lstm_backward, setup_context=_lstm_setup)


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------


def _weight(conv: nn.Module) -> torch.Tensor:
    params = conv._parameters
    if "weight_v" in params:
        if torch.compiler.is_compiling():
            return torch._weight_norm(params["weight_v"], params["weight_g"], 0)
        return conv_ops.weight_norm_weight(params["weight_v"], params["weight_g"])
    return conv.weight


def _elu_alpha(act: nn.Module | None) -> float | None:
    return float(act.alpha) if isinstance(act, nn.ELU) and not act.inplace else None


class _ConvStep:
    """[activation ->] StreamableConv1d [-> norm] [+ skip]."""

    def __init__(self, module: StreamableConv1d, act: nn.Module | None):
        self.module = module
        self.conv = module.conv.conv
        self.norm = module.conv.norm
        self.alpha = _elu_alpha(act)
        self.act = act if (act is not None and self.alpha is None) else None
        self.fuse_skip = isinstance(self.norm, nn.Identity)
        k = (self.conv.kernel_size[0] - 1) * self.conv.dilation[0] + 1
        self.stride, self.dilation = self.conv.stride[0], self.conv.dilation[0]
        self.span, self.padding_total = k, k - self.stride
        if self.conv.groups != 1:
            raise NotImplementedError("grouped convs are not part of SEANet")

    def __call__(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        extra = get_extra_padding_for_conv1d(x, self.span, self.stride, self.padding_total)
        if self.module.causal:
            left, right = self.padding_total, extra
        else:
            right = self.padding_total // 2
            left, right = self.padding_total - right, right + extra
        fused_skip = skip if self.fuse_skip else None
        y = conv_ops.conv1d(x, _weight(self.conv), self.conv.bias, fused_skip, self.stride, self.dilation,
                            left, right, self.module.pad_mode, self.alpha)
        y = self.norm(y)
        if skip is not None and fused_skip is None:
            y = y + skip
        return y


class _ConvTrStep:
    """[activation ->] StreamableConvTranspose1d [-> norm] -> trim."""

    def __init__(self, module: StreamableConvTranspose1d, act: nn.Module | None):
        self.convtr = module.convtr.convtr
        self.norm = module.convtr.norm
        self.alpha = _elu_alpha(act)
        self.act = act if (act is not None and self.alpha is None) else None
        k, s = self.convtr.kernel_size[0], self.convtr.stride[0]
        self.stride = s
        self.trim = conv_ops.streamable_trim(k, s, module.causal, module.trim_right_ratio)
        if self.convtr.groups != 1 or self.convtr.dilation[0] != 1 or self.convtr.output_padding[0] != 0:
            raise NotImplementedError("SEANet's transposed convs have groups 1, dilation 1, no output_padding")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        if isinstance(self.norm, nn.Identity):
            return conv_ops.conv_transpose1d(x, _weight(self.convtr), self.convtr.bias, self.stride,
                                             self.trim[0], self.trim[1], self.alpha)
        # audiocraft normalises before trimming (time_group_norm statistics include the trimmed edges)
        y = self.norm(conv_ops.conv_transpose1d(x, _weight(self.convtr), self.convtr.bias, self.stride,
                                                0, 0, self.alpha))
        return y[..., self.trim[0]: y.shape[-1] - self.trim[1]]


# blocks of at least this many samples run fused (csrc resblock); shorter ones as three conv1d calls. The
# 24 kHz models' shortest block (256 channels, 6000 frames per 10 s) measured 12.5 ms fused vs 14.6 ms.
_RES_FUSED_MIN = 1024
# frames per tile of the fused block (csrc resblock); 0: chosen in C++ from the channel count (L2 budget)
_RES_TILE_FRAMES = 0


class _ResStep:
    """SEANetResnetBlock: shortcut(x) + block(x), the add fused into the block's last conv.

    Inference on long CPU signals runs the whole block in one C++ call (``_tiled``, csrc ``resblock``): one
    parallel region over (batch, time tile) items, each thread running conv0 (with the halo and padding), the
    shortcut and conv1 (+ the add) of its tile with private buffers that stay in its L2. At 32-64 channels the
    k=1 convs are bound by memory traffic when run layer by layer (the 24 kHz encoder's first block moved
    ~180 MB for 1.5 GFLOP). Each output sample is the same sum in the same order either way: bitwise equal."""

    def __init__(self, block: ref_seanet.SEANetResnetBlock):
        mods = list(block.block)
        self.steps = [_ConvStep(mods[i + 1], mods[i]) for i in range(0, len(mods), 2)]
        sc = block.shortcut
        self.shortcut = None if isinstance(sc, nn.Identity) else _ConvStep(sc, None)
        s0, s1 = self.steps[0], self.steps[-1]
        convs = self.steps + ([self.shortcut] if self.shortcut else [])
        self.tileable = (len(self.steps) == 2 and all(s.act is None and isinstance(s.norm, nn.Identity)
                                                      and s.stride == 1 for s in convs)
                         and s1.span == 1 and (self.shortcut is None or self.shortcut.span == 1)
                         and s0.module.pad_mode in conv_ops._PAD_CODE)

    def _can_tile(self, x: torch.Tensor) -> bool:
        if not self.tileable or torch.compiler.is_compiling() or x.shape[-1] < _RES_FUSED_MIN:
            return False
        if x.device.type != "cpu" or x.dtype != torch.float32 or _backend.choose("conv", x.device) != "cpp":
            return False
        if torch.is_grad_enabled():
            convs = [s.conv for s in self.steps] + ([self.shortcut.conv] if self.shortcut else [])
            if x.requires_grad or any(p.requires_grad for c in convs for p in c.parameters()):
                return False
        return True

    def _tiled(self, x: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """x: (B, C, T) -> (B, C_out, T); ``tile``: frames per tile (default ``_RES_TILE_FRAMES``)."""
        s0, s1, sc = self.steps[0], self.steps[1], self.shortcut
        if s0.module.causal:
            left, right = s0.padding_total, 0
        else:
            right = s0.padding_total // 2
            left = s0.padding_total - right
        w0, w1 = conv_ops._packed_weight(_weight(s0.conv)), conv_ops._packed_weight(_weight(s1.conv))
        wsc = conv_ops._packed_weight(_weight(sc.conv)) if sc else None
        out = _pool.empty((x.shape[0], s1.conv.out_channels, x.shape[-1]), x)
        conv_ops._cpu_ext().resblock(
            x, w0, s0.conv.bias, w1, s1.conv.bias, wsc, sc.conv.bias if sc else None, out, s0.conv.out_channels,
            s0.conv.kernel_size[0], s0.dilation, left, right, conv_ops._PAD_CODE[s0.module.pad_mode], s0.alpha,
            s1.alpha, _RES_TILE_FRAMES if tile is None else tile)
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._can_tile(x):
            return self._tiled(x)
        skip = x if self.shortcut is None else self.shortcut(x)
        h = x
        for step in self.steps[:-1]:
            h = step(h)
        return self.steps[-1](h, skip)


class _LSTMStep:
    def __init__(self, module: StreamableLSTM):
        lstm = module.lstm
        if lstm.bidirectional or not lstm.bias or lstm.batch_first or lstm.proj_size:
            raise NotImplementedError("SEANet's LSTM is unidirectional, with biases, time-major")
        # the parameter dict, read at every call (load_state_dict(assign=True) puts new Parameter objects in
        # it), not the nn.LSTM: dynamo refuses to trace any access to an nn.LSTM module
        self.params = lstm._parameters
        self.names = list(lstm._flat_weights_names)
        self.num_layers = lstm.num_layers
        self.skip = module.skip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xt = x.permute(2, 0, 1)
        y = lstm_op(xt.contiguous(), [self.params[n] for n in self.names], self.num_layers)
        if self.skip:
            y = y + xt
        return y.permute(1, 2, 0)


def compile_plan(model: nn.Sequential) -> list[tp.Callable[[torch.Tensor], torch.Tensor]]:
    """The fused steps of a SEANet ``model`` Sequential (activations merged into the next conv)."""
    mods = list(model)
    plan: list = []
    i = 0
    while i < len(mods):
        m = mods[i]
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if not isinstance(m, (StreamableConv1d, StreamableConvTranspose1d, ref_seanet.SEANetResnetBlock,
                              StreamableLSTM)) and isinstance(nxt, (StreamableConv1d, StreamableConvTranspose1d)):
            plan.append(_ConvStep(nxt, m) if isinstance(nxt, StreamableConv1d) else _ConvTrStep(nxt, m))
            i += 2
            continue
        if isinstance(m, StreamableConv1d):
            plan.append(_ConvStep(m, None))
        elif isinstance(m, StreamableConvTranspose1d):
            plan.append(_ConvTrStep(m, None))
        elif isinstance(m, ref_seanet.SEANetResnetBlock):
            plan.append(_ResStep(m))
        elif isinstance(m, StreamableLSTM):
            plan.append(_LSTMStep(m))
        else:
            plan.append(m)
        i += 1
    return plan


# per-module attributes that are derived or per-thread, never copied or pickled (rebuilt on use)
_TRANSIENT = ("_plan", "_activation_pool_obj", "_fastcodec_streaming")
_warned_dtypes: set = set()


class _FastSEANet:
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fast_plan()  # built eagerly: a plan built inside torch.compile would trace nn.LSTM

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in _TRANSIENT}

    def __setstate__(self, state):
        super().__setstate__(state)
        self._fast_plan()

    def _fast_plan(self) -> list:
        plan = self.__dict__.get("_plan")
        if plan is None:
            plan = compile_plan(self.model)
            self.__dict__["_plan"] = plan
        return plan

    def _use_reference(self, x: torch.Tensor) -> bool:
        if torch.compiler.is_compiling():
            return False
        if _backend.choose("conv", x.device) == "reference" or _hooks.has_inner_hooks(self):
            return True
        if x.dtype != torch.float32:
            if x.is_floating_point() and x.dtype not in _warned_dtypes:  # others: the reference raises
                _warned_dtypes.add(x.dtype)
                warnings.warn(f"fastcodec: the SEANet kernels are float32-only; {x.dtype} input runs the "
                              "reference code", RuntimeWarning, stacklevel=4)
            return True
        return False

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
        if self._use_reference(x) if isinstance(x, torch.Tensor) else True:
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
