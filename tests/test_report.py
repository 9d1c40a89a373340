"""The report from fixed metrics files, checked against numbers computed by hand."""

import csv
import json
import struct

import pytest
from typer.testing import CliRunner

from pipeline.errors import UserError
from pipeline.metrics import EpochLog, LinearEvalMetrics, PretrainMetrics, write_log
from pipeline.params import ExperimentParams
from pipeline.report import write_report
from pipeline.stats import paired_gain
from stages.cli import app
from stages.report import run_logs
from tests.helpers import REPO

EXPERIMENT = ExperimentParams(
    datasets=["cifar10"], methods=["simclr"], variants=["baseline", "mi_reg"], seeds=[0, 1, 2]
)
TOP1 = {"baseline": [0.90, 0.91, 0.92], "mi_reg": [0.92, 0.935, 0.945], "untrained": [0.30, 0.32, 0.34]}
KNN = {"baseline": [0.80, 0.80, 0.80], "mi_reg": [0.79, 0.80, 0.78], "untrained": [0.2, 0.2, 0.2]}
EPOCH = {
    "ssl_loss": 5.0,
    "mi_z1_z2": 0.1,
    "mi_z1_r_estimate": 0.5,
    "entropy_z1": 0.6,
    "online_train_acc": 0.5,
    "lower_bound": 0.4,
    "upper_bound": 0.5,
    "online_test_acc": 0.5,
    "lr": 0.0,
    "images_per_s": 100.0,
}


def write_cells(root, precision="fp32", ratio=1e-3, mi_grad_fp32=False):
    for variant, seeds in TOP1.items():
        for seed, top1 in enumerate(seeds):
            cell = {"dataset": "cifar10", "method": "simclr", "variant": variant, "seed": seed}
            folder = "untrained" if variant == "untrained" else "linear_eval"
            (root / folder).mkdir(exist_ok=True)
            (root / folder / f"{variant}-{seed}.json").write_text(
                LinearEvalMetrics(
                    **cell,
                    pretrained=variant != "untrained",
                    protocol="finetune",
                    epochs=100,
                    top1=top1,
                    top5=0.99,
                    probe_top1=top1 - 0.1,
                    knn_top1=KNN[variant][seed],
                    n_train=50000,
                    n_test=10000,
                ).model_dump_json()
            )
            if variant == "untrained":
                continue
            mi_weight = 1e-4 if variant == "mi_reg" else 0.0
            (root / "pretrain").mkdir(exist_ok=True)
            (root / "pretrain" / f"{variant}-{seed}.json").write_text(
                PretrainMetrics(
                    **cell,
                    **EPOCH,
                    epoch=2,
                    epochs=2,
                    mi_grad_ratio=ratio if mi_weight else 0.0,
                    precision=precision,
                    mi_weight=mi_weight,
                    mi_grad_fp32=mi_grad_fp32,
                    mi_grad_ratio_max=ratio if mi_weight else 0.0,
                ).model_dump_json()
            )
            run = root / "runs" / "cifar10" / "simclr" / variant / f"seed{seed}"
            run.mkdir(parents=True)
            write_log(run / "log.csv", [EpochLog(epoch=e, **EPOCH, mi_grad_ratio=ratio) for e in (1, 2)])


def make_report(root, out, figures=()):
    write_report(
        EXPERIMENT,
        list(figures),
        root / "pretrain",
        root / "linear_eval",
        root / "untrained",
        run_logs(root / "runs"),
        REPO / "references" / "paper.yaml",
        out,
    )


@pytest.fixture
def report(tmp_path):
    write_cells(tmp_path)
    make_report(tmp_path, tmp_path / "reports")
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
    untrained = rows["top1", "untrained"]
    assert (
        untrained["mean"] == pytest.approx(32.0) and untrained["std"] == pytest.approx(2.0) and "gain" not in untrained
    )
    assert rows["probe_top1", "baseline"]["mean"] == pytest.approx(81.0) and baseline["protocol"] == "finetune"


def test_markdown_csv_and_plots_are_written(report):
    text = (report / "results.md").read_text()
    assert "| cifar10 | simclr | finetune | 32.00 ± 2.00 (n=3) | 91.00 ± 1.00 (n=3) | 93.33 ± 1.26 (n=3) |" in text
    assert "| cifar10 | simclr | mi_reg | +2.33 [+1.62, +3.05] | +0.26 | agrees |" in text
    assert "| cifar10 | simclr | mi_reg | 0.0001 | fp32 | 1.00e-03 | 6.0e-08 | acts |" in text
    rows = list(csv.DictReader((report / "results.csv").open()))
    assert len(rows) == 3 * 3 + 2 and rows[0]["metric"] == "top1"  # untrained, baseline, mi_reg; online: no untrained
    assert sorted(p.name for p in report.glob("*.png")) == ["curves-cifar10-simclr.png", "gains.png"]


