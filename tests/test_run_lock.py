"""One process per run directory (issue 19): ``train.lock`` makes a second trainer of the same
run refuse in one line, a lock of a dead process is recovered, and a resume after a kill leaves
``metrics.csv`` with no step logged twice."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ebflow.cli import main
from ebflow.experiment.config.schema import FIELDS, RESUMABLE_KEYS
from ebflow.experiment.rundir.lock import LOCK_FILE, RunLock, RunLockedError
from ebflow.experiment.training import loop
from ebflow.experiment.training.run import _drop_metrics_after
from helpers import TINY_CLI, cli_sets

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_threads(restore_threads):
    yield


@pytest.fixture
def run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--device", "cpu"] + cli_sets(TINY_CLI)) == 0
    capsys.readouterr()
    return run


def _write_lock(run: Path, pid: int, host: str | None = None) -> None:
    (run / LOCK_FILE).write_text(
        json.dumps(
            {"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01T00:00:00", "token": "x"}
        )
    )


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_new_run_holds_the_lock_while_it_trains_and_removes_it(tmp_path, monkeypatch, capsys):
    seen = []
    real = loop.Trainer.after_step

    def after_step(self, out):
        seen.append((self.run_dir / LOCK_FILE).is_file())
        return real(self, out)

    monkeypatch.setattr(loop.Trainer, "after_step", after_step)
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--device", "cpu"] + cli_sets(TINY_CLI)) == 0
    assert seen and all(seen)
    assert not (run / LOCK_FILE).exists()


def test_a_second_trainer_of_a_run_refuses_in_one_line(run, capsys):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from ebflow.experiment.rundir.lock import RunLock; "
            f"RunLock({str(run)!r}).acquire(); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = (run / "checkpoints" / "last.pt").read_bytes(), (run / "metrics.csv").read_text()
        assert main(["train", "--resume", str(run), "--set", "max_iters=8"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert f"process {holder.pid}" in err and "this host" in err and LOCK_FILE in err
        assert ((run / "checkpoints" / "last.pt").read_bytes(), (run / "metrics.csv").read_text()) == before
        assert (run / LOCK_FILE).is_file()  # the holder's lock stays
    finally:
        holder.kill()
        holder.wait()


def test_another_hosts_lock_is_refused_naming_the_host(run, capsys):
    _write_lock(run, os.getpid(), host="elsewhere-node-7")
    with pytest.raises(RunLockedError, match="host 'elsewhere-node-7'"):
        RunLock(run).acquire()
    assert main(["train", "--resume", str(run)]) == 2
    assert "elsewhere-node-7" in capsys.readouterr().err


def test_a_stale_lock_of_a_dead_process_is_recovered(run, capsys):
    pid = _dead_pid()
    _write_lock(run, pid)
    assert main(["train", "--resume", str(run), "--set", "max_iters=6"]) == 0
    out = capsys.readouterr().out  # a logged note: on the command line's console (stdout)
    assert f"stale lock of process {pid}" in out
    assert not (run / LOCK_FILE).exists()


def test_the_lock_goes_when_a_resume_fails(run, capsys):
    assert "seed" in FIELDS and "seed" not in RESUMABLE_KEYS
    assert main(["train", "--resume", str(run), "--set", "seed=7"]) == 2  # after the lock was taken
    assert "cannot change" in capsys.readouterr().err
    assert not (run / LOCK_FILE).exists()


def _training_steps(path: Path) -> list[int]:
    with open(path, newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r["loss"]]


def test_a_resume_after_a_kill_logs_no_step_twice(tmp_path, capsys):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EBFLOW_TEST_KILL_AT_STEP": "3"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "kill_at_step.py"),
            "train",
            "--out",
            str(run),
            "--device",
            "cpu",
        ]
        + cli_sets(TINY_CLI + ["max_iters=6"]),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert _training_steps(run / "metrics.csv") == [1, 2, 3]  # the checkpoint is at step 2
    assert (run / LOCK_FILE).is_file()  # left behind by the killed process
    assert main(["train", "--resume", str(run)]) == 0  # the killed process's lock is stale
    assert "stale lock" in capsys.readouterr().out
    assert _training_steps(run / "metrics.csv") == [1, 2, 3, 4, 5, 6]


def test_dropping_the_rows_after_the_checkpoint_replaces_the_file_atomically(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_bytes(b"step,loss\r\n1,0.5\r\n2,0.4\r\n2,\r\n3,0.3\r\n")
    inode = path.stat().st_ino
    _drop_metrics_after(path, 2)
    assert path.read_bytes() == b"step,loss\r\n1,0.5\r\n2,0.4\r\n2,\r\n"
    assert path.stat().st_ino != inode  # a new file renamed over the old one, not rewritten in place
    assert not list(tmp_path.glob(".*.tmp"))
