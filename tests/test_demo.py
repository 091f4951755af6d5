"""Smoke run of the real `make demo` script (scripts/demo.py) with a seconds-long budget and few episodes.

The demo's accuracy is measured by running it (docs/results.md); this checks its plumbing on the Omniglot
copy that ships in data_prep/demo: every step runs, both heads give a record per protocol with provenance,
the report is written, and the final table checks each head against the targets.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from s2m2.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_end_to_end_with_both_heads(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--out", str(out),
                           "--budget-minutes", "0.1", "--episodes", "10"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    summary = json.loads((out / "s2m2_r" / "summary.json").read_text())
    assert summary["stopped"] == "budget" and summary["budget_minutes"] == 0.1
    for head in ("logreg", "ncm"):
        record = json.loads((out / f"results_5way_1_5shot_{head}.json").read_text())
        assert record["head"]["name"] == head
        assert [(r["ways"], r["shots"], r["episodes"]) for r in record["results"]] == [(5, 1, 10), (5, 5, 10)]
        assert record["provenance"]["method"] == "s2m2_r"
        assert record["provenance"]["commands"]["train"].startswith("s2m2 train --config")
        twenty_five = json.loads((out / f"results_20way_5shot_{head}.json").read_text())["results"][0]
        assert twenty_five["episodes"] == (10 if head == "ncm" else 1)  # logreg 20w5s: 10 // 20, at least 1
    report = (out / "report.md").read_text()
    # The demo trains and tests at 20 px, not Omniglot's usual 28: every head's row must say so.
    test_size = load_config(REPO / "configs" / "omniglot" / "budget" / "s2m2_r.yaml").data.test_crop
    assert test_size != 28
    assert "| s2m2_r |" in report
    for head in ("logreg", "ncm"):
        assert f"| {head} (whole image at {test_size} px) |" in report
    # The closing table: one line per protocol, both heads, the target verdict per head.
    table = done.stdout[done.stdout.rindex("ways shots  logreg accuracy (%)"):]
    line_5w1s = next(line for line in table.splitlines() if line.split()[:2] == ["5", "1"])
    assert ">= 96: logreg " in line_5w1s and ", ncm " in line_5w1s
    assert len([line for line in table.splitlines()[1:] if line.strip()]) == 4
