"""The scaling table (``ebflow reproduce scaling``): its cells and budgets, the commands of its
cells, resuming, its progress, and a tiny end-to-end run on fake MNIST files of 4x4 images."""

from __future__ import annotations

import argparse
import json
import re
import shutil

import numpy as np
import pytest

from ebflow.cli import main
from ebflow.cli.reproduce import add_arguments
from ebflow.errors import ConfigError
from ebflow.experiment.config.builders import build_model, build_preprocessing
from ebflow.experiment.config.resolve import parse_overrides, resolve_config
from ebflow.experiment.reproduce.cells import cell_budget, cell_done, train_command
from ebflow.experiment.reproduce.progress import TableProgress
from ebflow.experiment.reproduce.tables import SCALING_DIMENSIONS, TABLES, cells_of, scaling_key
from ebflow.layers import Dense
from test_data import write_idx

OBJECTIVES = ["ml", "ml-lu", "ssm", "dsm", "fdssm"]


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["scaling", *argv])


def _sets(cmd: list[str]) -> dict[str, str]:
    """The ``--set`` values of a command (the last of a key wins, as in ``ebflow train``)."""
    return dict(cmd[i + 1].split("=", 1) for i, a in enumerate(cmd) if a == "--set")


def test_the_table_has_every_objective_at_every_d_with_its_budget():
    cells = TABLES["scaling"]
    assert [c.name for c in cells] == [f"d{d}-{o}" for d in (784, 3136, 7056) for o in OBJECTIVES]
    presets = {784: "mnist-fc", 3136: "mnist-mosaic2-fc", 7056: "mnist-mosaic3-fc"}
    budgets = {784: 30.0, 3136: 30.0, 7056: 60.0}
    for c in cells:
        d, label = scaling_key(c.name)
        assert (c.preset, c.budget_minutes, c.group) == (presets[d], budgets[d], str(d))
        assert c.loss == ("ml" if label.startswith("ml") else label)
        assert c.overrides.get("parameterization") == ("lu" if label == "ml-lu" else None)
        assert c.overrides["epochs"] is None and c.overrides["num_threads"] == 1
        assert c.overrides["eval_every"] >= 10**9 and c.overrides["eval_every_seconds"] > 0
    assert [c.name for c in cells_of("scaling", only=["d3136-*"])] == [f"d3136-{o}" for o in OBJECTIVES]
    with pytest.raises(ConfigError, match="not a cell of the scaling table"):
        scaling_key("d784-sml")


@pytest.mark.parametrize("cell", TABLES["scaling"], ids=lambda c: c.name)
def test_every_cell_resolves_to_a_valid_config(cell, tmp_path):
    cmd = train_command(cell, tmp_path / "cell", _args())
    sets = parse_overrides(cmd[i + 1] for i, a in enumerate(cmd) if a == "--set")
    config = resolve_config(cell.preset, {"loss": cell.loss, **sets})
    assert config.training.epochs is None and config.training.max_minutes == cell.budget_minutes
    assert config.model.parameterization == cell.overrides.get("parameterization", "full")
    assert config.bookkeeping.eval_every_seconds == SCALING_DIMENSIONS[int(cell.group)][2]
    assert config.runtime.num_threads == 1 and config.objective.loss == cell.loss


def test_ml_lu_builds_lu_dense_layers():
    cell = next(c for c in TABLES["scaling"] if c.name == "d784-ml-lu")
    config = resolve_config(cell.preset, {"loss": "ml", "parameterization": "lu"})
    pre = build_preprocessing(config.preprocessing, 256)
    model = build_model(config.model, (1, 28, 28), pre, use_map=True)
    dense = [layer for layer in model.layers if isinstance(layer, Dense)]
    assert [(layer.features, layer.parameterization) for layer in dense] == [(784, "lu")] * 2


def test_budgets_default_per_d_and_budget_minutes_overrides_every_cell(tmp_path):
    small, large = (next(c for c in TABLES["scaling"] if c.name == n) for n in ("d784-ssm", "d7056-ssm"))
    assert _sets(train_command(small, tmp_path / "a", _args()))["max_minutes"] == "30.0"
    assert _sets(train_command(large, tmp_path / "a", _args()))["max_minutes"] == "60.0"
    for cell in (small, large):
        cmd = train_command(cell, tmp_path / "a", _args("--budget-minutes", "5"))
        assert _sets(cmd)["max_minutes"] == "5.0" and _sets(cmd)["epochs"] == "null"
    assert cell_budget(large, None) == 60.0 and cell_budget(large, 5.0) == 5.0
    # a cell finished at its default budget is done at that budget, not at a larger one
    run = tmp_path / "done"
    run.mkdir()
    (run / "results.json").write_text("{}")
    (run / "cell.json").write_text(json.dumps({"budget_minutes": 60.0, "resumable_overrides": {}}))
    assert cell_done(run, cell_budget(large, None)) and not cell_done(run, cell_budget(large, 90.0))


