"""Module hooks and the fused paths.

The fast modules run their inner layers as fused steps, without calling each submodule's ``__call__``, so a
hook registered on an inner module (or a global module hook) would silently never fire. Where audiocraft
would call it, the fast module instead runs the reference forward (every submodule through ``__call__``,
hooks fire as in audiocraft); streaming, which has no per-module calls, refuses with a clear error.
"""
from __future__ import annotations

from torch import nn
from torch.nn.modules import module as _M


def _global_hooks() -> bool:
    return bool(_M._global_forward_hooks or _M._global_forward_pre_hooks or _M._global_backward_hooks
                or _M._global_backward_pre_hooks)


def has_inner_hooks(module: nn.Module) -> bool:
    """Whether any submodule of ``module`` (not ``module`` itself) has call hooks, or global module hooks exist."""
    if _global_hooks():
        return True
    for m in module.modules():
        if m is not module and (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                                or m._backward_pre_hooks):
            return True
    return False
