"""`launch`: the matrix over a real single-node Slurm with two fake GPUs, and over this machine, in a throwaway
copy of the project; plus the pieces (GPU slots, progress from a log, torchrun on request, user errors)."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from ruamel.yaml import YAML
from typer.testing import CliRunner

from pipeline.errors import UserError
from pipeline.runtime import DEVICE_VARIABLE
from stages.cli import app
from stages.launch.local import LocalOptions, find_gpus, share_cpus
from stages.launch.monitor import Slot, read_progress
from stages.pretrain import NPROC_VARIABLE
from tests.helpers import REPO, pretrain_args, tiny_sections, write_params

# Every params override of these tests. `tiny`: 2 methods x 2 seeds of seconds-long cells (the 2 x 2 matrix);
# the others are merged on top of it for one launch each and touch the barlow_twins cells only.
LONGER_EPOCHS = 100
PARAMS = {
    "tiny": tiny_sections()
    | {
        "experiment": {
            "datasets": ["synthetic"],
            "methods": ["simclr", "barlow_twins"],
            "variants": ["baseline"],
            "seeds": [0, 1],
        }
    },
    # time to requeue mid-training: 20 epochs took 3 s, and a requeue under load landed after the task had ended
    "longer": {"pretrain": {"synthetic": {"barlow_twins": {"common": {"epochs": LONGER_EPOCHS}}}}},
    "failing": {"pretrain": {"synthetic": {"barlow_twins": {"common": {"batch_size": 1000}}}}},  # > the 80 images
    "interruptible": {  # the barlow_twins cells only, long enough to interrupt mid-training
        "experiment": {"methods": ["barlow_twins"]},
        "pretrain": {"synthetic": {"barlow_twins": {"common": {"epochs": 20}}}},
    },
}
SIMCLR = ["synthetic-simclr-baseline-0", "synthetic-simclr-baseline-1"]
BARLOW = ["synthetic-barlow_twins-baseline-0", "synthetic-barlow_twins-baseline-1"]
UNTRAINED = {
    "simclr": ["untrained-synthetic-simclr-0", "untrained-synthetic-simclr-1"],  # the reference level
    "barlow_twins": ["untrained-synthetic-barlow_twins-0", "untrained-synthetic-barlow_twins-1"],
}
EVERY = {*SIMCLR, *BARLOW, *UNTRAINED["simclr"], *UNTRAINED["barlow_twins"]}
START = re.compile(r"launch: start ([\d.]+) CUDA_VISIBLE_DEVICES=(\S*)")  # the lines `launch` adds to a cell's log
END = re.compile(r"launch: end ([\d.]+)")
SLURM_COMMANDS = ("sbatch", "scontrol", "squeue", "scancel", "sinfo", "slurmctld", "slurmd", "munged")


def run(cwd: Path, *args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {}), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode:
        raise AssertionError(f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def use_params(project: Path, *overrides: str) -> None:
    write_params(project / "params.yaml", **PARAMS["tiny"])
    for name in overrides:
        write_params(project / "params.yaml", project / "params.yaml", **PARAMS[name])


@pytest.fixture
def project(tmp_path) -> Path:
    for name in ("pipeline", "stages", "references"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, tmp_path / name)
    use_params(tmp_path)
    run(tmp_path, "git", "init", "-q")
    run(tmp_path, "dvc", "init", "-q")
    return tmp_path


def launch(project: Path, *options: str, env: dict[str, str] | None = None, check: bool = True):
    return run(project, sys.executable, "-m", "stages", "launch", *options, env=env, check=check)


def attempts(project: Path, cell: str) -> list[tuple[float, float, str]]:
    """(start, end, CUDA_VISIBLE_DEVICES) of each attempt at the cell that ran to its end, from the cell's log."""
    spans, start = [], None
    for line in (project / "logs" / "launch" / f"{cell}.log").read_text().splitlines():
        if match := START.match(line):
            start = (float(match[1]), match[2])
        elif (match := END.match(line)) and start:
            spans.append((start[0], float(match[1]), start[1]))
            start = None
    return spans


