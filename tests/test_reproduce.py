"""``ebflow reproduce``: cells, budgets, resuming, and the report next to the paper's values
(tiny budgets on generated MNIST-shaped data)."""

from __future__ import annotations

import json

import pytest

from ebflow.cli import main
from ebflow.errors import ConfigError
from ebflow.experiment.reproduce.report import _claims, collect, render_report, zoom_limits
from ebflow.experiment.reproduce.seeds import render_seed_summary, seed_summary
from ebflow.experiment.reproduce.tables import PAPER_BATCHES_PER_S, PAPER_TOLERANCE, TABLES, cells_of

TINY = [
    "--set",
    "data=synthetic-mnist",
    "--set",
    "max_train=200",
    "--set",
    "max_eval=100",
    "--set",
    "eval_every=5",
    "--set",
    "checkpoint_every=5",
    "--set",
    "log_every=5",
    "--set",
    "num_samples=4",
    "--set",
    "tensorboard=false",
    "--set",
    "batch_size=50",
    "--threads",
    "1",
]


def test_tables_hold_the_papers_values():
    fc = {c.loss: c.paper for c in TABLES["mnist-fc"]}
    assert fc == {"ml": 1092.4, "sml": 1092.3, "ssm": 1092.8, "dsm": 1099.2, "fdssm": 1104.1}
    assert {c.loss: c.paper for c in TABLES["cifar-cnn"]}["fdssm"] == 11766.0
    ablation = {c.name: c for c in TABLES["ablation"]}
    assert len(ablation) == 18
    assert ablation["fc-dsm-noema-nomap"].overrides == {
        "ema_decay": 0.0,
        "map": False,
        "drop_out_of_domain": True,
    }
    assert ablation["cnn-ssm-ema-nomap"].overrides == {"map": False}
    assert ablation["fc-fdssm-ema-map"].paper == 1104.1
    assert {c.name for c in TABLES["mm10"]} == {"full", "tril", "triu", "lu"}
    assert [c.paper for c in TABLES["glow"]] == [728.0, None]


def test_cell_selection():
    assert [c.loss for c in cells_of("mnist-fc", ["ml", "dsm"])] == ["ml", "dsm"]
    assert {c.name for c in cells_of("ablation", only=["fc-ssm-*"])} == {
        "fc-ssm-noema-nomap",
        "fc-ssm-ema-nomap",
        "fc-ssm-ema-map",
    }
    with pytest.raises(ConfigError, match="unknown table"):
        cells_of("imagenet")
    with pytest.raises(ConfigError, match="no cell"):
        cells_of("mm10", only=["nothing-*"])


def test_reproduce_trains_resumes_and_reports(tmp_path, capsys):
    out = tmp_path / "rep"
    args = [
        "reproduce",
        "mnist-fc",
        "--objectives",
        "ml",
        "dsm",
        "--budget-minutes",
        "0.01",
        "--parallel",
        "2",
        "--out",
        str(out),
        *TINY,
    ]
    assert main(args) == 0, capsys.readouterr().err
    table = out / "mnist-fc"
    for cell in ("ml", "dsm"):
        results = json.loads((table / cell / "results.json").read_text())
        assert results["iterations"] > 0 and results["threads"] == 1
        assert json.loads((table / cell / "cell.json").read_text())["budget_minutes"] == 0.01
    report = (table / "report.md").read_text()
    assert "| ml | ml | 1,092.4 |" in report and "| dsm | dsm | 1,099.2 |" in report
    data = json.loads((table / "results.json").read_text())
    assert [c["status"] for c in data["cells"]] == ["finished", "finished"]
    assert all(c["diff"] == pytest.approx(c["ours"] - c["paper"]) for c in data["cells"])
    assert (table / "val_nll_vs_time.png").stat().st_size > 0
    # overall progress and each cell's last validation (read from its metrics.csv) were shown
    printed = capsys.readouterr().out
    assert "progress: 2/2 cells done, 0 running, 0 left" in printed
    assert "progress: 0/2 cells done, 1 running, 1 left; ETA" in printed
    for cell in ("ml", "dsm"):
        assert f"[{cell}] step " in printed and "val NLL" in printed

    # a rerun at the same budget trains nothing
    assert main(args) == 0
    assert capsys.readouterr().out.count("finished at this budget; skipped") == 2

    # an interrupted cell (checkpoint, no results) resumes from its checkpoint; a larger budget
    # continues a finished cell
    (table / "dsm" / "results.json").unlink()
    (table / "dsm" / "cell.json").unlink()
    before = json.loads((table / "ml" / "results.json").read_text())["iterations"]
    assert main([*args[:5], "--budget-minutes", "0.02", *args[7:]]) == 0
    assert "--resume" in (table / "dsm.log").read_text()
    after = json.loads((table / "ml" / "results.json").read_text())["iterations"]
    assert after > before


