"""Lazy, cached, process-safe JIT builds of the C++/CUDA extensions in ``csrc/``.

Extensions are built on first use (never at import) with ninja through
``torch.utils.cpp_extension.load`` into a directory keyed by the fastcodec version, the torch
version, the Python version, the toolchain paths ninja sees and a hash of the sources' content and
flags, so a changed source or a new torch never picks up a stale binary. The sources and headers
are copied into that directory and compiled from there, so every checkout with the same sources
hands ninja identical paths and reuses one build. An ``fcntl`` lock around the build keeps
parallel processes (pytest-xdist, several jobs) from corrupting it; unlike torch's own ``lock``
baton it is released by the kernel if a builder dies, and holding it proves any leftover baton
stale, so a build killed with SIGKILL never makes later processes wait forever.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import sysconfig
import threading
import time
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
HEADER_GLOBS = ("*.h", "*.hpp", "*.cuh")
# bump when the build directory's layout changes, so old and new layouts never share a directory
_LAYOUT = "src-copy-1"
# how long to wait for a compiler orphaned by a killed builder before giving up with a clear error
ORPHAN_WAIT_S = 600.0


# name -> (sources in csrc/, extra cflags). Built lazily by ``load_named``; ``fastcodec._backend`` probes them.
CPP_EXTENSIONS: dict[str, tuple[list[str], list[str]]] = {
    "rvq_cpu": (["rvq_cpu.cpp"], []),
    "conv_cpu": (["conv1d_cpu.cpp"], []),
    "lstm_cpu": (["lstm_cpu.cpp"], []),
    "stream_cpu": (["stream_cpu.cpp"], []),
}


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


def _toolchain_signature() -> str:
    from torch.utils import cpp_extension

    # these paths go into build.ninja: two torch installs sharing one directory would recompile each other
    parts = cpp_extension.include_paths() + cpp_extension.library_paths()
    parts += [sysconfig.get_path("include") or "", cpp_extension.get_cxx_compiler()]
    return "\n".join(parts)


def _read_inputs(csrc: Path, sources: list[str]) -> dict[str, bytes]:
    """``{path relative to csrc: content}`` of the sources and every header next to them."""
    files: dict[str, bytes] = {}
    for s in sources:
        if Path(s).is_absolute() or ".." in Path(s).parts:
            raise ValueError(f"source {s!r} must be a path inside {csrc}")
        files[s] = (csrc / s).read_bytes()
    for pattern in HEADER_GLOBS:
        for hdr in csrc.glob(pattern):
            files.setdefault(hdr.name, hdr.read_bytes())
    return files


def _build_dir(name: str, files: dict[str, bytes], cflags: list[str], ldflags: list[str]) -> Path:
    h = hashlib.sha256(_LAYOUT.encode())
    for rel in sorted(files):
        h.update(b"\0%s\0%d\0" % (rel.encode(), len(files[rel])))
        h.update(files[rel])
    h.update("\0".join(cflags + ["--"] + ldflags).encode())
    h.update(_cpu_signature().encode())  # -march=native: a binary built on one CPU may not run on another
    h.update(_toolchain_signature().encode())
    tag = f"fastcodec{__version__}-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
    return cache_root() / tag / f"{name}-{h.hexdigest()[:16]}"


def _stage_sources(srcdir: Path, files: dict[str, bytes]) -> None:
    """Copy the inputs into the build directory; call under the build lock."""
    for rel, data in files.items():
        dst = srcdir / rel
        try:
            if dst.read_bytes() == data:
                continue  # untouched, so its mtime does not make ninja recompile
        except OSError:
            pass
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dst)  # atomic: a builder killed mid-copy never leaves a truncated source


def _processes_in(bdir: Path) -> list[int]:
    """Pids (not ours) whose working directory is ``bdir``: ninja and the compilers it runs."""
    target = os.path.realpath(bdir)
    pids = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if os.readlink(f"/proc/{entry}/cwd") == target:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _clear_stale_baton(bdir: Path) -> None:
    """Remove torch's ``lock`` baton left by a killed builder; call under the build lock."""
    baton = bdir / "lock"
    if not baton.exists():
        return
    # every fastcodec builder takes our flock before torch's baton, so holding the flock proves it stale
    orphans = _processes_in(bdir)
    if orphans:
        print(f"fastcodec: waiting for the compiler left running by a killed build in {bdir} "
              f"(pids {orphans})", file=sys.stderr, flush=True)
        deadline = time.monotonic() + ORPHAN_WAIT_S
        while orphans:
            if time.monotonic() > deadline:
                raise ExtensionBuildError(
                    f"fastcodec: processes {orphans} left by a killed build still run in {bdir} after "
                    f"{ORPHAN_WAIT_S:.0f} s. Fix: end them (kill {' '.join(map(str, orphans))}) or remove {bdir}."
                )
            time.sleep(0.2)
            orphans = _processes_in(bdir)
    baton.unlink(missing_ok=True)
    print(f"fastcodec: removed the stale build lock {baton} left by a killed build", file=sys.stderr, flush=True)


