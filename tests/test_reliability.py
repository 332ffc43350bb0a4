"""Never a traceback, never a damaged file (issue 13): one test per class of failure.

Corrupt and crafted checkpoints, bad configs and data, devices this machine lacks, run-directory
ownership, unwritable outputs and a full disk, SIGTERM/SIGINT and the leftovers of interrupted
writes. Read-only folders use ``chmod`` where it stops this process; as root (where it does not)
the write is made to fail by a monkeypatched ``PermissionError`` instead.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ebflow.cli import main
from ebflow.errors import ConfigError, EBFlowError, InputError
from ebflow.experiment.config.resolve import parse_overrides, resolve_config
from ebflow.experiment.config.sections import MAX_SEED
from ebflow.experiment.data.datasets import load_data
from ebflow.experiment.rundir.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ebflow.experiment.training.run import train
from ebflow.experiment.training.state import StopRequest, TrainingInterrupted

QUIET = dict(tensorboard=False, progress=False, num_threads=1)
TINY = dict(QUIET, max_iters=4, epochs=None, checkpoint_every=2, eval_every=2, log_every=1, num_samples=4)
TINY_SETS = [
    a
    for k, v in {**TINY, "epochs": "null", "tensorboard": "false", "progress": "false"}.items()
    for a in ("--set", f"{k}={v}")
]


@pytest.fixture(autouse=True)
def _restore_threads(restore_threads):
    yield


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "digits"
    train(resolve_config("digits-fc", TINY), run)
    return run


@pytest.fixture
def run_copy(digits_run, tmp_path):
    return Path(shutil.copytree(digits_run, tmp_path / "run"))


def _fails_cleanly(capsys, argv, *needles, code=2):
    """The command exits with ``code`` after one ``error:`` line holding every needle."""
    got = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert got == code, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert str(needle) in lines[0], err
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- corrupt and crafted checkpoints --------------------------------------------------------------
def _zip_with_pickle(real: Path, out: Path, pkl: bytes) -> None:
    with zipfile.ZipFile(real) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, pkl if info.filename.endswith("data.pkl") else src.read(info))


SYSTEM_PICKLE = "cos\nsystem\n(S'touch {marker}'\ntR."  # protocol 0: GLOBAL os.system, then call it


def _corrupt(kind: str, real: Path, out: Path, marker: Path) -> None:
    data = real.read_bytes()
    if kind == "text":
        out.write_text("not a checkpoint, just text\n")
    elif kind.startswith("truncated"):
        out.write_bytes(data[: int(kind.split("-")[1]) if "-" in kind else len(data) // 2])
    elif kind == "random":
        out.write_bytes(random.Random(0).randbytes(5000))
    elif kind == "stop-only-pickle":
        _zip_with_pickle(real, out, b".")
    elif kind == "os-system-in-zip":
        _zip_with_pickle(real, out, SYSTEM_PICKLE.format(marker=marker).encode())
    elif kind == "os-system-pickle":
        out.write_bytes(SYSTEM_PICKLE.format(marker=marker).encode())
    elif kind == "zip-without-pickle":
        with zipfile.ZipFile(out, "w") as z:
            z.writestr("archive/version", "3")
    elif kind == "not-a-dict":
        torch.save([1, 2, 3], out)
    elif kind == "directory":
        out.mkdir()
    else:
        raise AssertionError(kind)


KINDS = [
    "text",
    "truncated",
    "truncated-10",
    "truncated-300",
    "random",
    "stop-only-pickle",
    "os-system-in-zip",
    "os-system-pickle",
    "zip-without-pickle",
    "not-a-dict",
    "directory",
]


@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_or_crafted_checkpoint_is_one_error_naming_the_file(kind, digits_run, tmp_path):
    path, marker = tmp_path / "best.pt", tmp_path / "pwned"
    _corrupt(kind, digits_run / "checkpoints" / "last.pt", path, marker)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    text = str(info.value)
    assert str(path) in text and "\n" not in text and "weights_only" not in text
    assert not marker.exists()  # no code from the file ever ran


@pytest.mark.parametrize("command", ["eval", "sample", "inpaint", "resume"])
@pytest.mark.parametrize("kind", ["text", "stop-only-pickle", "os-system-in-zip", "truncated"])
def test_every_command_reports_a_damaged_checkpoint_in_one_line(command, kind, run_copy, capsys):
    ckpts = run_copy / "checkpoints"
    real = Path(shutil.copy(ckpts / "last.pt", run_copy.parent / "real.pt"))
    for name in ("last.pt", "best.pt"):
        (ckpts / name).unlink()
        _corrupt(kind, real, ckpts / name, run_copy.parent / "pwned")
    argv = {
        "eval": ["eval", run_copy],
        "inpaint": ["inpaint", run_copy, "--steps", "1"],
        "sample": ["sample", run_copy, "--out", run_copy.parent / "s.png"],
        "resume": ["train", "--resume", run_copy],
    }[command]
    _fails_cleanly(capsys, argv, "checkpoints/")


def test_bit_flips_at_200_offsets_are_detected_or_harmless(digits_run, tmp_path):
    real = digits_run / "checkpoints" / "last.pt"
    data, original = real.read_bytes(), load_checkpoint(real)
    rng = random.Random(13)
    # the pickle and small records, the whole file, the zip directory at the end
    offsets = (
        [rng.randrange(0, 4800) for _ in range(100)]
        + [rng.randrange(len(data)) for _ in range(60)]
        + [rng.randrange(len(data) - 700, len(data)) for _ in range(40)]
    )
    path, outcomes = tmp_path / "flipped.pt", {"refused": 0, "intact": 0}
    for i, at in enumerate(offsets):
        flipped = bytearray(data)
        flipped[at] ^= 1 << (i % 8)
        path.write_bytes(bytes(flipped))
        try:
            state = load_checkpoint(path)
        except CheckpointError as err:
            assert str(path) in str(err) and "\n" not in str(err), (at, str(err))
            outcomes["refused"] += 1
        else:  # the flip hit bytes nobody reads (zip padding, CRCs): the content is verified
            assert state["digest"] == original["digest"] and torch.equal(
                state["model"]["layers.1.weight"], original["model"]["layers.1.weight"]
            )
            outcomes["intact"] += 1
    assert outcomes["refused"] > 100


# -- configs, data, seeds and devices -------------------------------------------------------------
def test_non_utf8_and_invalid_yaml_name_the_file(tmp_path, capsys):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"preset: digits-fc\ndescription: caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        resolve_config(str(bad))
    _fails_cleanly(capsys, ["train", "--config", bad], str(bad), "UTF-8")
    tabs = tmp_path / "tabs.yaml"
    tabs.write_text("lr:\n\t- 1\n")
    _fails_cleanly(capsys, ["train", "--config", tabs], str(tabs), "line 2")


@pytest.mark.parametrize(
    "key, value",
    [
        ("seed", -1),
        ("seed", MAX_SEED + 1),
        ("seed", 10**20),
        ("seed", 123456789012345),
        ("data_seed", 2**63),
        ("toy_train_size", "1e12"),
        ("toy_eval_size", 0),
        ("max_iters", "1e30"),
        ("device", "cuda:x"),
        ("device", "tpu"),
        ("device", "mps"),
    ],
)
def test_out_of_range_values_are_refused_by_the_config_check(key, value, capsys):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        resolve_config("toy2d-sine", parse_overrides([f"{key}={value}"]))
    _fails_cleanly(capsys, ["train", "--config", "toy2d-sine", "--set", f"{key}={value}"], f"'{key}'")


def test_the_largest_seed_trains(tmp_path, capsys):
    result = train(
        resolve_config("digits-fc", {**TINY, "max_iters": 2, "seed": MAX_SEED}),
        tmp_path / "r",
        final_outputs=False,
    )
    assert result.step == 2
    _fails_cleanly(capsys, ["train", "--seed", "99999999999999999999"], "'seed'")


@pytest.mark.parametrize("device", ["cuda:x", "tpu", "mps", "cuda:-1", "gpu", "cuda:99"])
@pytest.mark.parametrize("command", ["train", "eval", "sample", "inpaint", "reproduce"])
def test_one_device_check_for_every_command(command, device, digits_run, tmp_path, capsys):
    argv = {
        "train": ["train", *TINY_SETS, "--out", tmp_path / "r"],
        "eval": ["eval", digits_run],
        "sample": ["sample", digits_run, "--out", tmp_path / "s.png"],
        "inpaint": ["inpaint", digits_run],
        "reproduce": ["reproduce", "mm10", "--out", tmp_path],
    }
    _fails_cleanly(capsys, argv[command] + ["--device", device], device)
    assert not (tmp_path / "r").exists() and not (tmp_path / "s.png").exists()


def test_cuda_devices_are_checked_against_the_gpu_count(monkeypatch):
    from ebflow.experiment.parallel.devices import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and resolve_device("cuda").type == "cuda"
    with pytest.raises(ConfigError, match="2 GPU"):
        resolve_device("cuda:2")


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((50, 1)),
        np.ones((50, 2), dtype=np.complex128),
        np.ones((50, 2), dtype=bool),
        np.zeros((50, 2, 2)),
        np.zeros(50),
        np.array([["a", "b"]] * 50),
    ],
)
def test_points_files_that_cannot_be_trained_on_are_refused_at_load_time(array, tmp_path):
    path = tmp_path / "points.npy"
    np.save(path, array)
    with pytest.raises(InputError, match="real numbers") as info:
        load_data(resolve_config("mm10-lu", {"data": "points", "data_file": str(path)}).data)
    assert str(path) in str(info.value)
    np.save(path, np.arange(100).reshape(50, 2))  # integers are fine
    assert (
        load_data(resolve_config("mm10-lu", {"data": "points", "data_file": str(path)}).data).train.shape[1]
        == 2
    )


# -- run ownership ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content",
    [
        ("config.yaml", "results.json"),
        ("metrics.csv",),
        ("checkpoints/",),
        ("notes.txt",),
        ("run.json",),
        "FILE",
    ],
)
def test_a_new_run_never_writes_into_a_folder_that_is_not_its_own(content, tmp_path, capsys):
    out = tmp_path / "out"
    if content == "FILE":
        out.write_text("someone's file")
    else:
        for name in content:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            if name.endswith("/"):
                (out / name).mkdir()
            else:
                (out / name).write_text(f"someone's {name}")
    before = _snapshot(tmp_path)
    _fails_cleanly(capsys, ["train", *TINY_SETS, "--out", out], str(out))
    assert _snapshot(tmp_path) == before


def test_resume_refuses_a_checkpoint_of_another_run_and_touches_nothing(run_copy, tmp_path, capsys):
    mm10 = tmp_path / "mm10"
    train(
        resolve_config("mm10-lu", {**TINY, "toy_train_size": 200, "toy_eval_size": 50, "batch_size": 20}),
        mm10,
        final_outputs=False,
    )
    shutil.copy(mm10 / "checkpoints" / "last.pt", run_copy / "checkpoints" / "last.pt")
    before = _snapshot(run_copy)
    _fails_cleanly(capsys, ["train", "--resume", run_copy], "does not belong to the run")
    assert _snapshot(run_copy) == before
    # the same config but another run's id
    shutil.copytree(run_copy, tmp_path / "other")
    (tmp_path / "other" / "run.json").write_text(json.dumps({"run_id": "0123456789abcdef"}))
    _fails_cleanly(capsys, ["train", "--resume", tmp_path / "other"], "0123456789abcdef")


def test_runs_made_before_run_ids_still_resume(run_copy, capsys):
    (run_copy / "run.json").unlink()
    for name in ("last.pt", "best.pt"):  # checkpoints as the previous version wrote them
        state = load_checkpoint(run_copy / "checkpoints" / name)
        save_checkpoint(
            run_copy / "checkpoints" / name,
            {k: v for k, v in state.items() if k not in ("digest", "format", "version", "run_id")},
        )
    assert main(["train", "--resume", str(run_copy), "--set", "max_iters=6"]) == 0
    assert load_checkpoint(run_copy / "checkpoints" / "last.pt")["step"] == 6
    config = run_copy / "config.yaml"
    config.write_text(config.read_text().replace("lr: 0.001", "lr: 0.002"))  # not this checkpoint's
    _fails_cleanly(capsys, ["train", "--resume", run_copy, "--set", "max_iters=8"], "lr=0.001")


def test_leftover_temporary_files_are_removed_on_resume(run_copy):
    leftovers = [
        run_copy / "checkpoints" / ".last.pt.1a2b3c4d.tmp",
        run_copy / ".config.yaml.99.tmp",
        run_copy / "checkpoints" / ".best.pt.x.tmp",
    ]
    for path in leftovers:
        path.write_bytes(b"half a checkpoint")
    keep = run_copy / "checkpoints" / ".notes.tmp"  # not one of ebflow's
    keep.write_text("x")
    train(None, run_copy, resume=True, overrides={"max_iters": 5}, final_outputs=False)
    assert not any(p.exists() for p in leftovers) and keep.exists()


# -- outputs that cannot be written -----------------------------------------------------------------
@pytest.fixture
def read_only(tmp_path):
    """A read-only folder; True when chmod stops this process writing there (not as root)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder, not os.access(folder, os.W_OK)
    folder.chmod(0o755)