def test_reproduce_continues_finished_cells_to_more_epochs(tmp_path, capsys):
    """``--set epochs=N`` reaches resumed cells: a cell that stopped at 1 epoch continues to 2
    (4 steps of batch 50 per epoch); a non-resumable key (lr) shapes new cells only."""
    out = tmp_path / "rep"
    base = [
        "reproduce",
        "mnist-fc",
        "--objectives",
        "dsm",
        "--out",
        str(out),
        *TINY,
        "--set",
        "max_iters=null",
    ]
    assert main([*base, "--set", "epochs=1"]) == 0, capsys.readouterr().err
    run = out / "mnist-fc" / "dsm"
    first = json.loads((run / "results.json").read_text())
    assert (first["iterations"], first["epochs"]) == (4, 1)
    assert main([*base, "--set", "epochs=1"]) == 0  # same stopping rule: nothing to do
    assert "finished at this budget; skipped" in capsys.readouterr().out
    assert main([*base, "--set", "epochs=2", "--set", "lr=0.5"]) == 0, capsys.readouterr().err
    second = json.loads((run / "results.json").read_text())
    assert (second["iterations"], second["epochs"]) == (8, 2)
    log = (out / "mnist-fc" / "dsm.log").read_text().splitlines()
    resumed = [line for line in log if "--resume" in line]
    assert resumed and "epochs=2" in resumed[-1] and "lr=0.5" not in resumed[-1]


def test_report_marks_cells_not_run_and_checks_the_claims(tmp_path):
    cells = cells_of("mnist-fc")
    records = collect("mnist-fc", cells, tmp_path)
    assert {r["status"] for r in records} == {"not run"}
    fake = []
    for r, ours in zip(records, (1093.0, 1094.0, 1095.0, 1100.0, 1200.0), strict=True):
        fake.append(
            {
                **r,
                "status": "finished",
                "ours": ours,
                "diff": ours - r["paper"],
                "rel_diff": (ours - r["paper"]) / r["paper"],
                "results": {
                    "test_nll": ours,
                    "iterations": 10,
                    "checkpoint_step": 8,
                    "train_seconds": 60.0,
                    "ms_per_iter": 6.0,
                    "test_bpd": 2.0,
                    "device": "cpu",
                    "threads": 1,
                },
            }
        )
    text = render_report("mnist-fc", fake, "test machine")
    assert "Within 1 % of the paper (this table's target): 4 of 5" in text
    assert "iterations (evaluated / trained)" in text and text.count("| 8 / 10 |") == 5
    assert "Our order (best first): ML 1093.0 < SML 1094.0 < SSM 1095.0 < DSM 1100.0 < FDSSM 1200.0" in text


def test_report_counts_a_convolutional_cell_within_its_two_percent_target(tmp_path):
    """MNIST-CNN's target is 2 %, MNIST-FC's 1 %: a cell 1.5 % off counts for the first only
    (catches a report that applies one tolerance to every table)."""
    assert PAPER_TOLERANCE.keys() == PAPER_BATCHES_PER_S.keys()  # every likelihood table has one
    for table, expected in (
        ("mnist-cnn", "Within 2 % of the paper (this table's target): 1 of 1 finished cells (ssm)"),
        ("mnist-fc", "Within 1 % of the paper (this table's target): 0 of 1 finished cells."),
    ):
        rec = next(r for r in collect(table, cells_of(table), tmp_path) if r["cell"] == "ssm")
        ours = rec["paper"] * 1.015
        rec.update(
            status="finished", ours=ours, diff=ours - rec["paper"], rel_diff=0.015, results={"test_nll": ours}
        )
        assert expected in render_report(table, [rec], "test machine")


def test_report_says_which_cells_failed_and_why_from_their_last_attempt(tmp_path):
    """A cell whose last ``ebflow train`` call failed (e.g. diverged) is "failed: <reason>", not
    "unfinished": resuming it at the same settings fails again. A failure followed by a resume
    that is still running or was interrupted to be resumed is not a failure."""
    cells = [c for c in cells_of("toy2d") if c.name in ("sine-sml", "sine-ssm", "sine-dsm")]
    table = tmp_path / "toy2d"
    for cell in cells:
        (table / cell.name / "checkpoints").mkdir(parents=True)
        (table / cell.name / "checkpoints" / "last.pt").write_bytes(b"")
    diverged = (
        "error: training stopped at step 154: 20 consecutive steps were skipped (non-finite loss; "
        "40 skipped in all). The parameters of the last finite step are in /x/last.pt; lower the lr"
    )
    (table / "sine-sml.log").write_text(f"$ python -m ebflow train --config a\ntraining\n{diverged}\n")
    # failed once, then resumed and interrupted by the session's deadline: resumable
    (table / "sine-ssm.log").write_text(
        f"$ python -m ebflow train --config a\n{diverged}\n$ python -m ebflow train --resume r\n"
        "interrupted by SIGTERM at step 90; checkpoint written\n"
    )
    (table / "sine-dsm.log").write_text("$ python -m ebflow train --config a\nstep 3: val NLL 5.0\n")
    status = {r["cell"]: r["status"] for r in collect("toy2d", cells, tmp_path)}
    assert status["sine-sml"] == (
        "failed: training stopped at step 154: 20 consecutive steps were skipped (non-finite loss; "
        "40 skipped in all)"
    )
    assert status["sine-ssm"] == status["sine-dsm"] == "unfinished (resume with the same command)"
    repeated = [{**r, "cell": f"{r['cell']}-seed0", "seed": 0} for r in collect("toy2d", cells, tmp_path)]
    lines = render_seed_summary(seed_summary(repeated, ["test_kl"]), [("test_kl", "KL", 2)])
    assert "| sine-sml | sml | 0 of 1; failed: 0 | – |" in lines


