"""Fixtures: the oracles (audiocraft 1.3.0 / encodec 0.1.1 submodules), seeds, NaN-poisoned empties."""
from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter; the flag is read when kernels are
# decorated, so it must be set before anything imports fastcodec.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastcodec._oracles import import_oracle as _import_oracle  # noqa: E402  (after TRITON_INTERPRET)


def import_oracle(name: str):
    """``fastcodec._oracles.import_oracle`` that fails the test when the oracle is not installed: the
    equivalence tests are the point of the suite, and `bash scripts/run.sh test` installs the oracles."""
    return _import_oracle(name, on_missing=pytest.fail)


@pytest.fixture
def oracle():
    return import_oracle


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a whole test module, the previous count restored after it; a module asks for it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``. For toy shapes: on a loaded 2-core machine a
    second OpenMP thread only spins, or an OpenMP barrier waits on a descheduled thread (measured 10-40x slower,
    e.g. 0.3 s of audio through the streaming encoder: 2.7 s with 2 threads, 0.065 s with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def nan_poison(monkeypatch):
    """Fill torch.empty/empty_like/new_empty allocations with NaN so reads of uninitialised memory show."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*a, **k):
        t = real_empty(*a, **k)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    def empty_like(*a, **k):
        t = real_empty_like(*a, **k)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    yield