def check_two_at_a_time_on_distinct_gpus(project: Path, cells: list[str]) -> None:
    spans = [span for cell in cells for span in attempts(project, cell)]
    assert len(spans) == len(cells)
    overlapping = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1 :] if a[0] < b[1] and b[0] < a[1]]
    assert overlapping, f"no two cells ran at once: {spans}"
    assert all(a[2] != b[2] for a, b in overlapping), f"two cells shared a GPU: {overlapping}"
    assert max(sum(s[0] <= t < s[1] for s in spans) for t, _, _ in spans) == 2, spans
    assert {s[2] for s in spans} == {"0", "1"}


def check_pipeline_complete(project: Path) -> None:
    """Every cell's stages are in dvc.lock and the report has every row (`launch` ran the audit itself)."""
    lock = YAML(typ="safe").load((project / "dvc.lock").read_text())["stages"]
    assert {f"{stage}@{cell}" for stage in ("pretrain", "linear-eval") for cell in SIMCLR + BARLOW} <= set(lock)
    assert "| synthetic | barlow_twins | " in (project / "reports" / "results.md").read_text()


def cells_to_run(output: str) -> set[str]:
    return set(re.search(r"cells to run: (.*)", output)[1].split())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """ClusterName=test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge/socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
MpiDefault=none
NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture
def slurm(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A single-node Slurm with two fake GPUs (/dev/tty0-1), its own munge key, socket and ports; yields the
    environment its commands need and stops it afterwards. Fails in CI (CI set) when it cannot start."""
    missing = [command for command in SLURM_COMMANDS if shutil.which(command) is None]
    if missing or os.geteuid() != 0:
        reason = (
            f"Slurm's {', '.join(missing)} not found (apt-get install slurm-wlm munge)"
            if missing
            else "slurmd needs root"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must run the Slurm test")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    for name in ("state", "spool", "log", "munge"):
        (root / name).mkdir()
    (root / "munge.key").write_bytes(os.urandom(1024))
    (root / "munge.key").chmod(0o400)
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(root=root, ctld_port=free_port(), d_port=free_port()))
    (root / "gres.conf").write_text("NodeName=localhost Name=gpu File=/dev/tty[0-1]\n")
    # the GPUs are fake: the tasks (which get the launch's environment) run their cells on the CPU on purpose
    env = {**os.environ, "SLURM_CONF": str(conf), DEVICE_VARIABLE: "cpu"}
    daemons = []
    for command in (
        [
            "munged",
            "--foreground",
            "--force",
            f"--socket={root}/munge/socket",
            f"--key-file={root}/munge.key",
            f"--log-file={root}/log/munged.log",
            f"--pid-file={root}/munged.pid",
            f"--seed-file={root}/seed",
        ],
        ["slurmctld", "-D", "-f", str(conf)],
        ["slurmd", "-D", "-f", str(conf)],
    ):
        with open(root / "log" / f"{command[0]}.out", "w") as out:
            daemons.append(subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT))
        time.sleep(0.5)
    try:
        wait_for(
            lambda: "idle" in run(root, "sinfo", "-h", "-o", "%T", env=env, check=False).stdout,
            30,
            lambda: "Slurm did not start:\n" + "".join(p.read_text() for p in (root / "log").iterdir()),
        )
        yield env
    finally:
        run(root, "scancel", "--user=root", env=env, check=False)
        for daemon in reversed(daemons):
            daemon.terminate()
            try:
                daemon.wait(10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


def wait_for(condition, timeout_s: float, message) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message())
        time.sleep(0.1)


def wait_for_jobs(project: Path, env: dict[str, str], jobs: list[str]) -> None:
    def logs() -> str:
        return "\n".join(
            f"== {log.name}\n{log.read_text()[-3000:]}" for log in sorted((project / "logs" / "launch").iterdir())
        )

    # squeue lists pending and running jobs; once Slurm forgets a finished job it exits 1: "Invalid job id"
    wait_for(
        lambda: not run(project, "squeue", "-h", "-j", ",".join(jobs), env=env, check=False).stdout.strip(),
        600,
        lambda: f"jobs {jobs} still queued after 10 minutes:\n{logs()}",
    )


def submitted(output: str) -> tuple[str, str]:
    """The cells' job id and the final job's, from what `launch` printed."""
    return (
        re.search(r"submitted job (\d+): \d+ cells", output)[1],
        re.search(r"submitted job (\d+): dvc repro", output)[1],
    )