def _needs_compile(bdir: Path, module: str) -> bool:
    """Whether loading will compile: the library is missing or ninja has work to do."""
    from torch.utils import cpp_extension

    if not (bdir / f"{module}{cpp_extension.LIB_EXT}").is_file() or not (bdir / "build.ninja").is_file():
        return True
    try:
        r = subprocess.run(["ninja", "-n", "-C", str(bdir)], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return True  # torch will fail to build without ninja and say so
    return r.returncode != 0 or "no work to do" not in r.stdout


def _lock_exclusive(lock, name: str, bdir: Path) -> None:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"fastcodec: waiting for another process building the C++ extension {name!r} in {bdir}",
              file=sys.stderr, flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)


SANITIZERS = ("address", "undefined")


def sanitize_flags() -> tuple[list[str], list[str]]:
    """(cflags, ldflags) for ``FASTCODEC_SANITIZE`` (e.g. ``address,undefined``): ASan/UBSan builds of the C++
    extensions, for the bad-input and fuzz suites (docs/reliability.md has the command: python is not instrumented,
    so ASan's runtime and libstdc++ must be preloaded with ``LD_PRELOAD``)."""
    want = [s.strip() for s in os.environ.get("FASTCODEC_SANITIZE", "").split(",") if s.strip()]
    bad = [s for s in want if s not in SANITIZERS]
    if bad:
        raise ValueError(f"FASTCODEC_SANITIZE: unknown sanitizer(s) {bad}; use a comma list of {SANITIZERS}")
    if not want:
        return [], []
    san = "-fsanitize=" + ",".join(sorted(set(want)))
    # -O1 -g: readable reports; no recovery, so any UBSan finding aborts the run instead of scrolling past
    cflags = [san, "-fno-omit-frame-pointer", "-g", "-O1"]
    if "undefined" in want:
        cflags.append("-fno-sanitize-recover=undefined")
    return cflags, [san]


def load_extension(
    name: str,
    sources: list[str],
    extra_cflags: list[str] | None = None,
    extra_ldflags: list[str] | None = None,
    verbose: bool | None = None,
    *,
    prebuild: bool = False,
) -> ModuleType:
    """Build (once, cached on disk) and import the C++ extension ``name`` made of ``csrc/<sources>``.

    Raises ``ExtensionBuildError`` with the compiler's reason and the fix when the build fails.
    A failure is remembered for the life of the process, so callers can probe cheaply.
    ``prebuild`` only changes the wording of the one-line notice printed before a compile.
    """
    with _mutex:
        if name in _loaded:
            return _loaded[name]
        if name in _failed:
            raise ExtensionBuildError(_failed[name])
        csrc = CSRC
        missing = [str(csrc / s) for s in sources if not (csrc / s).is_file()]
        if missing:
            _failed[name] = f"fastcodec extension {name!r}: source files missing: {missing}"
            raise ExtensionBuildError(_failed[name])
        cflags = DEFAULT_CFLAGS + list(extra_cflags or [])
        ldflags = DEFAULT_LDFLAGS + list(extra_ldflags or [])
        try:
            san_c, san_l = sanitize_flags()
        except ValueError as e:
            _failed[name] = str(e)
            raise ExtensionBuildError(str(e)) from e
        cflags, ldflags = cflags + san_c, ldflags + san_l  # part of the build key: a distinct build directory
        bdir = Path()
        if verbose is None:
            verbose = os.environ.get("FASTCODEC_VERBOSE_BUILD", "") == "1"
        try:
            from torch.utils import cpp_extension

            files = _read_inputs(csrc, sources)
            bdir = _build_dir(name, files, cflags, ldflags)
            srcdir = bdir / "src"
            bdir.mkdir(parents=True, exist_ok=True)
            module = f"fastcodec_{name}"
            with open(bdir / ".fastcodec-build.lock", "w") as lock:
                _lock_exclusive(lock, name, bdir)
                try:
                    _clear_stale_baton(bdir)
                    _stage_sources(srcdir, files)
                    if _needs_compile(bdir, module):
                        when = "`fastcodec build`" if prebuild else "first use"
                        hint = "" if prebuild else "; `fastcodec build` prebuilds"
                        print(f"fastcodec: building the C++ extension {name!r} ({when}, about a minute, longer "
                              f"on a busy machine; cached in {bdir}{hint})", file=sys.stderr, flush=True)
                    mod = cpp_extension.load(
                        name=module,
                        sources=[str(srcdir / s) for s in sources],
                        extra_cflags=cflags,
                        extra_ldflags=ldflags,
                        extra_include_paths=[str(srcdir)],
                        build_directory=str(bdir),
                        verbose=verbose,
                    )
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        except ExtensionBuildError as e:  # already says what to do
            _failed[name] = str(e)
            raise
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


def load_named(name: str, verbose: bool | None = None, *, prebuild: bool = False) -> ModuleType:
    """Build (once) and import the extension ``name`` listed in ``CPP_EXTENSIONS``."""
    sources, cflags = CPP_EXTENSIONS[name]
    return load_extension(name, sources, cflags, verbose=verbose, prebuild=prebuild)


def build_all(verbose: bool = False) -> dict[str, str]:
    """Build every C++ extension now (``fastcodec build``); returns ``{name: "ok" | reason}``."""
    out: dict[str, str] = {}
    for name in CPP_EXTENSIONS:
        try:
            load_named(name, verbose=verbose, prebuild=True)
            out[name] = "ok"
        except ExtensionBuildError as e:
            out[name] = str(e)
    return out