def _deny(monkeypatch, owner, name, inside: Path, err=errno.EACCES):
    real = getattr(owner, name)

    def denied(*args, **kwargs):
        for target in (str(a) for a in args if isinstance(a, (str, Path))):
            if target.startswith(str(inside)):
                raise OSError(err, os.strerror(err), target)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, denied)


def test_train_out_in_a_read_only_folder(read_only, monkeypatch, capsys):
    folder, effective = read_only
    if not effective:
        _deny(monkeypatch, Path, "mkdir", folder)
    _fails_cleanly(
        capsys, ["train", *TINY_SETS, "--out", folder / "run"], "Permission denied", folder / "run"
    )


@pytest.mark.parametrize("where", ["no-extension", "under-a-file", "a-folder", "read-only"])
def test_sample_out_that_cannot_be_written(where, digits_run, read_only, monkeypatch, capsys):
    folder, effective = read_only
    (folder.parent / "file.txt").write_text("x")
    out = {
        "no-extension": folder.parent / "samples",
        "under-a-file": folder.parent / "file.txt" / "s.png",
        "a-folder": folder.parent,
        "read-only": folder / "s.png",
    }[where]
    if where == "a-folder":
        out = folder.parent / "d.png"
        out.mkdir()
    if where == "read-only" and not effective:
        _deny(monkeypatch, os, "open", folder)  # the picture's temporary file
    _fails_cleanly(capsys, ["sample", digits_run, "-n", "4", "--out", out], str(out))