def test_one_thread_per_cell_unless_threads_says_otherwise(tmp_path):
    cell = TABLES["scaling"][0]
    assert _sets(train_command(cell, tmp_path / "a", _args()))["num_threads"] == "1"
    assert _sets(train_command(cell, tmp_path / "a", _args("--threads", "2")))["num_threads"] == "2"
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    (tmp_path / "b" / "checkpoints" / "last.pt").write_bytes(b"")
    resumed = train_command(cell, tmp_path / "b", _args("--threads", "2"))
    assert "--resume" in resumed and _sets(resumed)["num_threads"] == "2" and "epochs" not in _sets(resumed)


def test_progress_uses_each_cells_own_budget(tmp_path):
    """'a' (1 min) waits and 'b' (3 min) waits: 4 minutes on one slot; once 'a' runs, half of it
    spent, 3.5 minutes. Fails when the ETA uses one budget for every cell."""
    progress = TableProgress(tmp_path, ["a", "b"], 0, None, 1, budgets={"a": 1.0, "b": 3.0})
    assert progress.eta_seconds() == pytest.approx(240.0)
    progress.started("a")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.csv").write_text("step,train_s\n5,30.0\n")
    assert progress.eta_seconds() == pytest.approx(210.0)
    assert TableProgress(tmp_path, ["c"], 0, None, 1).eta_seconds() is None  # no budget, no ETA


def _fake_small_mnist(folder):
    """MNIST-format IDX files of 4x4 images: the mosaics are 8x8 and 12x12 (tiny models)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    write_idx(folder / "train-images-idx3-ubyte", rng.integers(0, 256, (60, 4, 4)), True)
    write_idx(folder / "train-labels-idx1-ubyte", rng.integers(0, 10, 60), True)
    write_idx(folder / "t10k-images-idx3-ubyte", rng.integers(0, 256, (20, 4, 4)), True)
    write_idx(folder / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 20), True)
    return folder


def test_reproduce_scaling_end_to_end_then_report_only(tmp_path, capsys):
    data = _fake_small_mnist(tmp_path / "mnist")
    out = tmp_path / "rep"
    argv = [
        "reproduce",
        "scaling",
        "--only",
        "d784-ml",
        "d784-ssm",
        "d3136-ssm",
        "--budget-minutes",
        "0.005",
        "--parallel",
        "2",
        "--data-dir",
        str(data),
        "--out",
        str(out),
        *[
            a
            for s in ("val_size=20", "batch_size=10", "eval_every_seconds=0.05", "num_samples=4")
            for a in ("--set", s)
        ],
        *["--set", "tensorboard=false", "--set", "eval_batch_size=50"],
    ]
    table = out / "scaling"
    code = main(argv)
    assert code == 0, (capsys.readouterr().err, {p.name: p.read_text()[-3000:] for p in table.glob("*.log")})
    results = json.loads((table / "d3136-ssm" / "results.json").read_text())
    assert results["peak_memory_bytes"] > 10 * 2**20 and results["iterations"] > 0
    assert 10 * 2**20 < results["train_peak_memory_bytes"] <= results["peak_memory_bytes"]
    assert "data: mnist-mosaic2" in (table / "d3136-ssm" / "config.yaml").read_text()
    report = (table / "report.md").read_text()
    assert "## D = 784 (mnist-fc, 28×28)" in report and "## D = 3,136" in report
    assert "time to target (min)" in report and "## Findings" in report
    assert re.search(r"\| \d+(\.\d+)? (MiB|GiB) / \d+(\.\d+)? (MiB|GiB) \|", report)  # peak memory
    data_json = json.loads((table / "results.json").read_text())
    d784 = data_json["dimensions"][0]
    ml_curve = next(c["curve"] for c in data_json["cells"] if c["cell"] == "d784-ml")
    assert d784["target_nll"] == pytest.approx(ml_curve[-1][1])  # ML's final validation
    assert {r["objective"] for r in d784["rows"]} == {"ml", "ssm"}
    assert data_json["exponents"]["ssm"]["exponent"] is not None  # SSM at two D values
    assert (table / "val_nll_vs_time.png").stat().st_size > 0
    # --report-only rebuilds the report from the run directories without training
    logs = {p.name: p.read_text() for p in table.glob("*.log")}
    (table / "report.md").unlink()
    shutil.rmtree(table / "d784-ssm")
    assert main([*argv, "--report-only"]) == 0
    assert {p.name: p.read_text() for p in table.glob("*.log")} == logs
    rebuilt = (table / "report.md").read_text()
    assert "| SSM | not run |" in rebuilt and "| ML | finished |" in rebuilt
