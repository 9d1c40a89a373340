"""A real `dvc repro` of the data stages on the synthetic dataset, in a throwaway git repository."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import REPO, make_tree, tiny_sections, write_params

pytestmark = pytest.mark.slow
SMALL = tiny_sections() | {
    "experiment": {
        "datasets": ["synthetic"],
        "methods": ["simclr", "barlow_twins"],
        "variants": ["baseline"],
        "seeds": [0],
    },
    "datasets": {"synthetic": {"train_per_class": 20, "test_per_class": 5}},
}


def run(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode:
        raise AssertionError(f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def project(tmp_path):
    for name in ("pipeline", "stages", "references", "plots"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, tmp_path / name)
    write_params(tmp_path / "params.yaml", **SMALL)
    run(tmp_path, "git", "init", "-q")
    run(tmp_path, "dvc", "init", "-q")
    return tmp_path


def test_repro_builds_data_stages_and_tracks_params(project):
    run(project, "dvc", "repro", "convert@synthetic")
    assert sorted(p.name for p in (project / "data" / "ffcv" / "synthetic").iterdir()) == ["test.beton", "train.beton"]
    assert '"count": 200' in (project / "metrics" / "datasets" / "synthetic.json").read_text()
    assert "up to date" in run(project, "dvc", "status", "convert@synthetic").stdout
    assert "changed" not in run(project, "dvc", "repro", "convert@synthetic").stdout  # nothing recomputed

    write_params(project / "params.yaml", project / "params.yaml", datasets={"synthetic": {"seed": 1}})
    status = json.loads(run(project, "dvc", "status", "--json", "--with-deps", "convert@synthetic").stdout)
    changed = {"changed deps": {"params.yaml": {"datasets.synthetic": "modified"}}}
    assert status == {"prepare@synthetic": [changed], "convert@synthetic": [changed]}


def test_killed_pretrain_resumes_under_dvc_and_only_changed_cells_rerun(project):
    run(project, "dvc", "repro", "convert@synthetic")
    cell = "pretrain@synthetic-simclr-baseline-0"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    repro = subprocess.Popen(
        ["dvc", "repro", cell],
        cwd=project,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = project / "runs" / "synthetic" / "simclr" / "baseline" / "seed0" / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and repro.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(repro.pid, signal.SIGKILL)
    repro.wait()
    resumed = run(project, "dvc", "repro")  # finishes the interrupted cell, then runs the other
    assert "resuming from" in resumed.stdout + resumed.stderr
    metrics = json.loads((project / "metrics" / "pretrain" / "synthetic-simclr-baseline-seed0.json").read_text())
    assert metrics["epochs"] == 3 and metrics["seed"] == 0
    assert "up to date" in run(project, "dvc", "status").stdout

    write_params(
        project / "params.yaml",
        project / "params.yaml",
        pretrain={"synthetic": {"barlow_twins": {"common": {"base_lr": 0.2}}}},
    )
    assert set(json.loads(run(project, "dvc", "status", "--json").stdout)) == {
        "pretrain@synthetic-barlow_twins-baseline-0",
        "untrained@synthetic-barlow_twins-0",
    }


def test_repro_with_a_params_typo_fails_and_names_it(project):
    write_params(project / "params.yaml", project / "params.yaml", datasets={"synthetic": {"seeed": 1}})
    result = run(project, "dvc", "repro", "convert@synthetic", check=False)
    assert result.returncode != 0
    assert "datasets.synthetic.seeed: unknown key (did you mean 'seed'?)" in result.stdout + result.stderr
    assert not (project / "data" / "raw" / "synthetic").exists()


def test_whole_dag_then_audit(project):
    write_params(
        project / "params.yaml",
        project / "params.yaml",
        experiment={"methods": ["simclr"], "variants": ["baseline", "sae"], "seeds": [0, 1]},
    )
    run(project, "dvc", "repro")
    assert "| synthetic | simclr | sae |" in (project / "reports" / "results.md").read_text()
    assert "audit: OK" in run(project, "python", "-m", "stages", "audit").stdout
    assert_dvc_views_show_what_compares_runs(project)

    metrics = project / "metrics" / "linear_eval" / "synthetic-simclr-sae-seed1.json"
    original = metrics.read_text()
    metrics.write_text(json.dumps(json.loads(original) | {"top1": 0.9999}))
    result = run(project, "python", "-m", "stages", "audit", check=False)
    assert result.returncode == 1 and "dvc.lock does not match" in result.stderr
    assert "linear-eval@synthetic-simclr-sae-1" in result.stderr
    metrics.write_text(original)

    # A variant's knob reruns that variant only: its pretraining, then its evaluation and the report
    write_params(
        project / "params.yaml",
        project / "params.yaml",
        pretrain={"synthetic": {"simclr": {"variants": {"sae": {"sae_topk": 5}}}}},
    )
    assert set(json.loads(run(project, "dvc", "status", "--json").stdout)) == {
        "pretrain@synthetic-simclr-sae-0",
        "pretrain@synthetic-simclr-sae-1",
    }
    assert would_run(project) == {
        "pretrain@synthetic-simclr-sae-0",
        "pretrain@synthetic-simclr-sae-1",
        "linear-eval@synthetic-simclr-sae-0",
        "linear-eval@synthetic-simclr-sae-1",
        "report",
    }
    # A shared knob reruns every variant, and the untrained reference (the same initial encoder)
    write_params(
        project / "params.yaml",
        project / "params.yaml",
        pretrain={"synthetic": {"simclr": {"common": {"projector_out_dim": 8}}}},
    )
    assert {cell.split("@")[0] for cell in would_run(project)} == {"pretrain", "linear-eval", "untrained", "report"}
    assert len(would_run(project)) == 2 * 2 + 2 * 2 + 2 + 1


def assert_dvc_views_show_what_compares_runs(project: Path) -> None:
    """Issue 21.5: DVC's metrics are the numbers that compare runs (no machine, speed or checksum, which the
    stages record in provenance/), and `dvc plots show` draws one plot per quantity with no load errors."""
    shown = json.loads(run(project, "dvc", "metrics", "show", "--json").stdout)
    keys = {key for files in shown.values() for values in files["data"].values() for key in values["data"]}
    assert {"top1", "probe_top1", "knn_top1", "ssl_loss", "lower_bound", "mi_grad_ratio_max"} <= keys
    assert not keys & {"images_per_s", "lr", "machine", "sources_sha256", "storage"}, keys
    machine = json.loads((project / "provenance" / "pretrain" / "synthetic-simclr-sae-seed1.json").read_text())
    assert machine["machine"]["cpu_capability"] and machine["images_per_s"] > 0
    plots = run(project, "dvc", "plots", "show", "--json")
    assert "failed to load" not in plots.stdout + plots.stderr
    drawn = json.loads(plots.stdout)
    # 6 quantities, and the 4 figures' plots, drawn empty with the table only (`figures` without points)
    assert not drawn.get("errors") and len(drawn["data"]) == 6 + 4, drawn.get("errors")
    assert all(drawn["data"][name] == [] for name in drawn["data"] if name.startswith("fig")), drawn["data"].keys()
    cells = {row["cell"] for row in drawn["data"]["SSL loss"][0]["content"]["data"]["values"]}
    assert cells == {f"synthetic-simclr-{v}-seed{s}" for v in ("baseline", "sae") for s in (0, 1)}


def would_run(project: Path) -> set[str]:
    """The stages `dvc repro` would run: the changed ones and everything downstream of them (a dry run cannot know
    that their outputs will change, so it is told: --force-downstream)."""
    dry = run(project, "dvc", "repro", "--dry", "--allow-missing", "--force-downstream").stdout
    return {line.split("'")[1] for line in dry.splitlines() if line.startswith("Running stage")}


def test_an_image_edited_in_place_makes_a_folder_dataset_stale(project, tmp_path_factory):
    """Issue 20: a `folder` tree's images were not part of its provenance: replacing an image under the same
    name reran nothing (DVC tracked the manifest, a list of names). The manifest now records each image's
    SHA-256, and `prepare` links every image into its output, which DVC hashes through the links."""
    tree = tmp_path_factory.mktemp("tree")
    make_tree(tree, ["a", "b"], per_split=(("train", 4), ("val", 2)), size=(8, 8), fmt="PNG")
    write_params(
        project / "params.yaml",
        project / "params.yaml",
        experiment={"datasets": ["folder"]},
        datasets={"folder": {"root": str(tree)}},
    )
    run(project, "dvc", "repro", "convert@folder")
    manifest = project / "data" / "raw" / "folder" / "manifest.json"
    digests = {
        path: digest for split in json.loads(manifest.read_text())["files"].values() for path, _, digest in split
    }
    image = tree / "train" / "a" / "0.png"
    assert digests["train/a/0.png"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert "up to date" in run(project, "dvc", "status", "--with-deps", "convert@folder").stdout

    Image.new("RGB", (8, 8), (9, 9, 9)).save(image)  # the same name and size, other pixels
    status = json.loads(run(project, "dvc", "status", "--json", "convert@folder", "--with-deps").stdout)
    assert status == {
        "prepare@folder": [{"changed outs": {"data/raw/folder": "modified"}}],
        "convert@folder": [{"changed deps": {"data/raw/folder": "modified"}}],
    }
    metadata = project / "metrics" / "datasets" / "folder.json"
    before = json.loads(metadata.read_text())["sources_sha256"]
    run(project, "dvc", "repro", "convert@folder")
    assert json.loads(metadata.read_text())["sources_sha256"] != before  # the manifest holds the new digest
    assert "up to date" in run(project, "dvc", "status", "--with-deps", "convert@folder").stdout
