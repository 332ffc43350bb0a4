"""What a user sees while a run trains (issue 19): the bar's loss and validation NLL, one line
per validation, a time bar with a total under ``max_minutes``, ``curves.png``, grouped
TensorBoard tags with a sample grid, the divergence warning, a silent library and the CLI's
``-q``/``-v``, and ``ebflow reproduce``'s progress lines."""

from __future__ import annotations

import csv
import logging
import re
import signal
import warnings

import pytest

import ebflow.experiment.training.progress as progress_module
from ebflow.cli import main
from ebflow.experiment.config.resolve import resolve_config
from ebflow.experiment.reproduce.progress import TableProgress
from ebflow.experiment.rundir.metrics import CSV_COLUMNS
from ebflow.experiment.training.loop import Trainer
from ebflow.experiment.training.progress import diverging
from ebflow.experiment.training.run import train
from ebflow.experiment.training.state import StopRequest, TrainingDivergenceWarning, TrainingInterrupted
from helpers import cli_sets

QUIET = dict(tensorboard=False, progress=False, num_threads=1, num_samples=4)
SMALL = [
    "max_train=100",
    "max_eval=50",
    "batch_size=50",
    "num_samples=4",
    "tensorboard=false",
    "num_threads=1",
    "checkpoint_every=100",
]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(autouse=True)
def _no_cli_handler():
    """Each test starts without the handler that an earlier `main()` in this process left on the
    `ebflow` logger (the command line installs one per call)."""
    from ebflow.cli.console import ConsoleHandler

    logger = logging.getLogger("ebflow")
    saved = logger.handlers[:], logger.level
    logger.handlers = [h for h in saved[0] if not isinstance(h, ConsoleHandler)]
    yield
    logger.handlers, logger.level = saved


def _config(**kw):
    return resolve_config(
        "digits-fc",
        {
            **QUIET,
            "max_train": 100,
            "max_eval": 50,
            "batch_size": 50,
            "epochs": None,
            "max_iters": 6,
            "eval_every": 2,
            "log_every": 1,
            "checkpoint_every": 100,
            **kw,
        },
    )


# -- the bar and the validation lines ----------------------------------------------------------
def test_cli_shows_each_validation_as_a_line_and_loss_and_val_nll_in_the_bar(tmp_path, capsys):
    """Fails when the validation line is not printed (or lacks step, NLL, bits/dim, time) or the
    bar's postfix lacks the loss or the latest validation NLL."""
    run = tmp_path / "run"
    assert (
        main(
            ["train", "--out", str(run)]
            + cli_sets(SMALL + ["max_iters=6", "epochs=null", "eval_every=2", "log_every=1", "progress=true"])
        )
        == 0
    )
    captured = capsys.readouterr()
    lines = re.findall(
        r"^step (\d+): val NLL ([\d.]+) nats, ([\d.]+) bits/dim \(([\d.]+) s of training\)$",
        captured.out,
        flags=re.M,
    )
    assert [int(s) for s, *_ in lines] == [2, 4, 6]
    with open(run / "metrics.csv", newline="") as f:
        csv_vals = [float(r["val_nll"]) for r in csv.DictReader(f) if r["val_nll"]]
    assert [float(v) for _, v, _, _ in lines] == pytest.approx(csv_vals, abs=1e-4)
    bar = captured.err  # tqdm's last drawing of the bar holds the postfix
    assert re.search(r"6/6 \[.*loss=[\d.]+, val=" + f"{csv_vals[-1]:.4g}", bar), bar[-500:]


def test_time_budget_alone_gives_a_bar_over_training_seconds_with_a_total_and_an_eta(tmp_path, capsys):
    """With only max_minutes, the bar counts training seconds to the budget (a total and a
    remaining time); fails for the old step bar without a total ('6it [..., ?it/s]')."""
    run = tmp_path / "run"
    assert (
        main(
            ["train", "--out", str(run)]
            + cli_sets(
                SMALL
                + [
                    "max_iters=null",
                    "epochs=null",
                    "max_minutes=0.02",
                    "eval_every=1000",
                    "log_every=5",
                    "progress=true",
                ]
            )
        )
        == 0
    )
    bar = capsys.readouterr().err
    assert re.search(r"\d+/1 s of training \[\d+:\d+<\d+:\d+", bar), bar[-500:]
    assert "1/1 s of training" in bar  # it ends at the budget


