"""The lazy C++ build: recovers from a builder killed with SIGKILL, shares one build between checkouts
with the same sources, and says once on stderr when it compiles. A tiny Python-C-API extension stands in
for the real ones so each build takes about a second."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fastcodec import _build

ROOT = Path(__file__).resolve().parent.parent
ANNOUNCE = "fastcodec: building the C++ extension"

TINY_CPP = r"""
#include <Python.h>
#include "tiny.h"
static PyObject* answer(PyObject*, PyObject*) { return PyLong_FromLong(TINY_ANSWER); }
static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, nullptr}, {nullptr, nullptr, 0, nullptr}};
static PyModuleDef def = {PyModuleDef_HEAD_INIT, "fastcodec_@NAME@", nullptr, -1, methods};
PyMODINIT_FUNC PyInit_fastcodec_@NAME@(void) { return PyModule_Create(&def); }
"""

# a second process: point the builder at the tiny sources (argv[1]) and load extension argv[2]
RUN = """
import sys
from pathlib import Path
from fastcodec import _build
_build.CSRC = Path(sys.argv[1])
print("answer", _build.load_extension(sys.argv[2], ["tiny.cpp"]).answer(), flush=True)
"""

def _tiny_sources(csrc: Path, name: str) -> Path:
    csrc.mkdir(parents=True)
    (csrc / "tiny.cpp").write_text(TINY_CPP.replace("@NAME@", name))
    (csrc / "tiny.h").write_text("#define TINY_ANSWER 42\n")  # must be found through the include path
    return csrc


def _spawn(csrc: Path, name: str, cache: Path, **kw):
    env = dict(os.environ, FASTCODEC_CACHE=str(cache), PYTHONPATH=str(ROOT))
    env.pop("FASTCODEC_VERBOSE_BUILD", None)
    return [sys.executable, "-c", RUN, str(csrc), name], dict(env=env, cwd=ROOT, text=True, **kw)


def _run(csrc: Path, name: str, cache: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd, kw = _spawn(csrc, name, cache, capture_output=True)
    return subprocess.run(cmd, timeout=timeout, **kw)


def _load_here(monkeypatch, csrc: Path, name: str, cache: Path):
    monkeypatch.setenv("FASTCODEC_CACHE", str(cache))
    monkeypatch.setattr(_build, "CSRC", csrc)
    monkeypatch.setattr(_build, "_loaded", {})
    monkeypatch.setattr(_build, "_failed", {})
    return _build.load_extension(name, ["tiny.cpp"])


def _library(cache: Path, name: str) -> Path:
    (so,) = cache.glob(f"*/{name}-*/fastcodec_{name}.so")
    return so


def test_build_killed_with_sigkill_does_not_hang_the_next_one(tmp_path):
    csrc = _tiny_sources(tmp_path / "csrc", "killed")
    cache = tmp_path / "cache"
    cmd, kw = _spawn(csrc, "killed", cache, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    builder = subprocess.Popen(cmd, **kw)
    try:
        deadline = time.monotonic() + 90
        while not (batons := list(cache.glob("*/killed-*/lock"))):
            assert builder.poll() is None, "the builder finished before its lock file was seen"
            assert time.monotonic() < deadline, "the builder never took torch's lock"
            time.sleep(0.005)
    finally:
        os.kill(builder.pid, signal.SIGKILL)
        builder.wait()
    assert batons[0].exists()  # the killed builder left torch's baton behind

    t0 = time.monotonic()
    r = _run(csrc, "killed", cache, timeout=90)  # today's torch baton would wait forever here
    assert r.returncode == 0, r.stderr
    assert "answer 42" in r.stdout
    assert "stale build lock" in r.stderr
    assert not batons[0].exists()
    print(f"recovered in {time.monotonic() - t0:.1f} s")


def test_two_checkouts_with_the_same_sources_share_one_build(tmp_path, monkeypatch):
    a = _tiny_sources(tmp_path / "checkout_a" / "csrc", "shared")
    b = _tiny_sources(tmp_path / "checkout_b" / "csrc", "shared")
    cache = tmp_path / "cache"
    assert _load_here(monkeypatch, a, "shared", cache).answer() == 42
    so = _library(cache, "shared")
    built = so.stat().st_mtime_ns
    log = (so.parent / ".ninja_log").read_text()

    r = _run(b, "shared", cache)  # the other checkout, in its own process
    assert r.returncode == 0, r.stderr
    assert "answer 42" in r.stdout
    assert _library(cache, "shared") == so
    assert so.stat().st_mtime_ns == built, "the second checkout rebuilt the extension"
    assert (so.parent / ".ninja_log").read_text() == log, "ninja ran a compiler for the second checkout"
    assert ANNOUNCE not in r.stderr
    ninja = (so.parent / "build.ninja").read_text()
    assert str(a) not in ninja and str(b) not in ninja  # sources and include path point into the copy
    assert f"-I{so.parent / 'src'}" in ninja


def test_a_compile_is_announced_once_and_a_cached_load_is_silent(tmp_path, monkeypatch, capfd):
    csrc = _tiny_sources(tmp_path / "csrc", "announce")
    cache = tmp_path / "cache"
    assert _load_here(monkeypatch, csrc, "announce", cache).answer() == 42
    err = capfd.readouterr().err
    assert err.count(ANNOUNCE) == 1, err
    assert "'announce'" in err and str(_library(cache, "announce").parent) in err
    assert _build.load_extension("announce", ["tiny.cpp"]).answer() == 42  # loaded: nothing more to say
    assert ANNOUNCE not in capfd.readouterr().err

    r = _run(csrc, "announce", cache)  # a new process finds the cached build
    assert r.returncode == 0, r.stderr
    assert "answer 42" in r.stdout
    assert ANNOUNCE not in r.stderr