@pytest.mark.slow
def test_slurm_runs_cells_two_at_a_time_a_requeued_task_resumes_and_a_relaunch_runs_only_changed_cells(project, slurm):
    first = launch(project, "--backend", "slurm", "--max-running", "2", env=slurm)
    assert cells_to_run(first.stdout) == EVERY
    again = launch(project, "--backend", "slurm", env=slurm, check=False)
    assert again.returncode == 1 and "of an earlier launch in" in again.stderr and "still queued" in again.stderr
    wait_for_jobs(project, slurm, list(submitted(first.stdout)))
    check_two_at_a_time_on_distinct_gpus(project, SIMCLR + BARLOW)
    check_pipeline_complete(project)
    assert "audit: OK" in (project / "logs" / "launch" / "report.log").read_text()

    use_params(project, "longer")
    cell, checkpoint = BARLOW[1], project / "runs/synthetic/barlow_twins/baseline/seed1/checkpoint.pt"
    first_run = checkpoint.stat().st_mtime_ns
    second = launch(project, "--backend", "slurm", "--exec-prefix", "env", env=slurm)  # `env python -m dvc ...`
    assert cells_to_run(second.stdout) == {*BARLOW, *UNTRAINED["barlow_twins"]}  # their common settings changed
    cells_job, final_job = submitted(second.stdout)
    index = {key: i for i, key in enumerate(re.search(r"cells to run: (.*)", second.stdout)[1].split())}  # array order
    task, log = f"{cells_job}_{index[cell]}", project / "logs" / "launch" / f"{cell}.log"
    # Warned before its time limit (Slurm's USR1 to the batch shell) once the new run has written its first
    # checkpoint (these params start it over), the task requeues itself.
    wait_for(lambda: checkpoint.stat().st_mtime_ns != first_run, 120, lambda: f"{cell} wrote no checkpoint")
    while "launch: time limit near" not in log.read_text():
        # Slurm may answer "try again later" and deliver the signal all the same; scancel then retries for a minute
        # or more, and a retry would hit the next attempt: the log tells whether it landed, and scancel is stopped
        with subprocess.Popen(["scancel", "--signal=USR1", "--batch", task], env=slurm) as scancel:
            time.sleep(2)
            scancel.kill()
        if "launch: time limit near" not in log.read_text() and finished(checkpoint):
            pytest.skip(f"Slurm did not deliver USR1 to {task} before it had trained every epoch")
    wait_for(  # a requeued task may start again after about 2 minutes: start it now
        lambda: "PENDING" in run(project, "squeue", "-h", "-o", "%T", "-j", task, env=slurm).stdout,
        60,
        lambda: f"{task} was not requeued:\n{log.read_text()[-3000:]}",
    )
    time.sleep(2)  # slurmd refuses a job started again within the second it was killed ("already killed")
    run(project, "scontrol", "update", f"jobid={task}", "StartTime=now", env=slurm)
    wait_for_jobs(project, slurm, [cells_job, final_job])

    assert all(len(attempts(project, simclr)) == 1 for simclr in SIMCLR)  # not run again
    check_pipeline_complete(project)
    report = project / "logs" / "launch" / "report.log"
    assert report.read_text().count("audit: OK") == 2, report.read_text()[-3000:]
    assert finished(checkpoint)
    resumed = re.search(r"restart 1 .*\n(?:.*\n)*?.*resuming from \S+ after epoch (\d+)", log.read_text())
    assert resumed and 1 <= int(resumed[1]) < LONGER_EPOCHS, log.read_text()[-3000:]

    # A failing cell: the final job says which cells are not done and runs nothing else.
    use_params(project, "failing")
    third = launch(project, "--backend", "slurm", env=slurm)
    wait_for_jobs(project, slurm, list(submitted(third.stdout)))
    text = report.read_text()
    assert "launch: not every cell is done" in text and f"pretrain@{BARLOW[0]}" in text, text[-3000:]
    assert text.count("audit: OK") == 2


def finished(checkpoint: Path) -> bool:
    return torch.load(checkpoint, weights_only=True)["epoch"] == LONGER_EPOCHS


