"""Import the oracles (audiocraft 1.3.0 / encodec 0.1.1 submodules) without their heavy package __init__s.

Used by the tests (``tests/conftest.py``) and by ``fastcodec bench``. The oracles are installed
``--no-deps``: their top-level packages import transformers, torchaudio, xformers... that the
submodules we compare against never need.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Callable


class OracleUnavailable(ImportError):
    """The oracle package is not installed; the message says which and how to get it."""


def _stub_flashy() -> None:
    # audiocraft.quantization.core_vq imports flashy only for flashy.distrib.broadcast_tensors, which is a
    # no-op outside distributed runs; flashy itself pulls dora/submitit. Stub exactly that function.
    if "flashy" in sys.modules:
        return
    try:
        importlib.import_module("flashy")
        return
    except Exception:
        pass
    flashy = types.ModuleType("flashy")
    distrib = types.ModuleType("flashy.distrib")
    distrib.broadcast_tensors = lambda tensors, src=0: None
    flashy.distrib = distrib
    sys.modules["flashy"] = flashy
    sys.modules["flashy.distrib"] = distrib


def import_oracle(name: str, on_missing: Callable[[str], object] | None = None):
    """Import an audiocraft/encodec submodule without running its packages' __init__ (heavy deps).

    Every parent package of ``name`` is registered as a bare package module (path only), so
    ``import_oracle("audiocraft.modules.seanet")`` executes seanet.py and what it imports, nothing else.
    If a parent package is not installed, ``on_missing(message)`` is called (the tests pass
    ``pytest.skip``); without it ``OracleUnavailable`` is raised.
    """
    _stub_flashy()
    parts = name.split(".")
    for i in range(1, len(parts)):
        pkg = ".".join(parts[:i])
        if pkg in sys.modules:
            continue
        if i > 1:
            try:  # light sub-package __init__ (encodec.modules) imports for real; heavy ones are bared
                importlib.import_module(pkg)
                continue
            except Exception:
                sys.modules.pop(pkg, None)
        spec = importlib.util.find_spec(pkg)
        if spec is None or spec.submodule_search_locations is None:
            msg = f"{pkg} is not installed (bash scripts/run.sh setup installs it)"
            if on_missing is not None:
                on_missing(msg)
            raise OracleUnavailable(msg)
        mod = types.ModuleType(pkg)
        mod.__path__ = list(spec.submodule_search_locations)
        mod.__file__ = spec.origin
        mod.__package__ = pkg
        sys.modules[pkg] = mod
        if i > 1:
            setattr(sys.modules[".".join(parts[: i - 1])], parts[i - 1], mod)
    return importlib.import_module(name)
