"""MNIST mosaics (data ``mnist-mosaic2`` / ``mnist-mosaic3``) and the scaling presets, on small
fake MNIST IDX files: shape, determinism, k² distinct source images at the right places, splits
drawn from the right source split and never sharing an image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ebflow.errors import ConfigError
from ebflow.experiment.config.builders import build_model, build_preprocessing
from ebflow.experiment.config.resolve import resolve_config
from ebflow.experiment.data.datasets import IMAGE_DATASETS, load_data
from ebflow.experiment.data.mosaics import each_once_indices, repeated_indices, tile
from ebflow.experiment.data.splits import DataUnavailableError
from ebflow.layers import Dense
from test_data import write_fake_mnist

N_TRAIN, N_TEST, N_VAL = 60, 21, 20  # 40 training sources, 20 validation, 21 test


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    return write_fake_mnist(tmp_path_factory.mktemp("mnist"), n_train=N_TRAIN, n_test=N_TEST)


def _load(data, folder, **overrides):
    sets = {"data": data, "data_dir": str(folder), "download": False, "val_size": N_VAL, **overrides}
    return load_data(resolve_config("mnist-fc", sets).data)


def _sources(splits_mnist, split):
    """Each source image of one MNIST split as bytes -> its index (the fake images are distinct)."""
    images = splits_mnist.split(split)
    return {images[i, 0].numpy().astype(np.uint8).tobytes(): i for i in range(images.shape[0])}


def _tile_sources(mosaics, k, lookup):
    """(M, k²) index of the source image in each tile (row-major), -1 where no source matches."""
    m = mosaics.shape[0]
    out = np.full((m, k * k), -1)
    for i in range(m):
        for j in range(k * k):
            a, b = divmod(j, k)
            patch = mosaics[i, 0, 28 * a : 28 * (a + 1), 28 * b : 28 * (b + 1)]
            out[i, j] = lookup.get(patch.numpy().astype(np.uint8).tobytes(), -1)
    return out


@pytest.mark.parametrize("k", [2, 3])
def test_mosaics_tile_distinct_images_of_their_own_split(mnist_dir, k):
    mnist = _load("mnist", mnist_dir)
    mosaics = _load(f"mnist-mosaic{k}", mnist_dir)
    side, cells = 28 * k, k * k
    assert mosaics.event_shape == (1, side, side) and mosaics.num_bins == 256
    assert mosaics.train.dtype == torch.float32 and float(mosaics.train.max()) <= 255
    # training: as many mosaics as sources, each source once at every position
    assert mosaics.train.shape[0] == N_TRAIN - N_VAL
    # validation and test: each source once, N // k² mosaics
    assert mosaics.val.shape[0] == N_VAL // cells and mosaics.test.shape[0] == N_TEST // cells
    seen = {}
    for split in ("train", "val", "test"):
        found = _tile_sources(mosaics.split(split), k, _sources(mnist, split))
        assert (found >= 0).all(), f"a {split} tile is not an image of MNIST's {split} split"
        assert all(len(set(row)) == cells for row in found), "an image twice in one mosaic"
        seen[split] = {mnist.split(split)[i, 0].numpy().tobytes() for i in found.flatten()}
        if split == "train":
            for j in range(cells):  # every training image exactly once at each position
                assert sorted(found[:, j]) == list(range(N_TRAIN - N_VAL))
        else:
            assert len(set(found.flatten())) == found.size  # each image at most once per split
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"])
    assert not (seen["val"] & seen["test"])


def test_mosaics_are_deterministic_in_the_data_seed_only(mnist_dir):
    a = _load("mnist-mosaic2", mnist_dir)
    b = _load("mnist-mosaic2", mnist_dir, seed=7)  # the training seed does not change the data
    for split in ("train", "val", "test"):
        assert torch.equal(a.split(split), b.split(split))
    c = _load("mnist-mosaic2", mnist_dir, data_seed=99)
    assert not torch.equal(a.train, c.train) and not torch.equal(a.test, c.test)


def test_tile_puts_entry_j_at_grid_row_j_div_k_and_column_j_mod_k():
    images = torch.arange(10, dtype=torch.float32).reshape(10, 1, 1, 1).expand(10, 1, 2, 3)
    indices = np.array([[4, 7, 1, 0, 9, 2, 3, 5, 8], [8, 6, 5, 4, 3, 2, 1, 0, 9]])
    out = tile(images, indices, 3)
    assert out.shape == (2, 1, 6, 9)
    for i in range(2):
        for j in range(9):
            a, b = divmod(j, 3)
            assert (out[i, 0, 2 * a : 2 * a + 2, 3 * b : 3 * b + 3] == indices[i, j]).all()


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("seed", range(20))
def test_repeated_indices_are_permutation_columns_with_distinct_rows_even_at_the_smallest_n(k, seed):
    n = 2 * k * k  # the smallest n the construction guarantees; clashes are frequent here
    idx = repeated_indices(n, k, np.random.default_rng(seed))
    assert idx.shape == (n, k * k)
    assert all(sorted(idx[:, j]) == list(range(n)) for j in range(k * k))
    assert all(len(set(row)) == k * k for row in idx)


def test_each_once_indices_use_every_image_at_most_once():
    idx = each_once_indices(23, 2, np.random.default_rng(0))
    assert idx.shape == (5, 4) and len(set(idx.flatten())) == 20


def test_too_few_images_for_a_mosaic_is_a_config_error(mnist_dir):
    with pytest.raises(ConfigError, match="at least 18 source images"):
        repeated_indices(17, 3, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="needs 9 distinct images"):
        each_once_indices(8, 3, np.random.default_rng(0))
    with pytest.raises(ConfigError, match=r"train mosaics: .* got 10; lower the config key 'val_size'"):
        _load("mnist-mosaic3", mnist_dir, val_size=N_TRAIN - 10)  # 10 training sources for 3x3
    with pytest.raises(ConfigError, match=r"val mosaics: .* has 5; raise the config key 'val_size'"):
        _load("mnist-mosaic3", mnist_dir, val_size=5)


def test_missing_mnist_files_give_mnists_error(tmp_path):
    with pytest.raises(DataUnavailableError) as info:
        _load("mnist-mosaic2", tmp_path)
    msg = str(info.value)
    assert "mnist data not found" in msg and "train-images-idx3-ubyte" in msg and "data_dir" in msg


def test_mosaic_data_are_image_data():
    assert {"mnist-mosaic2", "mnist-mosaic3"} <= set(IMAGE_DATASETS)
    with pytest.raises(ConfigError, match="drop_out_of_domain"):  # the image-only rule applies
        resolve_config("mnist-mosaic2-fc", {"loss": "dsm", "map": False})


@pytest.mark.parametrize("preset, k", [("mnist-mosaic2-fc", 2), ("mnist-mosaic3-fc", 3)])
def test_mosaic_presets_are_the_mnist_fc_recipe_at_a_larger_d(mnist_dir, preset, k):
    config = resolve_config(preset, {"data_dir": str(mnist_dir), "download": False, "val_size": N_VAL})
    fc = resolve_config("mnist-fc").to_dict()
    mine = config.to_dict()
    changed = {key for key in fc if fc[key] != mine[key]}
    assert changed == {
        "name",
        "description",
        "data",
        "data_dir",
        "download",
        "val_size",
        "eval_every_seconds",
    }
    assert mine["data"] == f"mnist-mosaic{k}" and mine["eval_every_seconds"] > 0
    for loss, clip in (("fdssm", 5.0), ("ssm", None)):
        assert resolve_config(preset, {"loss": loss}).optim.grad_clip == clip
    splits = load_data(config.data)
    pre = build_preprocessing(config.preprocessing, splits.num_bins)
    model = build_model(config.model, splits.event_shape, pre, use_map=config.preprocessing.map)
    dense = [layer for layer in model.layers if isinstance(layer, Dense)]
    assert [layer.features for layer in dense] == [784 * k * k] * 2
    assert all(torch.equal(layer.weight[:3, :3], -torch.eye(3)) for layer in dense)  # weights -I
