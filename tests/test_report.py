"""The report from fixed metrics files, checked against numbers computed by hand."""

import csv
import json
import re
import struct

import pytest
from typer.testing import CliRunner

from pipeline.errors import UserError
from pipeline.metrics import EpochLog, LinearEvalMetrics, PretrainMetrics, write_log
from pipeline.params import ExperimentParams
from pipeline.provenance import Machine, Provenance
from pipeline.report import summary, write_report
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
}
MACHINE = Machine(
    cpu="AMD EPYC",
    cpu_capability="AVX2",
    onednn_isa="Intel AVX2",
    threads=1,
    gpu=None,
    gpu_driver=None,
    torch="2.0",
    cuda=None,
    cudnn=None,
    ffcv="1.0.2",
    python="3.11.7",
    code_version="abc1234",
)


def write_cells(root, precision="fp32", ratio=1e-3, mi_grad_fp32=False):
    for variant, seeds in TOP1.items():
        for seed, top1 in enumerate(seeds):
            cell = {"dataset": "cifar10", "method": "simclr", "variant": variant, "seed": seed}
            folder = "untrained" if variant == "untrained" else "linear_eval"
            (root / folder).mkdir(exist_ok=True)
            for kind in (folder, "pretrain") if variant != "untrained" else (folder,):
                (root / "provenance" / kind).mkdir(parents=True, exist_ok=True)
                (root / "provenance" / kind / f"{variant}-{seed}.json").write_text(
                    Provenance(**cell, machine=MACHINE).model_dump_json()
                )
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
            rows = [EpochLog(epoch=e, **EPOCH, mi_grad_ratio=ratio, lr=0.0, images_per_s=100.0) for e in (1, 2)]
            write_log(run / "log.csv", rows)


