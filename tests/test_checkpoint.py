"""Atomic, verified checkpoints: round trip, corruption, truncation, mismatch."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from ebflow.experiment.rundir.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    state_digest,
)


def _state():
    return {
        "config": {"name": "x"},
        "model": {"w": torch.randn(50, 50)},
        "ema": {"shadow": {"w": torch.randn(50, 50)}, "decay": 0.9, "num_updates": 3},
        "step": 7,
        "rng": {"cpu": torch.get_rng_state()},
        "best": float("inf"),
    }


def test_round_trip_keeps_every_value(tmp_path):
    state = _state()
    path = save_checkpoint(tmp_path / "c" / "last.pt", state)
    loaded = load_checkpoint(path)
    assert loaded["step"] == 7 and loaded["config"] == {"name": "x"}
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert torch.equal(loaded["rng"]["cpu"], state["rng"]["cpu"])
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left


def test_digest_of_a_fixed_state_is_pinned_so_older_checkpoints_still_verify():
    # the digest is over each tensor's bytes (non-contiguous, bool, bfloat16, empty included);
    # hashing them any other way would reject every checkpoint written before as "corrupted"
    state = {
        "model": {
            "w": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),
            "b": torch.linspace(-1, 1, 5, dtype=torch.float64),
        },
        "counts": torch.tensor([3, -7], dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "half": torch.arange(4, dtype=torch.bfloat16),
        "empty": torch.empty(0, 3),
        "step": 7,
        "name": "x",
        "lr": [1e-4, 0.5],
    }
    assert state_digest(state) == "3c5d466d665476bfed66850484e8a463a9ba2995f795b702574a203e38b993aa"


def test_digest_changes_with_any_tensor_byte():
    state = _state()
    before = state_digest(state)
    state["model"]["w"][3, 4] += 1e-6
    assert state_digest(state) != before


def test_failed_save_leaves_the_old_checkpoint_and_no_temp_file(tmp_path):
    path = save_checkpoint(tmp_path / "last.pt", _state())
    old = path.read_bytes()
    # a local lambda cannot be pickled: AttributeError up to Python 3.13, PicklingError from 3.14
    with pytest.raises((pickle.PicklingError, AttributeError)):
        save_checkpoint(path, {**_state(), "bad": lambda: 0})
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["last.pt"]


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path / "last.pt", _state())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupted"):
        load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(path)


def test_flipped_byte_inside_a_tensor_is_detected(tmp_path):
    path = save_checkpoint(tmp_path / "last.pt", _state())
    data = bytearray(path.read_bytes())
    # Flip a byte in the middle of the first tensor's storage (the zip stores it uncompressed).
    target = torch.load(path, weights_only=True)["model"]["w"].numpy().tobytes()
    at = bytes(data).find(target[:64])
    assert at > 0
    data[at + 1000] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_foreign_and_missing_files_are_rejected(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="not an ebflow checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(text)


def test_checkpoint_with_code_is_refused_by_weights_only(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "ebflow-checkpoint", "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="was refused") as info:
        load_checkpoint(path)
    assert "posix.system" in str(info.value) or "os.system" in str(info.value)
    assert "weights_only" not in str(info.value)  # no advice to load it unsafely
