"""The report from fixed metrics files, checked against numbers computed by hand."""

import csv
import json

import pytest
from typer.testing import CliRunner

from pipeline.errors import UserError
from pipeline.params import ExperimentParams
from pipeline.report import paired_gain, write_report
from stages.cli import app
from tests.helpers import REPO

EXPERIMENT = ExperimentParams(datasets=["cifar10"], methods=["simclr"], variants=["baseline", "mi_reg"], seeds=[0, 1, 2])
TOP1 = {"baseline": [0.90, 0.91, 0.92], "mi_reg": [0.92, 0.935, 0.945]}
KNN = {"baseline": [0.80, 0.80, 0.80], "mi_reg": [0.79, 0.80, 0.78]}


def write_cells(root):
    for variant, seeds in TOP1.items():
        for seed, top1 in enumerate(seeds):
            cell = {"dataset": "cifar10", "method": "simclr", "variant": variant, "seed": seed}
            name = f"cifar10-simclr-{variant}-seed{seed}.json"
            (root / "linear_eval").mkdir(exist_ok=True)
            (root / "linear_eval" / name).write_text(json.dumps(cell | {
                "pretrained": True, "protocol": "features", "epochs": 100, "top1": top1, "top5": 0.99, "knn_top1": KNN[variant][seed],
                "n_train": 50000, "n_test": 10000}))
            (root / "pretrain").mkdir(exist_ok=True)
            (root / "pretrain" / name).write_text(json.dumps(cell | {
                "epoch": 2, "epochs": 2, "ssl_loss": 5.0, "mi_z1_z2": 0.1, "mi_z1_r": -5.0, "lower_bound": -5.1,
                "upper_bound": 0.5, "entropy_z1": 0.6, "online_train_acc": 0.5, "online_test_acc": 0.5, "lr": 0.0}))
            run = root / "runs" / "cifar10" / "simclr" / variant / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "log.csv").write_text("epoch,ssl_loss,mi_z1_z2,mi_z1_r,lower_bound,upper_bound,entropy_z1,"
                                         "online_train_acc,online_test_acc,lr,images_per_s\n"
                                         "1,5.5,0.2,-5.5,-5.7,0.4,0.6,0.3,0.3,0.1,100\n"
                                         "2,5.0,0.1,-5.0,-5.1,0.5,0.6,0.5,0.5,0.0,100\n")


@pytest.fixture
def report(tmp_path):
    write_cells(tmp_path)
    write_report(EXPERIMENT, tmp_path / "pretrain", tmp_path / "linear_eval", tmp_path / "runs",
                 REPO / "references" / "paper.yaml", tmp_path / "reports")
    return tmp_path / "reports"


def test_table_numbers_match_hand_computation(report):
    rows = {(r["metric"], r["variant"]): r for r in json.loads((report / "results.json").read_text())["rows"]}
    baseline, mi_reg = rows["top1", "baseline"], rows["top1", "mi_reg"]
    assert baseline["mean"] == pytest.approx(91.0) and baseline["std"] == pytest.approx(1.0) and baseline["n"] == 3
    assert mi_reg["mean"] == pytest.approx(93.3333333) and mi_reg["std"] == pytest.approx(1.2583057)
    # paired differences 2.0, 2.5, 2.5: mean 2.3333, sd 0.2886751, t(0.975, 2) = 4.3026527
    assert mi_reg["gain"] == pytest.approx(2.3333333)
    assert mi_reg["gain_low"] == pytest.approx(2.3333333 - 4.3026527 * 0.2886751 / 3**0.5)
    assert mi_reg["gain_high"] == pytest.approx(2.3333333 + 4.3026527 * 0.2886751 / 3**0.5)
    assert mi_reg["agreement"] == "agrees" and mi_reg["paper_gain"] == 0.26 and mi_reg["paper_top1"] is None
    knn = rows["knn_top1", "mi_reg"]  # differences -1, 0, -2: mean -1, interval [-3.48, 1.48]
    assert knn["gain"] == pytest.approx(-1.0) and knn["gain_low"] == pytest.approx(-1 - 4.3026527 / 3**0.5)


def test_markdown_csv_and_plots_are_written(report):
    text = (report / "results.md").read_text()
    assert "| cifar10 | simclr | 91.00 ± 1.00 (n=3) | 93.33 ± 1.26 (n=3) |" in text
    assert "| cifar10 | simclr | mi_reg | +2.33 [+1.62, +3.05] | +0.26 | agrees |" in text
    rows = list(csv.DictReader((report / "results.csv").open()))
    assert len(rows) == 3 * 2 and rows[0]["metric"] == "top1"
    assert sorted(p.name for p in report.glob("*.png")) == ["curves-cifar10-simclr.png", "gains.png"]


def test_report_is_reproducible_byte_for_byte(report, tmp_path):
    write_report(EXPERIMENT, tmp_path / "pretrain", tmp_path / "linear_eval", tmp_path / "runs",
                 REPO / "references" / "paper.yaml", tmp_path / "again")
    for path in report.iterdir():
        assert path.read_bytes() == (tmp_path / "again" / path.name).read_bytes(), path.name


def test_one_seed_gives_no_interval_and_says_so():
    gain = paired_gain({5: 91.0}, {5: 90.5})
    assert (gain.mean, gain.low, gain.n) == (0.5, None, 1) and gain.agreement() == "same sign, no spread (n=1)"


def test_missing_cell_is_an_error(tmp_path):
    write_cells(tmp_path)
    (tmp_path / "linear_eval" / "cifar10-simclr-mi_reg-seed2.json").unlink()
    with pytest.raises(UserError, match="no metrics for 1 cell"):
        write_report(EXPERIMENT, tmp_path / "pretrain", tmp_path / "linear_eval", tmp_path / "runs",
                     REPO / "references" / "paper.yaml", tmp_path / "reports")
    assert not (tmp_path / "reports").exists()


def test_compare_passes_within_tolerance_and_names_what_departs(report, tmp_path):
    def compare(reference, tolerance):
        return CliRunner().invoke(app, ["compare", str(report), str(reference), "--tolerance", str(tolerance)])

    results = json.loads((report / "results.json").read_text())
    results["rows"][0]["mean"] += 1.5  # linear top-1 of the baseline: 91.00 -> 92.50
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "results.json").write_text(json.dumps(results))
    assert "largest difference 0.00" in compare(report, 0).output
    assert "largest difference 1.50" in compare(reference, 2).output
    result = compare(reference, 1)
    assert result.exit_code == 1 and "top1 cifar10 simclr baseline: 91.00 against 92.50 (tolerance 1)" in result.output
    del results["rows"][-1]  # online top-1 of mi_reg
    (reference / "results.json").write_text(json.dumps(results))
    result = compare(reference, 2)
    assert result.exit_code == 1 and "online_test_acc cifar10 simclr mi_reg: only in the report" in result.output
    assert "is not a report folder" in compare(tmp_path, 2).output
