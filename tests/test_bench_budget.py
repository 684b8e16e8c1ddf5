"""`fastcodec bench --device cuda --budget S`: the GPU suite's cases and the budget logic, checked on CPU
(the GPU run itself happens on a GPU)."""
from __future__ import annotations

import json

from fastcodec import cli


def test_gpu_suite_is_the_default_on_cuda(capsys):
    assert cli.main(["bench", "--device", "cuda", "--list"]) == 0
    out = capsys.readouterr().out.split("\n")
    rows = [ln.split() for ln in out if ln.strip()]
    assert rows[:3] == [["rvq_encode", "B32-T750-K32"], ["rvq_train", "B32-T750-K32"], ["rvq_decode", "B32-T750-K32"]]
    assert ["seanet_encoder", "24k-B32-1s"] in rows and ["seanet_decoder", "24k-B32-1s"] in rows


def test_budget_stops_starting_cases_and_the_json_says_so(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = cli.main(["bench", "--smoke", "--only", "rvq_decode", "--budget", "0.001", "--quiet", "--json", str(out)])
    assert rc == 0, capsys.readouterr()
    doc = json.loads(out.read_text())
    assert doc["budget_s"] == 0.001 and doc["not_run_budget"] == ["rvq_decode B1-T20-K2-bins64-D16"]
    assert doc["results"] == [] and doc["device_name"] and doc["peak_bandwidth_gbps"] is None
    assert "not run (--budget" in capsys.readouterr().out


def test_budget_must_be_positive(capsys):
    assert cli.main(["bench", "--budget", "0"]) == 2
    assert "seconds > 0" in capsys.readouterr().err
