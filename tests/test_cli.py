"""The `ebflow` command line: every preset end to end on tiny sizes, eval, sample, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ebflow.cli import build_parser, main
from ebflow.experiment.config.resolve import list_presets
from helpers import TINY_CLI, cli_sets

#: the tiny CLI run, plus small sizes for the point-data presets (toy2d, mm10)
TINY = [*TINY_CLI, "toy_train_size=200", "toy_eval_size=50", "toy_points=50"]
SHRINK = {  # keep the architecture family, cut the cost (log-det of 3072x3072 convolutions)
    "mnist-glow": ["steps=1", "hidden=16"],  # the paper's layer types, not its 512-wide conditioners
    "mnist-glow-small": ["steps=2"],
    "cifar-cnn": ["kernel_size=3", "blocks=2"],
    "mnist-cnn": ["kernel_size=3"],
}


@pytest.fixture(autouse=True)
def _restore_threads(restore_threads):
    yield


def test_configs_lists_every_preset_with_one_line(capsys):
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(list_presets())
    assert len(lines) == 16
    assert main(["configs", "--keys"]) == 0 and "sigma" in capsys.readouterr().out
    assert main(["configs", "--show", "mnist-fc"]) == 0 and "lr: 0.0001" in capsys.readouterr().out


@pytest.mark.parametrize("name", list(list_presets()))
def test_every_preset_trains_evaluates_and_samples(name, tmp_path, capsys):
    extra = list(SHRINK.get(name, []))
    if name.startswith(("mnist", "cifar")):
        extra.append("data=synthetic-" + ("mnist" if name.startswith("mnist") else "cifar10"))
    run = tmp_path / "run"
    assert (
        main(["train", "--config", name, "--out", str(run), "--device", "cpu"] + cli_sets(TINY + extra)) == 0
    )
    out = capsys.readouterr().out
    assert "test NLL" in out and "bits/dim" in out
    for f in (
        "config.yaml",
        "metrics.csv",
        "results.json",
        "samples.png",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
    ):
        assert (run / f).is_file(), f
    assert (run / "density.png").is_file() == name.startswith("toy2d")
    if name.startswith("cifar"):
        return  # eval/sample below are the same code for every preset; D=3072 log-dets are slow
    assert main(["eval", str(run), "--split", "val", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["split"] == "val" and metrics["nll"] == metrics["nll"]  # finite, not NaN
    assert ("kl" in metrics) == name.startswith("toy2d")
    assert (
        main(["sample", str(run / "checkpoints" / "last.pt"), "-n", "6", "--out", str(tmp_path / "s.png")])
        == 0
    )
    assert (tmp_path / "s.png").stat().st_size > 0


def test_toy_run_writes_tensorboard_events_and_metrics(tmp_path, capsys):
    run = tmp_path / "run"
    items = [s for s in TINY if not s.startswith("tensorboard")] + ["tensorboard=true"]
    assert (
        main(["train", "--config", "toy2d-sine", "--loss", "dsm", "--out", str(run)] + cli_sets(items)) == 0
    )
    assert any((run / "tensorboard").iterdir())
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    for col in ("loss", "val_nll", "val_bpd", "grad_norm", "ms_per_iter", "lr"):
        assert col in header
    out = capsys.readouterr().out
    assert "KL(data||model)" in out and "Fisher divergence" in out and "median per point" in out


def test_default_train_end_to_end_with_fewer_iterations(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "ebflow", "train", "--set", "epochs=3", "--set", "eval_every=12"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "digits-fc" in proc.stdout and "bits/dim" in proc.stdout
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "samples.png").is_file() and (run / "checkpoints" / "best.pt").is_file()
    assert json.loads((run / "results.json").read_text())["iterations"] == 36
    assert "it/s" in proc.stderr  # the tqdm bar


def test_config_errors_exit_cleanly_naming_the_key(capsys):
    assert main(["train", "--set", "sigma=-1"]) == 2
    assert "'sigma'" in capsys.readouterr().err
    assert main(["train", "--set", "learning_rate=0.1"]) == 2
    assert "'learning_rate'" in capsys.readouterr().err
    assert main(["train", "--config", "no-such-preset"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--loss", "mle"])


def test_corrupted_checkpoint_gives_a_clear_error_not_a_traceback(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", "mm10-lu", "--out", str(run)] + cli_sets(TINY)) == 0
    capsys.readouterr()
    ckpt = run / "checkpoints" / "last.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 3])
    assert main(["eval", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert "truncated, corrupted" in err and "Traceback" not in err
    assert main(["train", "--resume", str(run)]) == 2
    assert "last.pt" in capsys.readouterr().err


def test_missing_mnist_offline_is_a_clear_error(tmp_path, capsys):
    code = main(
        [
            "train",
            "--config",
            "mnist-fc",
            "--out",
            str(tmp_path / "r"),
            "--set",
            f"data_dir={tmp_path}",
            "--set",
            "download=false",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and str(tmp_path) in err
    assert not (tmp_path / "r").exists()  # no empty run directory left behind


def test_resume_refuses_config_and_out(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--config", "mnist-fc"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_every_command_is_registered():
    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"train", "eval", "sample", "configs", "inpaint", "reproduce"} <= set(choices)


@pytest.mark.parametrize("use_map", ["true", "false"])
def test_sample_refine_runs_in_the_model_input_space(tmp_path, use_map, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--set", f"map={use_map}"] + cli_sets(TINY)) == 0
    out = tmp_path / "refined.png"
    assert main(["sample", str(run), "-n", "9", "--refine", "5", "--out", str(out)]) == 0, (
        capsys.readouterr().err
    )
    assert out.stat().st_size > 0


def test_configs_show_resolves_the_recipe_of_an_objective(capsys):
    assert main(["configs", "--show", "mnist-cnn", "--loss", "ml"]) == 0
    ml = capsys.readouterr().out
    assert main(["configs", "--show", "mnist-cnn", "--loss", "ssm"]) == 0
    ssm = capsys.readouterr().out
    assert "lr_decay: 0.925" in ml and "weight_decay: 1.0e-05" in ml
    assert "lr_decay: 0.95" in ssm and "weight_decay: 0.0" in ssm