@pytest.mark.parametrize(
    "call, err",
    [("fsync", errno.ENOSPC), ("open", errno.EACCES), ("replace", errno.EROFS)],
    ids=["disk-full", "denied", "read-only-fs"],
)
def test_a_checkpoint_that_cannot_be_written_leaves_the_last_one_and_says_how_to_resume(
    call, err, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    real, calls = getattr(os, call), {"n": 0}

    def failing(*args, **kwargs):  # the checkpoint at step 8 fails; those at 0 and 4 were written
        if call == "fsync" or ".last.pt." in str(args[0]):
            calls["n"] += 1
            if calls["n"] == (4 if call == "fsync" else 3):  # fsync: config.yaml is written first
                raise OSError(err, os.strerror(err))
        return real(*args, **kwargs)

    monkeypatch.setattr(os, call, failing)
    sets = [a for s in ("max_iters=12", "checkpoint_every=4", "eval_every=100") for a in ("--set", s)]
    line = _fails_cleanly(
        capsys,
        ["train", *TINY_SETS, *sets, "--out", run],
        os.strerror(err),
        "last.pt",
        "is intact",
        f"ebflow train --resume {run}",
    )
    monkeypatch.undo()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 4
    assert not list(run.rglob("*.tmp"))
    if call == "fsync":  # the printed command continues the run
        argv = shlex.split(line.split("continue with: ")[1])
        assert argv[:3] == ["ebflow", "train", "--resume"] and main(argv[1:]) == 0
        assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 12


def test_a_log_that_cannot_be_written_is_one_line_too(tmp_path, monkeypatch, capsys):
    from ebflow.experiment.rundir.metrics import MetricsLog

    def full(self, step, values):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(MetricsLog, "log", full)
    _fails_cleanly(
        capsys,
        ["train", *TINY_SETS, "--out", tmp_path / "run"],
        "metrics.csv",
        "No space left on device",
        "is intact",
    )


# -- the error boundary -----------------------------------------------------------------------------
def test_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    argv = ["eval", str(tmp_path / "missing")]
    _fails_cleanly(capsys, argv, "missing")
    with pytest.raises(CheckpointError):
        main(["--debug", *argv])
    with pytest.raises(CheckpointError):
        main([*argv, "--debug"])
    monkeypatch.setenv("EBFLOW_DEBUG", "1")
    with pytest.raises(EBFlowError):
        main(argv)


def test_a_stray_os_error_is_one_line(monkeypatch, capsys, digits_run):
    import ebflow.cli.evaluate as evaluate

    def broken(*args, **kwargs):
        raise IsADirectoryError(errno.EISDIR, "Is a directory", "/some/where")

    monkeypatch.setattr(evaluate, "load_run", broken)
    _fails_cleanly(capsys, ["eval", digits_run], "/some/where: Is a directory")


def test_running_out_of_memory_is_one_line(monkeypatch, capsys, digits_run):
    import ebflow.cli.evaluate as evaluate

    def huge(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(evaluate, "load_run", huge)
    _fails_cleanly(capsys, ["eval", digits_run], "out of memory")
    monkeypatch.setattr(evaluate, "load_run", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # a bug stays a traceback, to be reported
        main(["eval", str(digits_run)])


# -- signals --------------------------------------------------------------------------------------
def test_signal_handlers_stop_at_once_outside_the_loop_and_are_restored(tmp_path):
    from ebflow.cli.train import _stop_on_signals

    before = signal.getsignal(signal.SIGTERM)
    stop = StopRequest()
    with pytest.raises(TrainingInterrupted) as info, _stop_on_signals(stop, tmp_path / "r"):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):
            time.sleep(0.01)
    assert info.value.signum == signal.SIGTERM and info.value.step is None
    assert signal.getsignal(signal.SIGTERM) is before
    stop.polling = True  # inside the training loop: only a request, honoured after the step
    with _stop_on_signals(stop, tmp_path / "r"):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
    assert stop.signum == signal.SIGINT


def _logged_steps(run: Path) -> list[int]:
    path = run / "metrics.csv"
    if not path.exists():
        return []
    rows = [r.split(",") for r in path.read_text().splitlines()[1:]]
    return [int(r[0]) for r in rows if len(r) > 3 and r[3]]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_leaves_a_checkpoint_at_its_step_and_a_working_resume_command(sig, tmp_path):
    run = tmp_path / "run"
    sets = dict(
        QUIET,
        seed=5,
        max_iters=100000,
        epochs=None,
        checkpoint_every=100000,
        eval_every=100000,
        log_every=5,
        num_samples=4,
    )
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={'null' if v is None else v}")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ebflow"]
    proc = subprocess.Popen(
        cmd + ["train", "--out", str(run), *args],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while max(_logged_steps(run), default=0) < 10 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-2000:]
    step = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert step >= max(_logged_steps(run)) >= 10
    found = re.search(rf"interrupted by {sig.name} at step (\d+).*Continue with: (.+)$", err.strip())
    assert found and int(found.group(1)) == step, err[-2000:]
    resume = shlex.split(found.group(2))
    assert resume[:3] == ["ebflow", "train", "--resume"]
    done = subprocess.run(
        cmd + resume[1:] + ["--set", f"max_iters={step + 5}"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    straight = tmp_path / "straight"
    train(resolve_config("digits-fc", {**sets, "max_iters": step + 5}), straight, final_outputs=False)
    a = load_checkpoint(run / "checkpoints" / "last.pt")
    b = load_checkpoint(straight / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == step + 5
    for key in ("model",):
        assert all(torch.equal(a[key][k], b[key][k]) for k in b[key])
    assert all(torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]) for k in b["ema"]["shadow"])