@pytest.mark.slow
def test_local_runs_cells_on_pinned_gpus_reports_failures_and_a_relaunch_runs_only_changed_cells(project):
    use_params(project, "failing")
    # GPU ids on a CPU machine: the cells run on the CPU on purpose, pinned as on a 2-GPU machine
    first = launch(project, "--backend", "local", "--gpus", "0,1", env={DEVICE_VARIABLE: "cpu"}, check=False)
    assert first.returncode == 1
    assert cells_to_run(first.stdout) == EVERY
    assert "cells: 6 done, 2 failed" in first.stdout
    for cell in BARLOW:
        assert re.search(f"{cell}: exit \\d+, log logs/launch/{cell}.log", first.stderr)
        assert "larger than the training set" in (project / "logs" / "launch" / f"{cell}.log").read_text()
    check_two_at_a_time_on_distinct_gpus(project, SIMCLR + BARLOW)
    assert not (project / "reports").exists()

    use_params(project)
    second = launch(project, "--backend", "local", "--gpus", "cpu", "--cpu-jobs", "2")
    assert cells_to_run(second.stdout) == {*BARLOW, *UNTRAINED["barlow_twins"]}
    assert [attempts(project, cell)[-1][2] for cell in BARLOW] == ["", ""]  # on the CPU
    if len(os.sched_getaffinity(0)) > 1:  # side by side, each on its own CPUs
        assert "on CPU 0:" in second.stdout and "on CPU 1:" in second.stdout, second.stdout
    assert all(len(attempts(project, cell)) == 1 for cell in SIMCLR)
    check_pipeline_complete(project)
    assert "audit: OK" in second.stdout
    assert "everything is up to date" in launch(project, "--backend", "local").stdout


