"""Everyday use of the command line (issue 19): a closed pipe, "did you mean", --help with
defaults and help for every option, `sample` without --out, a mistyped data_dir, `configs` one
line each, the sample grid's gaps, and `ebflow.load_run`."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import ebflow
from ebflow.cli import build_parser, main
from ebflow.experiment.config.resolve import list_presets
from helpers import TINY_CLI, cli_sets

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_threads(restore_threads):
    yield


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A tiny trained digits-fc run (8x8 images)."""
    run = tmp_path_factory.mktemp("everyday") / "run"
    n = torch.get_num_threads()
    try:
        assert main(["train", "--out", str(run), "--device", "cpu"] + cli_sets(TINY_CLI)) == 0
    finally:
        torch.set_num_threads(n)
    return run


# -- a closed pipe -----------------------------------------------------------------------------------
def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "EBFLOW_DEBUG": "0"}


def test_a_reader_that_closes_the_pipe_is_no_error():
    # the read end is closed before the command (still importing torch) writes anything
    proc = subprocess.Popen(
        [sys.executable, "-m", "ebflow", "configs", "--keys"],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "error" not in err.lower() and "Traceback" not in err and "Exception" not in err


def test_configs_piped_into_head_exits_0():
    proc = subprocess.run(
        ["bash", "-o", "pipefail", "-c", f"{sys.executable} -m ebflow configs | head -1"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "error" not in proc.stderr.lower()
    assert proc.stdout.split()[0] == next(iter(list_presets()))


# -- did you mean ---------------------------------------------------------------------------------------
def test_a_mistyped_preset_gets_a_suggestion(capsys):
    assert main(["train", "--config", "mnist-fcc"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'mnist-fc'?" in err and len(err.strip().splitlines()) == 1


def test_a_mistyped_command_or_choice_gets_a_suggestion(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["trian"])
    assert exc.value.code == 2 and "did you mean 'train'?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--loss", "ssmm"])
    assert "did you mean 'ssm'?" in capsys.readouterr().err


# -- --help -----------------------------------------------------------------------------------------------
def _parsers(parser: argparse.ArgumentParser, name: str = "ebflow"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_option_of_every_command_has_help_text():
    parsers = list(_parsers(build_parser()))
    assert {n for n, _ in parsers} >= {
        "ebflow train",
        "ebflow eval",
        "ebflow sample",
        "ebflow configs",
        "ebflow inpaint",
        "ebflow reproduce",
    }
    missing = [
        f"{name}: {'/'.join(a.option_strings) or a.dest}"
        for name, p in parsers
        for a in p._actions
        if not isinstance(a, argparse._SubParsersAction)
        and (not a.help or a.help == argparse.SUPPRESS or not a.help.strip())
    ]
    assert not missing, missing


@pytest.mark.parametrize(
    "command, shown",
    [
        ("eval", "(default: test)"),
        ("sample", "(default: 64)"),
        ("sample", "(default: 0)"),
        ("inpaint", "(default: constant)"),
        ("configs", "--show NAME"),
        ("train", "(default: digits-fc)"),
        ("reproduce", "(default: 0)"),
    ],
)
def test_help_of_every_command_shows_defaults(command, shown, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert shown in out
    assert "(default: None)" not in out and "(default: False)" not in out


# -- sample -------------------------------------------------------------------------------------------------
def test_sample_without_out_writes_into_the_run_and_keeps_its_samples(digits_run, capsys):
    before = (digits_run / "samples.png").read_bytes()
    assert main(["sample", str(digits_run), "-n", "4", "--device", "cpu"]) == 0
    assert (digits_run / "sample.png").is_file()
    assert str(digits_run / "sample.png") in capsys.readouterr().out
    assert (digits_run / "samples.png").read_bytes() == before


def test_sample_grid_cells_are_separated_by_grey_gaps(digits_run, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", str(digits_run), "-n", "4", "--out", str(out), "--device", "cpu"]) == 0
    img = np.asarray(Image.open(out).convert("L"), dtype=np.int32)
    cell = 32  # 8x8 digits enlarged x4
    assert img.shape == (2 * cell + 3 * 2, 2 * cell + 3 * 2)  # 2x2 cells, 2-pixel gaps
    for gap in (slice(0, 2), slice(cell + 2, cell + 4), slice(2 * cell + 4, 2 * cell + 6)):
        assert np.all(np.abs(img[gap, :] - 128) <= 1) and np.all(np.abs(img[:, gap] - 128) <= 1)


# -- data_dir -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("download", ["true", "false"])
def test_a_mistyped_data_dir_is_refused_never_created(download, tmp_path, capsys):
    typo = tmp_path / "dtaa"
    code = main(
        [
            "train",
            "--config",
            "mnist-fc",
            "--out",
            str(tmp_path / "r"),
            "--set",
            f"data_dir={typo}",
            "--set",
            f"download={download}",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert str(typo) in err and "data_dir" in err and len(err.strip().splitlines()) == 1
    assert not typo.exists() and not (tmp_path / "r").exists()


# -- configs ------------------------------------------------------------------------------------------------
def test_configs_prints_one_short_line_per_preset_and_show_gives_the_full_description(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "100")
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(list_presets())
    assert all(len(line) < 100 for line in lines), max(map(len, lines))
    name, desc = "cifar-cnn", list_presets()["cifar-cnn"]
    assert len(desc) > 200  # long enough to be cut in the list
    assert main(["configs", "--show", name]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["description"] == desc
    assert "--show NAME" in " ".join(
        build_parser()._subparsers._group_actions[0].choices["configs"].format_help().split()
    )


# -- ebflow.load_run -------------------------------------------------------------------------------------
def test_load_run_from_the_top_level_package(digits_run):
    assert "load_run" in ebflow.__all__
    run = ebflow.load_run(digits_run)
    metrics = run.evaluate("test")
    assert metrics["n"] == 20 and np.isfinite(metrics["nll"])
    results = json.loads((digits_run / "results.json").read_text())
    assert metrics["nll"] == pytest.approx(results["test_nll"], rel=1e-6)
    assert run.model.sample(3).shape == (3, *run.event_shape)
    with pytest.raises(AttributeError):
        ebflow.no_such_name  # noqa: B018


def test_main_leaves_the_library_silent_when_it_returns(capsys):
    """A notebook that calls main() and then the library sees no console handler left behind."""
    import logging
    import warnings as warnings_module

    from ebflow.cli import main as cli_main
    from ebflow.cli.console import ConsoleHandler

    logger = logging.getLogger("ebflow")
    level, formatwarning = logger.level, warnings_module.formatwarning
    assert cli_main(["configs"]) == 0
    capsys.readouterr()
    assert not any(isinstance(h, ConsoleHandler) for h in logger.handlers)
    assert logger.level == level and warnings_module.formatwarning is formatwarning
    logging.getLogger("ebflow.experiment").info("a library message")
    assert capsys.readouterr().out == ""
