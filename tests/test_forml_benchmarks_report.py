"""benchmarks/forml_benchmarks.py's report: the per-seed table lists the default runs, one row per (task, seed); the
ablation variants appear in their own table only (they once showed up there unlabelled, like repeated seeds)."""

from __future__ import annotations

from benchmarks.forml_benchmarks import METRICS, VARIANTS, summarise, write_markdown


def _run(seed: int, variant: str, tprd: float) -> dict:
    before = dict.fromkeys(METRICS, 0.5) | {"accuracy": 0.85, "tprd": 0.08}
    after = dict.fromkeys(METRICS, 0.5) | {"accuracy": 0.85, "tprd": tprd}
    return {"dataset": "adult", "seed": seed, "variant": variant, "before": before, "after": after,
            "fit_seconds": 1.0, "uniform_fit_seconds": 1.0, "n_train": 100}


def test_the_per_seed_table_lists_each_default_run_once(tmp_path):
    runs = [_run(s, "default", 0.05) for s in (0, 1)]
    runs += [_run(s, v, 0.11) for s in (0, 1) for v in VARIANTS]
    path = tmp_path / "forml.md"
    write_markdown(summarise(runs), runs, path, wall=1.0)
    text = path.read_text()
    per_seed = text.split("Per seed (test split):", 1)[1].split("\n\n", 2)[1]
    rows = [line for line in per_seed.splitlines() if line.startswith("| adult |")]
    assert rows == ["| adult | 0 | 85.00 | 85.00 | 8.00 | 5.00 |", "| adult | 1 | 85.00 | 85.00 | 8.00 | 5.00 |"]
    assert "11.00" in text  # the variants are still reported, in the ablation table