def make_report(root, out):
    return write_report(
        EXPERIMENT,
        [],  # no figures: tests/test_figures_dvc.py draws them
        root / "pretrain",
        root / "linear_eval",
        root / "untrained",
        root / "provenance",
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


def test_summary_is_the_tables_numbers_for_dvc(tmp_path):
    write_cells(tmp_path)
    shown = summary(make_report(tmp_path, tmp_path / "reports"))["top1"]["cifar10"]["simclr"]
    assert shown["mi_reg"] == pytest.approx({"mean": 93.3333333, "std": 1.2583057, "gain": 2.3333333})
    assert set(shown) == {"untrained", "baseline", "mi_reg"} and "gain" not in shown["baseline"]


def test_markdown_csv_and_plots_are_written(report):
    text = (report / "results.md").read_text()
    assert "| cifar10 | simclr | finetune | 32.00 ± 2.00 (n=3) | 91.00 ± 1.00 (n=3) | 93.33 ± 1.26 (n=3) |" in text
    assert "| cifar10 | simclr | mi_reg | +2.33 [+1.62, +3.05] | +0.26 | agrees |" in text
    assert "| cifar10 | simclr | mi_reg | 0.0001 | fp32 | 1.00e-03 | 6.0e-08 | acts |" in text
    rows = list(csv.DictReader((report / "results.csv").open()))
    assert len(rows) == 3 * 3 + 2 and rows[0]["metric"] == "top1"  # untrained, baseline, mi_reg; online: no untrained
    assert sorted(p.name for p in report.glob("*.png")) == ["curves-cifar10-simclr.png", "gains.png"]


def test_the_plotted_figure_files_exist_without_figures(report):
    """dvc.yaml plots the figures' CSVs: with the table only they are a header alone, which `dvc plots show` draws
    empty (a missing file made it report "failed to load")."""
    plotted = ["fig3-bounds.csv", "fig4-levels.csv", "fig4-mi_weight.csv", "fig4-sae_sparsity.csv"]
    assert all(len((report / name).read_text().splitlines()) == 1 for name in plotted)
    assert not list(report.glob("fig*.png")) and not (report / "fig3-correlations.csv").exists()


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


def test_report_lists_the_machines_of_its_cells(report):
    assert json.loads((report / "results.json").read_text())["machines"] == [
        {
            "machine": MACHINE.model_dump(),
            "records": 3 * 3 + 2 * 3,
        }  # evaluations of 3 encoders, 2 pretrainings, 3 seeds
    ]
    assert f"- {MACHINE.text()}: 15 stage runs" in (report / "results.md").read_text()


def report_of(folder, rows, machine=MACHINE):
    """A report folder whose results.json has `rows`: {(metric, variant): (mean, std, n)}."""
    folder.mkdir()
    listed = [
        {"metric": m, "dataset": "synthetic", "method": "simclr", "variant": v, "mean": mean, "std": std, "n": n}
        for (m, v), (mean, std, n) in rows.items()
    ]
    machines = [{"machine": machine.model_dump(), "records": 15}]
    (folder / "results.json").write_text(json.dumps({"rows": listed, "machines": machines}))
    return folder


def compare(report, reference, *options):
    return CliRunner().invoke(app, ["compare", str(report), str(reference), *options])


# A demo-like reference: 5 variants, seeds' spread of 2-4 points, 3 seeds
REFERENCE = {
    (metric, variant): (mean + offset, std, 3)
    for metric, offset in (("top1", 0.0), ("probe_top1", 10.0), ("knn_top1", 5.0))
    for variant, mean, std in (
        ("untrained", 12.0, 1.5),
        ("baseline", 40.0, 2.5),
        ("mi_reg", 39.0, 3.0),
        ("discrete", 41.0, 2.0),
        ("sae", 40.5, 3.5),
    )
}


def test_compare_passes_a_rerun_within_the_seeds_noise(tmp_path):
    """Another machine: every mean moved by about one standard deviation of the seeds, either way."""
    rerun = {
        key: (mean + (std if k % 2 else -std), std * (0.6 if k % 3 else 1.4), n)
        for k, (key, (mean, std, n)) in enumerate(REFERENCE.items())
    }
    other = MACHINE.model_copy(update={"cpu": "Intel Xeon", "cpu_capability": "AVX512", "onednn_isa": "AVX-512 AMX"})
    result = compare(report_of(tmp_path / "a", rerun, other), report_of(tmp_path / "b", REFERENCE))
    assert result.exit_code == 0, result.output
    assert f"compare: OK ({tmp_path / 'a'} agrees with {tmp_path / 'b'} on all 15 rows" in result.output
    assert "Intel Xeon (ATen AVX512" in result.output and "AMD EPYC (ATen AVX2" in result.output  # machines differ
    assert "DEPARTS" not in result.output


@pytest.mark.parametrize(
    "broken, variant",
    [
        ({"top1": 11.0, "probe_top1": 20.0, "knn_top1": 16.0}, "sae"),  # a variant at the untrained level
        ({"top1": 20.0, "probe_top1": 25.0, "knn_top1": 22.5}, "baseline"),  # a method whose accuracy halves
    ],
)
def test_compare_fails_a_real_regression(tmp_path, broken, variant):
    regressed = REFERENCE | {(m, variant): (mean, REFERENCE[m, variant][1], 3) for m, mean in broken.items()}
    result = compare(report_of(tmp_path / "a", regressed), report_of(tmp_path / "b", REFERENCE))
    assert result.exit_code == 1
    for metric in broken:
        assert re.search(rf"{metric} synthetic simclr {variant}: .* allowed [\d.]+  DEPARTS", result.output)
    assert "machines of" not in result.output  # the same machine: not listed


def test_compare_allows_the_t_interval_with_the_pooled_spread_at_the_bonferroni_level(tmp_path):
    """One row: 41 ± 2 against 40 ± 3, n = 3 each. Pooled: s² = (2·2² + 2·3²) / 4 = 6.5, ν = 4; one row, so
    t(1 − 0.05 / 2, 4) = 2.7764, and the allowed difference is 2.7764 · √6.5 · √(1/3 + 1/3) = 5.78 points."""
    ours, theirs = {("top1", "sae"): (41.0, 2.0, 3)}, {("top1", "sae"): (40.0, 3.0, 3)}
    result = compare(report_of(tmp_path / "a", ours), report_of(tmp_path / "b", theirs))
    assert (
        "top1 synthetic simclr sae: 41.00 ± 2.00 (n=3) against 40.00 ± 3.00 (n=3): +1.00, allowed 5.78" in result.output
    )
    assert compare(report_of(tmp_path / "c", {("top1", "sae"): (45.7, 2.0, 3)}), tmp_path / "b").exit_code == 0
    assert compare(report_of(tmp_path / "d", {("top1", "sae"): (45.8, 2.0, 3)}), tmp_path / "b").exit_code == 1
    # Two rows of one group: ν = 8, and R = 2 rows: t(1 − 0.05 / 4, 8) = 2.7515; s² = (4·6.5 + 2·0 + 2·4) / 8
    two = {("top1", "sae"): (41.0, 2.0, 3), ("top1", "baseline"): (50.0, 0.0, 3)}
    result = compare(
        report_of(tmp_path / "e", two), report_of(tmp_path / "f", theirs | {("top1", "baseline"): (50.0, 2.0, 3)})
    )
    assert f"allowed {2.7515 * (34 / 8) ** 0.5 * (2 / 3) ** 0.5:.2f}" in result.output
    single = {("top1", "sae"): (40.0, None, 1)}  # no spread on either side: the floor
    one_seed = compare(report_of(tmp_path / "g", {("top1", "sae"): (41.5, None, 1)}), report_of(tmp_path / "h", single))
    assert one_seed.exit_code == 1 and "+1.50, allowed 1.00  DEPARTS" in one_seed.output
    assert compare(tmp_path / "g", tmp_path / "h", "--floor", "2").exit_code == 0


def test_compare_names_what_is_missing_or_unreadable(report, tmp_path):
    results = json.loads((report / "results.json").read_text())
    del results["rows"][-1]  # online top-1 of mi_reg
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "results.json").write_text(json.dumps(results))
    result = compare(report, reference)
    assert result.exit_code == 1 and "online_test_acc cifar10 simclr mi_reg: only in the report" in result.output
    assert "is not a report folder" in compare(tmp_path, report).output
    assert "--floor: found nan" in compare(report, report, "--floor", "nan").output
    assert "--alpha: found 1.0" in compare(report, report, "--alpha", "1").output
    (reference / "results.json").write_text(json.dumps(results)[:100])
    result = compare(report, reference)
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
