"""Lazy, cached, process-safe JIT builds of the C++/CUDA extensions in ``csrc/``.

Extensions are built on first use (never at import) with ninja through
``torch.utils.cpp_extension.load`` into a directory keyed by the fastcodec version, the torch
version, the Python version and a hash of the sources and flags, so a changed source or a new
torch never picks up a stale binary. An ``fcntl`` lock around the build keeps parallel processes
(pytest-xdist, several jobs) from corrupting it; unlike torch's own lock file, it is released by
the kernel if a builder dies.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

from . import __version__

CSRC = Path(__file__).resolve().parent.parent / "csrc"
if not CSRC.is_dir():  # installed (non-editable): csrc/ is shipped as package data fastcodec.csrc
    CSRC = Path(__file__).resolve().parent / "csrc"

_loaded: dict[str, ModuleType] = {}
_failed: dict[str, str] = {}
_mutex = threading.Lock()

DEFAULT_CFLAGS = ["-O3", "-std=c++17", "-fopenmp", "-march=native", "-ffp-contract=off"]
DEFAULT_LDFLAGS = ["-fopenmp"]


class ExtensionBuildError(RuntimeError):
    """A C++/CUDA extension could not be built or loaded; the message says why and how to fix it."""


def cache_root() -> Path:
    """Where built extensions live (``$FASTCODEC_CACHE`` or ``~/.cache/fastcodec``)."""
    root = os.environ.get("FASTCODEC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fastcodec"
    )
    return Path(root)


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return ""


def _build_dir(name: str, sources: list[Path], cflags: list[str], ldflags: list[str]) -> Path:
    h = hashlib.sha256()
    for p in sorted(sources):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    for hdr in sorted(CSRC.glob("*.h")):
        h.update(hdr.name.encode())
        h.update(hdr.read_bytes())
    h.update(" ".join(cflags + ldflags).encode())
    h.update(_cpu_signature().encode())  # -march=native: a binary built on one CPU may not run on another
    tag = f"fastcodec{__version__}-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
    return cache_root() / tag / f"{name}-{h.hexdigest()[:16]}"


def load_extension(
    name: str,
    sources: list[str],
    extra_cflags: list[str] | None = None,
    extra_ldflags: list[str] | None = None,
    verbose: bool | None = None,
) -> ModuleType:
    """Build (once, cached on disk) and import the C++ extension ``name`` made of ``csrc/<sources>``.

    Raises ``ExtensionBuildError`` with the compiler's reason and the fix when the build fails.
    A failure is remembered for the life of the process, so callers can probe cheaply.
    """
    with _mutex:
        if name in _loaded:
            return _loaded[name]
        if name in _failed:
            raise ExtensionBuildError(_failed[name])
        paths = [CSRC / s for s in sources]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            _failed[name] = f"fastcodec extension {name!r}: source files missing: {missing}"
            raise ExtensionBuildError(_failed[name])
        cflags = DEFAULT_CFLAGS + list(extra_cflags or [])
        ldflags = DEFAULT_LDFLAGS + list(extra_ldflags or [])
        bdir = _build_dir(name, paths, cflags, ldflags)
        bdir.mkdir(parents=True, exist_ok=True)
        if verbose is None:
            verbose = os.environ.get("FASTCODEC_VERBOSE_BUILD", "") == "1"
        try:
            from torch.utils import cpp_extension

            with open(bdir / ".fastcodec-build.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    mod = cpp_extension.load(
                        name=f"fastcodec_{name}",
                        sources=[str(p) for p in paths],
                        extra_cflags=cflags,
                        extra_ldflags=ldflags,
                        extra_include_paths=[str(CSRC)],
                        build_directory=str(bdir),
                        verbose=verbose,
                    )
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        except Exception as e:  # compiler errors, missing ninja/compiler, ABI mismatch on import
            msg = (
                f"fastcodec could not build its C++ extension {name!r} in {bdir}: "
                f"{type(e).__name__}: {str(e).strip()[-2000:]}\n"
                "Fix: make sure a C++17 compiler (g++ >= 9) and ninja are installed "
                "(`pip install ninja`), rerun with FASTCODEC_VERBOSE_BUILD=1 to see the full log, "
                "or set FASTCODEC_BACKEND=reference to use the PyTorch reference."
            )
            _failed[name] = msg
            raise ExtensionBuildError(msg) from e
        _loaded[name] = mod
        return mod


def load_named(name: str, verbose: bool | None = None) -> ModuleType:
    """Build (once) and import the extension ``name`` listed in ``_backend.CPP_EXTENSIONS``."""
    from . import _backend

    sources, cflags = _backend.CPP_EXTENSIONS[name]
    return load_extension(name, sources, cflags, verbose=verbose)


def build_all(verbose: bool = False) -> dict[str, str]:
    """Build every C++ extension now (``fastcodec build``); returns ``{name: "ok" | reason}``."""
    from . import _backend

    out: dict[str, str] = {}
    for name in _backend.CPP_EXTENSIONS:
        try:
            load_named(name, verbose=verbose)
            out[name] = "ok"
        except ExtensionBuildError as e:
            out[name] = str(e)
    return out
