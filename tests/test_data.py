"""Data loading: generated toys, digits, local MNIST / CIFAR-10 files, errors."""

from __future__ import annotations

import dataclasses
import gzip
import pickle

import numpy as np
import pytest
import torch

from ebflow.errors import ConfigError, InputError
from ebflow.experiment.config.resolve import resolve_config
from ebflow.experiment.data.datasets import load_data
from ebflow.experiment.data.image_sets import read_idx
from ebflow.experiment.data.splits import DataUnavailableError, check_data
from ebflow.experiment.data.toys import mm10_sample


def _data_config(name, **overrides):
    """The data section of a preset with overrides (what load_data reads)."""
    return resolve_config(name, overrides).data


def write_idx(path, array, compress):
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_fake_mnist(folder, n_train=60, n_test=20, compress=True, seed=0):
    """Four IDX files named as torchvision names them, with random images."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte", rng.integers(0, 256, (n_train, 28, 28)), compress)
    write_idx(folder / "train-labels-idx1-ubyte", rng.integers(0, 10, n_train), compress)
    write_idx(folder / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28)), compress)
    write_idx(folder / "t10k-labels-idx1-ubyte", rng.integers(0, 10, n_test), compress)
    return folder


def write_fake_cifar(folder, per_batch=10, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": list(rng.integers(0, 10, per_batch)),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return folder


@pytest.mark.parametrize("name", ["toy2d-sine", "toy2d-swirl", "toy2d-checkerboard"])
def test_toy_data_is_seeded_and_smoothed(name):
    cfg = _data_config(name, toy_train_size=300, toy_eval_size=100, toy_points=50)
    a, b = load_data(cfg), load_data(cfg)
    assert torch.equal(a.train, b.train) and a.train.shape == (300, 2) and a.test.shape == (100, 2)
    assert a.mixture is not None and a.mixture.centres.shape == (50, 2) and a.mixture.noise == 0.375
    assert not torch.equal(a.val, a.test)
    other = load_data(_data_config(name, toy_train_size=300, toy_eval_size=100, toy_points=50, data_seed=5))
    assert not torch.equal(a.train, other.train)


def test_mm10_is_ten_dimensional_and_multimodal():
    x = mm10_sample(4000, torch.Generator().manual_seed(0))
    assert x.shape == (4000, 10) and torch.isfinite(x).all()
    # every coordinate after the first has two modes, one of each sign, away from 0
    for i in range(1, 10):
        assert 0.3 < float((x[:, i] > 0).double().mean()) < 0.7
        assert float((x[:, i].abs() < 0.02 * 2 ** (i + 1)).double().mean()) < 0.1


def test_digits_have_17_levels_and_fixed_splits():
    d = load_data(_data_config("digits-fc"))
    assert d.num_bins == 17 and d.event_shape == (1, 8, 8)
    assert (d.train.shape[0], d.val.shape[0], d.test.shape[0]) == (1200, 300, 297)
    assert float(d.train.max()) == 16 and float(d.train.min()) == 0


@pytest.mark.parametrize("compress", [True, False])
def test_local_mnist_files_plain_or_gzip(tmp_path, compress):
    folder = write_fake_mnist(tmp_path / "m", compress=compress)
    d = load_data(_data_config("mnist-fc", data_dir=str(folder), val_size=10, download=False))
    assert d.train.shape == (50, 1, 28, 28) and d.val.shape == (10, 1, 28, 28)
    assert d.test.shape == (20, 1, 28, 28) and d.num_bins == 256
    raw = read_idx(folder / ("train-images-idx3-ubyte" + (".gz" if compress else "")))
    assert torch.equal(d.val, torch.from_numpy(raw[-10:].astype(np.float32)).unsqueeze(1))


def test_torchvision_folder_layout_is_found(tmp_path):
    write_fake_mnist(tmp_path / "MNIST" / "raw")
    d = load_data(_data_config("mnist-fc", data_dir=str(tmp_path), val_size=10, download=False))
    assert d.train.shape[0] == 50


def test_missing_mnist_offline_says_what_to_download_and_where(tmp_path):
    with pytest.raises(DataUnavailableError) as info:
        load_data(_data_config("mnist-fc", data_dir=str(tmp_path), download=False))
    msg = str(info.value)
    assert "train-images-idx3-ubyte" in msg and str(tmp_path) in msg and "data_dir" in msg


def test_truncated_idx_file_is_rejected(tmp_path):
    folder = write_fake_mnist(tmp_path, compress=False)
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(InputError, match="truncated"):
        load_data(_data_config("mnist-fc", data_dir=str(folder), val_size=10, download=False))


def test_val_size_must_leave_training_images(tmp_path):
    folder = write_fake_mnist(tmp_path)
    with pytest.raises(ConfigError, match="val_size"):
        load_data(_data_config("mnist-fc", data_dir=str(folder), val_size=60, download=False))


def test_local_cifar_batches(tmp_path):
    folder = write_fake_cifar(tmp_path / "cifar-10-batches-py")
    # data_dir may name the folder that holds the unpacked archive, or the archive's folder itself
    for data_dir in (tmp_path, folder):
        d = load_data(_data_config("cifar-fc", data_dir=str(data_dir), val_size=5, download=False))
        assert d.train.shape == (45, 3, 32, 32) and d.val.shape == (5, 3, 32, 32)
        assert d.test.shape == (10, 3, 32, 32)


def test_cifar_batch_with_code_is_refused(tmp_path):
    folder = write_fake_cifar(tmp_path)

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Payload()}, f)
    with pytest.raises(InputError, match="refusing"):
        load_data(_data_config("cifar-fc", data_dir=str(folder), val_size=5, download=False))


def test_points_file_with_nan_is_rejected_at_load_time(tmp_path):
    pts = np.random.default_rng(0).normal(size=(50, 3))
    good = tmp_path / "good.npy"
    np.save(good, pts)
    d = load_data(_data_config("mm10-full", data="points", data_file=str(good)))
    assert d.train.shape == (40, 3) and d.val.shape == (5, 3) and d.test.shape == (5, 3)
    pts[17, 1] = np.nan
    pts[30, 0] = np.inf
    bad = tmp_path / "bad.npy"
    np.save(bad, pts)
    with pytest.raises(InputError, match=r"1 NaN, 1 Inf.*index 17"):
        load_data(_data_config("mm10-full", data="points", data_file=str(bad)))


def test_points_without_a_file_is_a_config_error_even_in_a_hand_built_config():
    """validate_config wants data_file for data=points; a DataConfig changed by hand (no
    validation) gets the same ConfigError from load_data, not a TypeError from Path(None)."""
    cfg = dataclasses.replace(_data_config("mm10-full"), dataset="points", data_file=None)
    with pytest.raises(ConfigError, match="data_file"):
        load_data(cfg)


def test_check_data_rejects_non_finite_and_empty():
    with pytest.raises(InputError, match="non-finite"):
        check_data(torch.tensor([[0.0, float("nan")]]), "x")
    with pytest.raises(InputError, match="empty"):
        check_data(torch.zeros(0, 2), "x")


@pytest.mark.parametrize(
    "name, shape", [("synthetic-mnist", (1, 28, 28)), ("synthetic-cifar10", (3, 32, 32))]
)
def test_synthetic_stand_ins_have_the_real_shapes(name, shape):
    d = load_data(_data_config("mnist-fc", data=name, max_train=20, max_eval=5))
    assert d.event_shape == shape and d.train.shape[0] == 20 and d.test.shape[0] == 5
    assert float(d.train.min()) >= 0 and float(d.train.max()) <= 255
    assert torch.equal(d.train, d.train.floor())