def test_zoomed_plot_range_shows_the_paper_and_the_end_of_each_curve_not_its_start():
    records = [
        {
            "curve": [(0.0, 5000.0), (60.0, 1300.0), (120.0, 1110.0), (180.0, 1112.0)],
            "paper": 1092.4,
            "metric": "nll",
        },
        {"curve": [(0.0, 4000.0), (60.0, 1150.0)], "paper": 1104.1, "metric": "nll"},
    ]
    lo, hi = zoom_limits(records)
    assert lo < 1092.4 and hi > 1150.0  # the paper's lines, every best and last value
    assert hi < 1300.0  # the early values (1,300 .. 5,000 nats) are outside the zoom
    assert zoom_limits([{"curve": [], "paper": None, "metric": "nll"}]) is None
    # a cell still running (its last value 1,420) does not widen the zoom of the finished ones
    finished = [{**r, "status": "finished"} for r in records]
    running = {
        "curve": [(0.0, 3000.0), (2.0, 1420.0)],
        "paper": 1104.1,
        "metric": "nll",
        "status": "unfinished",
    }
    assert zoom_limits([*finished, running]) == zoom_limits(finished)
    # a lone finished curve ending on its best value (27,812.9 nats) still gets a readable range
    lone = [
        {"curve": [(0.0, 40000.0), (60.0, 27812.9)], "paper": None, "metric": "nll", "status": "finished"}
    ]
    lo, hi = zoom_limits(lone)
    assert lo < 27812.9 < hi and hi - lo == pytest.approx(0.01 * 27812.9)


@pytest.mark.parametrize("dropped, claim", [(0.5, "EMA helps, MaP helps."), (1.0, "dropped every example")])
def test_ablation_claims_skip_cells_that_dropped_every_example(dropped, claim):
    records = []
    for cell, ours in zip(cells_of("ablation", only=["cnn-dsm-*"]), (3000.0, 2900.0, 1200.0), strict=True):
        share = dropped if "nomap" in cell.name else 0.0
        records.append(
            {
                "cell": cell.name,
                "loss": cell.loss,
                "paper": cell.paper,
                "status": "finished",
                "ours": ours,
                "results": {"dropped_fraction": share},
            }
        )
    line = next(t for t in _claims("ablation", records) if t.startswith("- CNN DSM"))
    assert claim in line and ("helps" in line) is (dropped < 1)


def test_reproduce_refuses_bad_options(capsys):
    assert main(["reproduce", "mnist-fc", "--parallel", "0"]) == 2
    assert "--parallel" in capsys.readouterr().err
    assert main(["reproduce", "mnist-fc", "--budget-minutes", "-1"]) == 2
    assert main(["reproduce", "mnist-fc", "--objectives", "xyz"]) == 2
    assert main(["reproduce", "mnist-fc", "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err


@pytest.mark.parametrize("table", ["cifar-fc", "cifar-cnn"])
def test_cifar_rows_run_end_to_end_on_cifar_format_files(tmp_path, table, capsys):
    """CIFAR-10 cannot be downloaded here: the CIFAR rows run on generated files in the
    CIFAR-10 python-batch format (the same reader as the real data), with augmentation."""
    from test_data import write_fake_cifar

    data = write_fake_cifar(tmp_path / "cifar-10-batches-py", per_batch=40)
    out = tmp_path / "rep"
    sets = [
        "--set",
        "val_size=50",
        "--set",
        "max_eval=40",
        "--set",
        "eval_every=2",
        "--set",
        "checkpoint_every=2",
        "--set",
        "num_samples=4",
        "--set",
        "tensorboard=false",
        "--set",
        "batch_size=25",
    ]
    code = main(
        [
            "reproduce",
            table,
            "--objectives",
            "dsm",
            "--budget-minutes",
            "0.01",
            "--data-dir",
            str(tmp_path),
            "--out",
            str(out),
            "--threads",
            "1",
            *sets,
        ]
    )
    assert code == 0, capsys.readouterr().err
    results = json.loads((out / table / "dsm" / "results.json").read_text())
    assert results["iterations"] > 0
    config = (out / table / "dsm" / "config.yaml").read_text()
    assert "augment: true" in config and "data: cifar10" in config and "energy_reg: 1.024" in config
    assert ("spectral_norm: true" in config) == (table == "cifar-cnn")  # the CIFAR-CNN DSM recipe
    assert "| dsm | dsm |" in (out / table / "report.md").read_text()
    assert data.exists()
