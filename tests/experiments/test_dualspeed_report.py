"""The DualSpeed testbed report: speed-up at the same samples and full-token retention, against the baseline."""

import pytest

from experiments.dualspeed.report import main, rows, table


def _run(name: str, samples: int, train_s: float, full: float, pruned: float, fast: int, slow: int) -> dict:
    return {"run": name, "samples": samples, "train_s": train_s, "samples_per_s": samples / train_s, "full": full,
            "pruned": pruned, "fast_steps": fast, "slow_steps": slow}


RESULTS = {
    "settings": {"device": "cpu", "command": "python -m experiments.dualspeed.testbed --out OUT"},
    "runs": [_run("baseline", 1000, 10.0, 0.90, 0.90, 0, 10), _run("naive p=0.9", 1000, 4.0, 0.85, 0.80, 10, 0),
             _run("dualspeed p=0.9 r=0.1", 500, 2.5, 0.891, 0.82, 9, 1)],
}


def test_speed_up_is_at_the_same_samples_and_retention_is_of_the_baseline_full_token_accuracy():
    baseline, naive, dual = rows(RESULTS)
    assert baseline["speedup"] == 1.0 and baseline["retention"] == 1.0
    assert naive["speedup"] == pytest.approx(2.5) and naive["retention"] == pytest.approx(0.85 / 0.90)
    assert dual["speedup"] == pytest.approx(10.0 / 2.5 * 500 / 1000)  # half the samples in a quarter of the time: 2x
    assert dual["retention"] == pytest.approx(0.99)
    assert "| dualspeed p=0.9 r=0.1 | 9 / 1 | 500 | 2.50 | 200 | 2.00x | 89.1 | 99.0 | 82.0 |" in table(RESULTS)


def test_the_report_writes_its_table_and_plot_and_needs_the_baseline_first(tmp_path):
    import json

    path = tmp_path / "results.json"
    path.write_text(json.dumps(RESULTS))
    assert main(["--results", str(path), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "speedup_vs_retention.png").stat().st_size > 10_000
    assert "| naive p=0.9 | 10 / 0 |" in (tmp_path / "report" / "results.md").read_text()
    with pytest.raises(ValueError, match="baseline"):
        rows({**RESULTS, "runs": RESULTS["runs"][1:]})