def test_figures_fit_a_laptop_screen(report):
    """Issue 19.4: curves-<dataset>-<method>.png was 2400×320 px, six panels in one row; now a grid of panels,
    and every PNG fits 1400×1000 px (read at 100%)."""
    for path in report.glob("*.png"):
        width, height = struct.unpack(">II", path.read_bytes()[16:24])  # the PNG header's IHDR
        assert width <= 1400 and height <= 1000, (path.name, width, height)
    assert struct.unpack(">II", (report / "curves-cifar10-simclr.png").read_bytes()[16:24])[1] >= 600  # two rows


def test_report_is_reproducible_byte_for_byte(report, tmp_path):
    make_report(tmp_path, tmp_path / "again")
    for path in report.iterdir():
        assert path.read_bytes() == (tmp_path / "again" / path.name).read_bytes(), path.name


def test_one_seed_gives_no_interval_and_says_so():
    gain = paired_gain({5: 91.0}, {5: 90.5})
    assert (gain.mean, gain.low, gain.n) == (0.5, None, 1) and gain.agreement() == "same sign, no spread (n=1)"


def test_missing_cell_is_an_error(tmp_path):
    write_cells(tmp_path)
    (tmp_path / "linear_eval" / "mi_reg-2.json").unlink()
    with pytest.raises(UserError, match="no metrics for 1 cell"):
        make_report(tmp_path, tmp_path / "reports")
    assert not (tmp_path / "reports").exists()


def test_compare_passes_within_tolerance_and_names_what_departs(report, tmp_path):
    def compare(reference, tolerance):
        return CliRunner().invoke(app, ["compare", str(report), str(reference), "--tolerance", str(tolerance)])

    results = json.loads((report / "results.json").read_text())
    row = next(r for r in results["rows"] if (r["metric"], r["variant"]) == ("top1", "baseline"))
    row["mean"] += 1.5  # linear top-1 of the baseline: 91.00 -> 92.50
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
    assert "--tolerance: found nan" in compare(report, float("nan")).output
    (reference / "results.json").write_text(json.dumps(results)[:100])
    result = compare(reference, 2)
    assert result.exit_code == 1 and "results.json: not a report's results.json (JSONDecodeError" in result.output


@pytest.mark.parametrize(
    "precision, ratio, mi_grad_fp32, verdict",
    [
        ("bf16", 1e-6, False, "ROUNDED AWAY in bf16: this variant reruns its baseline; set mi_grad_fp32: true"),
        ("bf16", 1e-6, True, "kept: its gradient is added in fp32"),
        ("bf16", 1e-2, False, "acts"),
    ],
)
def test_report_says_when_the_regularizer_cannot_act(tmp_path, precision, ratio, mi_grad_fp32, verdict):
    write_cells(tmp_path, precision, ratio, mi_grad_fp32)
    make_report(tmp_path, tmp_path / "reports")
    assert f"| {verdict} |" in (tmp_path / "reports" / "results.md").read_text()


@pytest.mark.parametrize(
    "log, problem",
    [
        ("", "no epochs"),
        ("epoch,ssl_loss\n1,5.0\n", "mi_z1_z2: Field required"),
        (None, "No such file"),
    ],
)
def test_bad_training_logs_are_named(tmp_path, log, problem):
    write_cells(tmp_path)
    path = tmp_path / "runs" / "cifar10" / "simclr" / "mi_reg" / "seed1" / "log.csv"
    if log is None:
        path.unlink()
    else:
        path.write_text(log)
    with pytest.raises(UserError, match=f"{path}: not a valid training log .*{problem}"):
        make_report(tmp_path, tmp_path / "reports")


def test_nan_in_a_training_log_is_refused(tmp_path):
    write_cells(tmp_path)
    path = tmp_path / "runs" / "cifar10" / "simclr" / "baseline" / "seed0" / "log.csv"
    path.write_text(path.read_text().replace("5,", "nan,", 1))
    with pytest.raises(UserError, match="not a valid training log .*finite number"):
        make_report(tmp_path, tmp_path / "reports")
