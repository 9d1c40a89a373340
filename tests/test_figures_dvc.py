"""The figures through the real pipeline: a tiny figure setting run by scripts/demo (FIGURES=yes) in its own git
workspace, its report checked against the metrics files and scipy, and an experiment on one point's knob."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import scipy.stats

from tests.helpers import REPO, tiny_sections, write_params

pytestmark = pytest.mark.slow
PROJECTORS, LEVELS = ["no_projector", "linear"], ["levels_1", "levels_2"]  # pretrain.synthetic.simclr's: L 3, 10
TINY_FIGURES = tiny_sections() | {
    "experiment": {"variants": ["baseline"]},  # the demo sets dataset, method and seeds (SEEDS)
    "figures": {"bounds": {"points": PROJECTORS}, "ablations": {"points": LEVELS}},
}


def run(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    result = subprocess.run(
        args, cwd=cwd, env={**os.environ, **(env or {}), "PATH": path}, capture_output=True, text=True
    )
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """`scripts/demo` with FIGURES=yes SEEDS=0 from a copy of the repository holding the tiny figure setting."""
    root = tmp_path_factory.mktemp("figures")
    for name in ("pipeline", "stages", "references", "scripts", "plots"):
        shutil.copytree(REPO / name, root / "repo" / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / "repo" / name)
    write_params(root / "repo" / "params.yaml", **TINY_FIGURES)
    result = run(root / "repo", "scripts/demo", env={"DEMO_DIR": str(root / "demo"), "FIGURES": "yes", "SEEDS": "0"})
    output = result.stdout + result.stderr
    # launch ran the figures' cells beside the table's (and the untrained reference), then the report and audit
    points = [f"synthetic-simclr-{v}-0" for v in ["baseline", *PROJECTORS, *LEVELS]]
    assert f"6 of 6 cells to run: {' '.join(points)} untrained-synthetic-simclr-0" in output
    assert "audit: OK" in output
    return root / "demo"


def metrics(demo: Path, variant: str) -> tuple[dict, dict]:
    folder = "untrained" if variant == "untrained" else "linear_eval"
    name = "synthetic-simclr-seed0" if variant == "untrained" else f"synthetic-simclr-{variant}-seed0"
    evaluated = json.loads((demo / "metrics" / folder / f"{name}.json").read_text())
    pretrained = (
        json.loads((demo / "metrics" / "pretrain" / f"{name}.json").read_text()) if folder != "untrained" else {}
    )
    return pretrained, evaluated


def test_scatter_has_a_point_per_cell_and_the_coefficients_are_scipys(demo):
    bounds = json.loads((demo / "reports" / "results.json").read_text())["figures"]["bounds"]
    variants = ["baseline", *PROJECTORS, *LEVELS]  # the table's, its own, Fig. 4's (same setting and seed)
    assert [(p["variant"], p["seed"]) for p in bounds["points"]] == [(v, 0) for v in variants]
    for point in bounds["points"]:
        pretrained, evaluated = metrics(demo, point["variant"])
        assert point["lower_bound"] == pretrained["lower_bound"] and point["upper_bound"] == pretrained["upper_bound"]
        assert point["top1"] == 100 * evaluated["top1"] and point["knn_top1"] == 100 * evaluated["knn_top1"]
    assert {p["family"] for p in bounds["points"]} == {"MLP", "none", "linear", "MLP, quantized"}
    for row in [r for r in bounds["correlations"] if r["family"] == "all"]:
        x = [p[row["accuracy"]] for p in bounds["points"]]
        y = [p[row["bound"]] for p in bounds["points"]]
        # float64 sums of 5 products: their rounding is ~1e-15, far inside the tolerance
        assert row["pearson"] == pytest.approx(scipy.stats.pearsonr(x, y).statistic, abs=1e-12)
        assert row["spearman"] == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
        assert row["pearson_low"] <= row["pearson"] <= row["pearson_high"] and row["variants"] == 5
    assert (demo / "reports" / "fig3-bounds.png").stat().st_size > 0
    assert len((demo / "reports" / "fig3-bounds.csv").read_text().splitlines()) == 1 + len(variants)


def test_curves_hold_each_points_accuracy_and_the_levels(demo):
    curves = json.loads((demo / "reports" / "results.json").read_text())["figures"]["ablations"]["curves"]
    assert {(c["knob"], c["metric"]) for c in curves} == {("levels", m) for m in ("top1", "probe_top1", "knn_top1")}
    top1 = next(c for c in curves if c["metric"] == "top1")
    assert [(p["variant"], p["value"]) for p in top1["points"]] == [("levels_1", 3.0), ("levels_2", 10.0)]
    for point in top1["points"]:
        assert point["mean"] == 100 * metrics(demo, point["variant"])[1]["top1"] and point["std"] is None
    assert top1["baseline"]["mean"] == 100 * metrics(demo, "baseline")[1]["top1"]
    assert top1["untrained"]["mean"] == 100 * metrics(demo, "untrained")[1]["top1"]
    assert top1["reading"] == "too few values for a shape (2; 3 needed)"
    assert "### L (levels)" in (demo / "reports" / "results.md").read_text()
    assert (demo / "reports" / "fig4-levels.csv").exists() and (demo / "reports" / "fig4-ablations.png").exists()


def test_dvc_plots_draw_the_figures_data(demo):
    """`dvc plots show`: a scatter of Fig. 3's cells, a curve of Fig. 4's levels; the other knobs have no points,
    so their plots are empty (their CSVs a header alone), not errors."""
    shown = json.loads(run(demo, "dvc", "plots", "show", "--json").stdout)
    scatter = shown["data"]["fig3-bounds"][0]["content"]
    assert scatter["mark"]["type"] == "point" and len(scatter["data"]["values"]) == 2 * 5  # 2 bounds × 5 cells
    assert len(shown["data"]["fig4-levels"][0]["content"]["data"]["values"]) == 3 * 2  # 3 accuracies × 2 values
    assert not shown.get("errors") and shown["data"]["fig4-mi_weight"] == shown["data"]["fig4-sae_sparsity"] == []


def test_an_experiment_on_one_points_knob_reruns_that_point_only(demo):
    """Issue 20 item 7: the demo workspace is a git repository, so `dvc exp run` and `dvc params diff` work."""
    key = "pretrain.synthetic.simclr.variants.levels_2"
    assert run(demo, "dvc", "params", "diff").stdout.strip() == ""  # scripts/demo committed what it ran
    write_params(
        demo / "params.yaml",
        demo / "params.yaml",
        pretrain={"synthetic": {"simclr": {"variants": {"levels_2": {"levels": 12}}}}},
    )
    assert set(json.loads(run(demo, "dvc", "status", "--json").stdout)) == {
        "pretrain-ablations@synthetic-simclr-levels_2-0",
        "report",
    }  # the report reads the points' knobs
    assert f"{key}.levels" in run(demo, "dvc", "params", "diff").stdout
    run(demo, "git", "checkout", "params.yaml")
    result = run(demo, "dvc", "exp", "run", "-S", f"{key}.levels=12")
    output = result.stdout + result.stderr
    ran = {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}
    assert ran == {
        "pretrain-ablations@synthetic-simclr-levels_2-0",
        "linear-eval-ablations@synthetic-simclr-levels_2-0",
        "report",
    }
    assert "12" in run(demo, "dvc", "exp", "show", "--no-pager", "--csv").stdout
