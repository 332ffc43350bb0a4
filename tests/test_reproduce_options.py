"""``ebflow reproduce`` options of the cells: ``--seeds`` (every cell once per seed, each with its
own seed, and the report's spread over the seeds) and the compiled step where it pays."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from ebflow.cli import main
from ebflow.errors import ConfigError
from ebflow.experiment.reproduce.seeds import render_seed_summary, seed_summary, with_seeds
from ebflow.experiment.reproduce.tables import cells_of

TOY = [
    "--set",
    "max_iters=6",
    "--set",
    "eval_every=3",
    "--set",
    "checkpoint_every=3",
    "--set",
    "log_every=3",
    "--set",
    "blocks=1",
    "--set",
    "batch_size=64",
    "--set",
    "toy_train_size=256",
    "--set",
    "toy_eval_size=128",
    "--set",
    "toy_points=128",
    "--set",
    "eval_batch_size=128",
    "--set",
    "num_samples=16",
    "--set",
    "tensorboard=false",
    "--threads",
    "1",
]


def test_with_seeds_names_each_repetition_and_gives_it_its_seed():
    cells = cells_of("toy2d", ["ssm", "dsm"], ["sine-*"])
    out = with_seeds(cells, [0, 4])
    assert [c.name for c in out] == ["sine-ssm-seed0", "sine-dsm-seed0", "sine-ssm-seed4", "sine-dsm-seed4"]
    assert [c.seed for c in out] == [0, 0, 4, 4]
    assert with_seeds(cells, None) == cells
    with pytest.raises(ConfigError, match="repeat"):
        with_seeds(cells, [1, 1])


def _record(cell: str, seed: int, kl: float | None, status: str = "finished") -> dict:
    results = {"test_kl": kl} if kl is not None else {}
    return {"cell": f"{cell}-seed{seed}", "loss": "ssm", "seed": seed, "status": status, "results": results}


def test_seed_summary_is_mean_sample_std_and_range_of_the_finished_seeds():
    """Fails for a population std (n), a mean over unfinished seeds, or seeds mixed across cells."""
    records = [
        _record("sine-ssm", 0, 1.0),
        _record("sine-ssm", 1, 2.0),
        _record("sine-ssm", 2, 4.0),
        _record("sine-ssm", 3, 100.0, status="unfinished (resume with the same command)"),
        _record("swirl-ssm", 0, 0.5),
        {"cell": "no-seed", "loss": "ml", "seed": None, "status": "finished", "results": {"test_kl": 9.0}},
    ]
    rows = seed_summary(records, ["test_kl"])
    assert [r["cell"] for r in rows] == ["sine-ssm", "swirl-ssm"]
    sine, swirl = rows
    assert sine["seeds"] == [0, 1, 2] and sine["seeds_run"] == 4
    assert sine["test_kl"]["mean"] == pytest.approx(7 / 3)
    assert sine["test_kl"]["std"] == pytest.approx(statistics.stdev([1.0, 2.0, 4.0]))
    assert (sine["test_kl"]["min"], sine["test_kl"]["max"]) == (1.0, 4.0)
    assert swirl["test_kl"]["mean"] == 0.5 and math.isnan(swirl["test_kl"]["std"])
    lines = render_seed_summary(rows, [("test_kl", "KL", 2)])
    assert "| sine-ssm | ssm | 3 of 4 (0, 1, 2) | 2.33 ± 1.53 (1.00–4.00) |" in lines
    assert "| swirl-ssm | ssm | 1 of 1 (0) | 0.50 |" in lines


def test_reproduce_toy_table_over_seeds_trains_each_seed_and_reports_the_spread(tmp_path, capsys):
    out = tmp_path / "rep"
    args = ["reproduce", "toy2d", "--only", "sine-ssm", "--seeds", "0", "1", "--out", str(out), *TOY]
    assert main(args) == 0, capsys.readouterr().err
    table = out / "toy2d"
    # each repetition trained with its own seed: different initial noise, different numbers
    first = torch.load(table / "sine-ssm-seed0" / "checkpoints" / "last.pt", weights_only=False)
    second = torch.load(table / "sine-ssm-seed1" / "checkpoints" / "last.pt", weights_only=False)
    assert first["config"]["seed"] == 0 and second["config"]["seed"] == 1
    kls = [json.loads((table / f"sine-ssm-seed{s}" / "results.json").read_text())["test_kl"] for s in (0, 1)]
    assert kls[0] != kls[1]
    report = (table / "report.md").read_text()
    assert "Over seeds" in report and "| sine-ssm | ssm | 2 of 2 (0, 1) |" in report
    summary = json.loads((table / "results.json").read_text())["over_seeds"]
    assert summary[0]["test_kl"]["mean"] == pytest.approx(sum(kls) / 2)
    # the reference code's p·log p "KL" sits beside ours, in each cell and over the seeds
    refs = [json.loads((table / f"sine-ssm-seed{s}" / "results.json").read_text()) for s in (0, 1)]
    assert "KL, reference's p·log p formula" in report
    assert refs[0]["test_kl_reference"] != pytest.approx(refs[0]["test_kl"])
    mean_ref = sum(r["test_kl_reference"] for r in refs) / 2
    assert summary[0]["test_kl_reference"]["mean"] == pytest.approx(mean_ref)


def test_report_gives_the_reference_kl_and_median_fisher_of_cells_that_predate_them(tmp_path, capsys):
    """A cell whose results.json has no ``test_kl_reference`` or ``test_fisher_median`` (trained
    before they were recorded) gets them from its KL, its checkpoint and its test points: the
    values the training run itself records."""
    out = tmp_path / "rep"
    args = ["reproduce", "toy2d", "--only", "sine-ssm", "--out", str(out), *TOY]
    assert main(args) == 0, capsys.readouterr().err
    results = out / "toy2d" / "sine-ssm" / "results.json"
    recorded = json.loads(results.read_text())
    assert recorded["test_fisher_median"] != pytest.approx(recorded["test_fisher"])
    older = {k: v for k, v in recorded.items() if k not in ("test_kl_reference", "test_fisher_median")}
    results.write_text(json.dumps(older))
    assert main(["reproduce", "toy2d", "--only", "sine-ssm", "--out", str(out), "--report-only"]) == 0
    cells = json.loads((out / "toy2d" / "results.json").read_text())["cells"]
    (cell,) = [c for c in cells if c["cell"] == "sine-ssm"]
    assert cell["results"]["test_kl_reference"] == pytest.approx(recorded["test_kl_reference"], rel=1e-9)
    assert cell["results"]["test_fisher_median"] == pytest.approx(recorded["test_fisher_median"], rel=1e-9)
    report = (out / "toy2d" / "report.md").read_text()
    assert "Fisher, median per point" in report
    assert f"{recorded['test_fisher_median']:,.4f}" in report


def test_reproduce_refuses_seed_and_seeds_together_and_seeds_for_scaling(capsys):
    assert main(["reproduce", "toy2d", "--seed", "3", "--seeds", "0", "1", "--report-only"]) == 2
    assert "either --seed or --seeds" in capsys.readouterr().err
    assert main(["reproduce", "scaling", "--seeds", "0", "1", "--report-only"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["reproduce", "toy2d", "--seeds", "-1", "--report-only"]) == 2
    assert "--seeds must be in" in capsys.readouterr().err


def test_cells_where_compiling_pays_train_with_the_compiled_step(tmp_path):
    """The CNN and Glow SSM cells (with MaP) pass ``compile=true`` to their run; the others, and
    the no-MaP ablation cells (a Logit in the flow breaks the graph), do not."""
    import argparse

    from ebflow.experiment.reproduce.cells import train_command

    args = argparse.Namespace(budget_minutes=1.0, threads=1, data_dir=None, overrides=[], seed=0, device=None)

    def compiled(table: str, name: str) -> bool:
        (cell,) = [c for c in cells_of(table) if c.name == name]
        return "compile=true" in train_command(cell, tmp_path / name, args)

    assert compiled("mnist-cnn", "ssm") and compiled("cifar-cnn", "ssm") and compiled("glow", "ssm")
    assert compiled("ablation", "cnn-ssm-ema-map")
    assert not compiled("ablation", "cnn-ssm-ema-nomap") and not compiled("ablation", "fc-ssm-ema-map")
    assert not any(compiled("mnist-cnn", loss) for loss in ("ml", "sml", "dsm", "fdssm"))
    assert not any(compiled("mnist-fc", loss) for loss in ("ml", "sml", "ssm", "dsm", "fdssm"))
