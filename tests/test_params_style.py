"""params.yaml is in the style `dvc exp run -S` writes it back (issue 21.5): an experiment's diff of it is the values
it set, not a restyle of the whole file. scripts/restyle-params rewrites it so."""

import difflib
import shutil

from dvc.utils.hydra import apply_overrides

from tests.helpers import REPO


def rewritten(tmp_path, overrides: list[str]) -> list[str]:
    """params.yaml's lines after DVC's writer applied `overrides` (`dvc exp run -S` values) to a copy."""
    copy = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", copy)
    apply_overrides(copy, overrides)
    return copy.read_text().splitlines()


def test_params_yaml_round_trips_through_dvcs_writer_unchanged(tmp_path):
    assert rewritten(tmp_path, []) == (REPO / "params.yaml").read_text().splitlines(), "run scripts/restyle-params"


def test_a_one_value_experiment_changes_one_line(tmp_path):
    after = rewritten(tmp_path, ["pretrain.cifar10.simclr.variants.mi_reg.mi_weight=0.001"])
    diff = difflib.unified_diff((REPO / "params.yaml").read_text().splitlines(), after, n=0, lineterm="")
    changed = [line for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    assert len(changed) == 2 and "mi_weight: 0.001" in changed[1], changed
