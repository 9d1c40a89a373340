"""A real `dvc repro` of the data stages on the synthetic dataset, in a throwaway git repository."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, write_params

pytestmark = pytest.mark.slow


def run(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode:
        raise AssertionError(f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def project(tmp_path):
    for name in ("pipeline", "stages"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, tmp_path / name)
    write_params(tmp_path / "params.yaml", experiment={"datasets": ["synthetic"]},
                 datasets={"synthetic": {"train_per_class": 20, "test_per_class": 5}})
    run(tmp_path, "git", "init", "-q")
    run(tmp_path, "dvc", "init", "-q")
    return tmp_path


def test_repro_builds_data_stages_and_tracks_params(project):
    run(project, "dvc", "repro")
    assert sorted(p.name for p in (project / "data" / "ffcv" / "synthetic").iterdir()) == ["test.beton", "train.beton"]
    assert '"count": 200' in (project / "metrics" / "datasets" / "synthetic.json").read_text()
    assert "up to date" in run(project, "dvc", "status").stdout
    assert "changed" not in run(project, "dvc", "repro").stdout  # a second run recomputes nothing

    write_params(project / "params.yaml", experiment={"datasets": ["synthetic"]},
                 datasets={"synthetic": {"train_per_class": 20, "test_per_class": 5, "seed": 1}})
    status = json.loads(run(project, "dvc", "status", "--json").stdout)
    changed = {"changed deps": {"params.yaml": {"datasets.synthetic": "modified"}}}
    assert status == {"prepare@synthetic": [changed], "convert@synthetic": [changed]}


def test_repro_with_a_params_typo_fails_and_names_it(project):
    write_params(project / "params.yaml", experiment={"datasets": ["synthetic"]}, datasets={"synthetic": {"seeed": 1}})
    result = run(project, "dvc", "repro", check=False)
    assert result.returncode != 0
    assert "datasets.synthetic.seeed: unknown key (did you mean 'seed'?)" in result.stdout + result.stderr
    assert not (project / "data" / "raw" / "synthetic").exists()