@pytest.mark.slow
def test_ctrl_c_interrupts_the_running_cells_and_the_next_launch_resumes_them_without_stale_locks(project):
    """Issue 20.9: Ctrl-C listed the running cells as "failed (-15)" (SIGTERM killed DVC as well as the stage), and
    the next launch's DVC warned that their RWLock entries "had been killed". Now they get Ctrl-C's SIGINT: the stage
    stops (its checkpoint stays) and DVC releases its locks."""
    use_params(project, "interruptible")
    command = [sys.executable, "-m", "stages", "launch", "--backend", "local", "--gpus", "cpu", "--cpu-jobs", "2"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    logs = project / "logs" / "launch"
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    # as a launch started from a terminal: its own process group, Ctrl-C's SIGINT heard (a test run in the background
    # would pass its SIG_IGN on)
    hears_ctrl_c = {"start_new_session": True, "preexec_fn": lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)}
    with subprocess.Popen(command, cwd=project, env=env, **hears_ctrl_c, **pipes) as first:
        wait_for(
            lambda: any("epoch 2/" in log.read_text() for log in logs.glob("*.log")) or first.poll() is not None,
            600,
            lambda: "no cell reached its second epoch in 10 minutes",
        )
        os.killpg(first.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's foreground processes
        out, err = first.communicate(timeout=300)
    assert first.returncode == 130, out + err
    interrupted = re.findall(r"^interrupted (\S+) after", out, re.M)
    assert interrupted and "failed" not in out, out
    assert f"interrupted: {' '.join(interrupted)} (a checkpoint stays" in err, err
    trained = [cell for cell in interrupted if "epoch 2/" in (logs / f"{cell}.log").read_text()]
    assert trained, out

    second = launch(project, "--backend", "local", "--gpus", "cpu", "--cpu-jobs", "2")
    assert "audit: OK" in second.stdout
    texts = [second.stdout, second.stderr, *(log.read_text() for log in logs.glob("*.log"))]
    assert not any("had been killed" in text for text in texts)
    for cell in trained:
        this_attempt = (logs / f"{cell}.log").read_text().rsplit("launch: start ", 1)[1]
        assert "resuming from " in this_attempt, this_attempt[-3000:]


@pytest.mark.slow
def test_pretrain_reexecutes_itself_under_torchrun_when_asked(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "stages",
        *pretrain_args(write_params(tmp_path / "p.yaml", **PARAMS["tiny"]), tiny_dataset, out),
    ]
    env = {**os.environ, NPROC_VARIABLE: "2", DEVICE_VARIABLE: "cpu"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["world_size"] == 2


def test_gpus_come_from_the_option_else_cuda_visible_devices_and_must_exist(monkeypatch):
    """Issue 20.4 and 20.6: `--gpus 7` without GPUs ran every cell on the CPU and exited 0; `none` was taken as a
    GPU id, and the CPU's spelling (`--gpus ''`) was not documented."""
    monkeypatch.delenv(DEVICE_VARIABLE, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert find_gpus(None) == [] and find_gpus("cpu") == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "97,98")  # no machine has these
    with pytest.raises(UserError, match="^CUDA_VISIBLE_DEVICES 97,98: no GPU 97, 98 on this machine"):
        find_gpus(None)
    monkeypatch.setenv(DEVICE_VARIABLE, "cpu")  # the CPU on purpose: the ids only pin the cells
    assert find_gpus(None) == ["97", "98"] and find_gpus("0, 1") == ["0", "1"]


def test_slots_pin_gpu_groups_k_cells_each_and_share_the_cpus():
    slots = LocalOptions(["0", "1", "2", "3", "4"], 2, 2, 1, tuple(range(8))).slots()
    assert [slot.devices for slot in slots] == ["0,1", "2,3", "0,1", "2,3"]
    assert [slot.cpus for slot in slots] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert LocalOptions([], 1, 3, 3, (0, 1, 2, 3, 5, 7, 8)).slots() == [
        Slot("", (0, 1)),
        Slot("", (2, 3)),
        Slot("", (5, 7, 8)),
    ]
    assert share_cpus((4, 6), 3) == [(4,), (6,), (4,)]  # more cells than CPUs: one CPU each, in turn
    assert str(Slot("", (0, 1, 2, 3, 6))) == "CPUs 0-3,6" and str(Slot("0,1", (5,))) == "GPU 0,1, CPU 5"


def test_progress_is_read_from_the_current_stage_of_the_log(tmp_path):
    log = tmp_path / "cell.log"
    log.write_text(
        "launch: start 1796074065.43 CUDA_VISIBLE_DEVICES=0\nRunning stage 'pretrain@c':\n"
        "12:00:01 epoch 2/3: 50% (3 steps) loss 3.4  145 images/s\n"
    )
    assert read_progress(log) == {"stage": "pretrain", "epoch": "2/3", "images/s": "145"}
    log.write_text(
        log.read_text() + "12:00:02 epoch 2/3: ssl_loss 3.4, lr 0.01, images_per_s 1523.7, "
        "online_test_acc 0.2\nUpdating lock file 'dvc.lock'\n"
    )
    assert read_progress(log)["images/s"] == "1,524"
    log.write_text(log.read_text() + "Running stage 'linear-eval@c':\n")
    assert read_progress(log) == {"stage": "linear-eval"}
    log.write_text(log.read_text() + "launch: start 1796074183.01 CUDA_VISIBLE_DEVICES=0\n")  # a new attempt
    assert read_progress(log) == {"stage": ""}


@pytest.mark.parametrize(
    "options, message",
    [
        (["--backend", "slurm"], "sbatch not found: --backend slurm submits jobs with Slurm's sbatch"),
        (
            ["--backend", "local", "--partition", "gpu", "--time", "1:00:00"],
            "--partition, --time: not an option of --backend local",
        ),
        (["--backend", "slurm", "--cpu-jobs", "2"], "--cpu-jobs: not an option of --backend slurm"),
        (["--backend", "local", "--gpus", "cpu", "--gpus-per-cell", "2"], "--gpus-per-cell 2: no GPU found"),
        (["--backend", "local", "--gpus", "0,97"], "--gpus 0,97: no GPU "),
        (["--backend", "local", "--gpus", "none"], "--gpus none: no GPU none on this machine"),
        (["--backend", "local", "--gpus", ""], "--gpus '': names no GPU; name GPUs (e.g. --gpus 0,1), or write"),
    ],
)
def test_user_errors_are_one_line_without_traceback(options, message, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch
    monkeypatch.delenv(DEVICE_VARIABLE, raising=False)
    result = CliRunner().invoke(app, ["launch", *options])
    assert result.exit_code == 1 and message in result.output
    assert "Traceback" not in result.output


def test_pretrain_refuses_a_bad_process_count(tmp_path):
    cell = [
        "--dataset",
        "synthetic",
        "--method",
        "simclr",
        "--variant",
        "baseline",
        "--seed",
        "0",
        "--data",
        "d",
        "--metadata",
        "m.json",
        "--out",
        str(tmp_path / "run"),
        "--metrics",
        str(tmp_path / "m.json"),
    ]
    result = CliRunner().invoke(app, ["pretrain", *cell], env={NPROC_VARIABLE: "two"})
    assert result.exit_code == 1 and "PROJECTOR_IB_NPROC='two': expected a number of processes" in result.output
    assert not (tmp_path / "run").exists()