# -- curves.png ------------------------------------------------------------------------------
def _count_drawn_validations(monkeypatch):
    """Spy on save_curves: the number of validations in metrics.csv at each drawing."""
    real, calls = progress_module.save_curves, []

    def spy(metrics_csv, out, **kw):
        with open(metrics_csv, newline="") as f:
            calls.append(sum(1 for r in csv.DictReader(f) if r["val_nll"]))
        return real(metrics_csv, out, **kw)

    monkeypatch.setattr(progress_module, "save_curves", spy)
    return calls


def test_curves_png_is_redrawn_at_every_validation_when_the_period_has_passed(tmp_path, monkeypatch):
    """Fails when curves.png is not written, or not at a validation past the drawing period."""
    calls = _count_drawn_validations(monkeypatch)
    monkeypatch.setattr(progress_module, "CURVES_EVERY_SECONDS", 0.0)
    train(_config(), tmp_path / "r")
    assert calls == [1, 2, 3]  # after each of the 3 validations, with that validation in it
    png = (tmp_path / "r" / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert not list((tmp_path / "r").glob(".curves.png*"))  # written atomically: no temp file left


def test_curves_png_is_drawn_at_most_once_per_period_and_at_the_end(tmp_path, monkeypatch):
    """Fails when every validation draws (0.2 s each: about 4 % of a small model's run),
    or when the last validation is not drawn once the run ends."""
    calls = _count_drawn_validations(monkeypatch)
    monkeypatch.setattr(progress_module, "CURVES_EVERY_SECONDS", 3600.0)
    train(_config(), tmp_path / "r")
    assert calls == [1, 3]  # the first validation, then the run's end with all three


def test_a_stopped_run_draws_its_last_validation(tmp_path, monkeypatch):
    """Fails when a run stopped by a signal leaves curves.png without its latest validation."""
    calls = _count_drawn_validations(monkeypatch)
    monkeypatch.setattr(progress_module, "CURVES_EVERY_SECONDS", 3600.0)
    stop, real = StopRequest(), progress_module.ValidationReport.__call__

    def report_then_signal(self, trainer, val, bar):
        real(self, trainer, val, bar)
        if trainer.counters.step == 4:
            stop.signum = signal.SIGTERM  # honoured after step 5: checkpoint, TrainingInterrupted

    monkeypatch.setattr(progress_module.ValidationReport, "__call__", report_then_signal)
    with pytest.raises(TrainingInterrupted):
        train(_config(), tmp_path / "r", stop=stop)
    assert calls == [1, 2]  # the first validation, then the stopped run's end with the second


def test_a_failing_plot_is_a_warning_not_a_failed_run(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise ValueError("no fonts")

    monkeypatch.setattr(progress_module, "save_curves", broken)
    with pytest.warns(RuntimeWarning, match="curves.png: no fonts"):
        result = train(_config(), tmp_path / "r")
    assert result.step == 6 and (tmp_path / "r" / "results.json").is_file()


# -- TensorBoard -------------------------------------------------------------------------------
def _tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return events.Tags()


def test_tensorboard_groups_train_val_and_test_and_shows_samples_for_images(tmp_path):
    """Fails for the flat tags ('loss', 'val_nll'), for no sample grid on image data, or for a
    changed metrics.csv header."""
    train(_config(tensorboard=True), tmp_path / "r")
    tags = _tags(tmp_path / "r")
    assert {"train/loss", "train/grad_norm", "train/lr", "val/nll", "val/bpd", "test/nll"} <= set(
        tags["scalars"]
    )
    assert all(t.split("/")[0] in ("train", "val", "test") for t in tags["scalars"])
    assert tags["images"] == ["val/samples"]
    header = (tmp_path / "r" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert (
        header
        == CSV_COLUMNS
        == [
            "step",
            "epoch",
            "train_s",
            "loss",
            "grad_norm",
            "ms_per_iter",
            "examples_per_s",
            "lr",
            "skipped_steps",
            "dropped_examples",
            "val_nll",
            "val_bpd",
            "test_nll",
            "test_bpd",
            "kl",
            "fisher",
        ]
    )


def test_tensorboard_has_no_images_for_point_data(tmp_path):
    config = resolve_config(
        "toy2d-sine",
        {
            **QUIET,
            "tensorboard": True,
            "max_iters": 4,
            "epochs": None,
            "eval_every": 2,
            "toy_train_size": 200,
            "toy_eval_size": 50,
            "toy_points": 50,
            "batch_size": 50,
        },
    )
    train(config, tmp_path / "r")
    tags = _tags(tmp_path / "r")
    assert tags["images"] == [] and "test/kl" in tags["scalars"]


# -- divergence --------------------------------------------------------------------------------
def test_divergence_threshold():
    assert not diverging(374.9, 250.0) and diverging(375.1, 250.0)  # best + 50 % of |best|
    assert not diverging(-50.0, -120.0) and diverging(-19.0, -120.0)  # best + 100 nats
    assert diverging(float("nan"), 250.0) and not diverging(1e9, float("inf"))


def test_a_validation_far_above_the_best_warns_once_and_the_run_goes_on(tmp_path, monkeypatch):
    """Scripted validations 300, 250, 360, 400, 420, 240, 600 (every 2 steps): the threshold
    (best + max(100, 50 % |best|)) is crossed at step 8 (400 > 375) and again at step 14 after a
    recovery; fails without a warning, with one at each high validation, or a stopped run."""
    scripted = iter([300.0, 250.0, 360.0, 400.0, 420.0, 240.0, 600.0])
    real_evaluate = Trainer.evaluate

    def evaluate(self, split):
        out = real_evaluate(self, split)
        return {**out, "nll": next(scripted)} if split == "val" else out

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(_config(max_iters=14), tmp_path / "r")
    msgs = [str(w.message) for w in caught if issubclass(w.category, TrainingDivergenceWarning)]
    assert len(msgs) == 2 and msgs[0].startswith("step 8:") and msgs[1].startswith("step 14:")
    assert "400" in msgs[0] and "250" in msgs[0] and "240" in msgs[1]
    assert result.step == 14 and result.best_val_nll == 240.0


def test_digits_ssm_at_a_huge_learning_rate_warns_of_divergence(tmp_path):
    """The issue's case: SSM at lr 10 blows the NLL up without a non-finite loss."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(_config(lr=10.0, max_iters=40, eval_every=4, max_nonfinite=1000), tmp_path / "r")
    assert any(issubclass(w.category, TrainingDivergenceWarning) for w in caught)


# -- logging: a silent library, a CLI with -q / -v ---------------------------------------------
def test_the_library_prints_nothing_but_logs_to_a_users_handler(tmp_path, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="ebflow"):
        train(_config(), tmp_path / "r")
    assert capsys.readouterr() == ("", "")
    assert [
        r.getMessage().split(":")[0]
        for r in caplog.records
        if r.name == "ebflow.experiment.training.progress"
    ] == ["step 2", "step 4", "step 6"]


def test_cli_quiet_hides_the_log_and_verbose_is_accepted(tmp_path, capsys):
    args = cli_sets(SMALL + ["max_iters=2", "epochs=null", "eval_every=2", "progress=false"])
    assert main(["-q", "train", "--out", str(tmp_path / "a")] + args) == 0
    assert capsys.readouterr().out == ""
    assert main(["train", "-v", "--out", str(tmp_path / "b")] + args) == 0
    out = capsys.readouterr().out
    assert "step 2: val NLL" in out and "test NLL" in out
    assert main(["train", "--out", str(tmp_path / "c"), "--quiet"] + args) == 0
    assert capsys.readouterr().out == ""


# -- ebflow reproduce's progress -----------------------------------------------------------------
def _metrics(run_dir, rows):
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)


def test_reproduce_progress_counts_cells_estimates_the_time_left_and_shows_validations(tmp_path, caplog):
    """3 cells at 1 minute each, one skipped (done): while 'b' runs at 30 of its 60 s and 'c'
    waits, 90 s are left on one slot. Fails for a wrong count, ETA or missing validation line."""
    progress = TableProgress(tmp_path, ["b", "c"], skipped=1, budget_minutes=1.0, parallel=1)
    with caplog.at_level(logging.INFO, logger="ebflow"):
        progress.started("b")
        _metrics(
            tmp_path / "b",
            [
                {"step": 10, "train_s": 20.0, "loss": 1.0},
                {"step": 10, "train_s": 20.0, "val_nll": 123.456, "val_bpd": 2.5},
                {"step": 15, "train_s": 30.0, "loss": 0.9},
            ],
        )
        progress.poll()
        progress.poll()  # nothing new: nothing shown
        progress.finished("b", 0)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "progress: 1/3 cells done, 1 running, 1 left; ETA ~2:00 of training (from the budgets)",
        "[b] step 10: val NLL 123.4560 nats, 2.5000 bits/dim (20.0 s of training)",
        "progress: 1/3 cells done, 1 running, 1 left; ETA ~1:30 of training (from the budgets)",
        "progress: 2/3 cells done, 0 running, 1 left; ETA ~1:00 of training (from the budgets)",
    ]
