"""`fastcodec selftest`: the case lines and the exit status, on a tiny subset (the full run is a user command)."""
from __future__ import annotations

import pytest

from fastcodec import cli, selftest
from tests.utils import requires_cuda


def test_selftest_quick_subset(capsys):
    rc = cli.main(["selftest", "--quick", "--only", "rvq_decode,conv1d (strided),RVQ training step"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = [ln for ln in out.splitlines() if ln.startswith(("ok", "FAIL"))]
    assert len(lines) == 3 and all(ln.startswith("ok") and "<= tol" in ln for ln in lines), out
    assert "3/3 passed" in out


def test_selftest_reports_a_failure(monkeypatch, capsys):
    monkeypatch.setattr(selftest, "_float_case", lambda got, r32, r64: (1.0, 0.5, "forced"))
    rc = cli.main(["selftest", "--quick", "--only", "rvq_decode"])
    out = capsys.readouterr().out
    assert rc == 1 and "FAIL rvq_decode" in out and "FAILED: rvq_decode" in out


def test_selftest_bad_arguments(capsys):
    assert cli.main(["selftest", "--only", "nope"]) == 2
    assert "no such case" in capsys.readouterr().err
    assert set(selftest.case_names()) >= {"rvq_encode", "SEANetEncoder", "RVQ training step"}


@pytest.mark.cuda
@requires_cuda
def test_selftest_on_cuda(capsys):
    """The user's first GPU command: every case within its tolerance on the real device."""
    rc = cli.main(["selftest", "--device", "cuda"])
    out = capsys.readouterr().out
    assert rc == 0, out
