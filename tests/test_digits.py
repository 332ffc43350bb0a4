"""The 8x8 digits shipped inside the package (ebflow.datasets.load_digits, no scikit-learn) and
the application's digits splits built on them."""

from __future__ import annotations

import hashlib
import importlib.util
from importlib import resources

import numpy as np
import pytest
import torch

import ebflow.datasets
from ebflow.datasets import DIGITS_BINS, DIGITS_SHA256, load_digits
from ebflow.errors import EBFlowError
from ebflow.experiment.config.resolve import resolve_config
from ebflow.experiment.data.datasets import load_data

HAVE_SKLEARN = importlib.util.find_spec("sklearn") is not None

#: SHA-256 of the train, val and test tensors' bytes of the digits splits (data_seed, val_size),
#: as the scikit-learn path made them before the data was shipped. A failure means the splits
#: changed (the shipped data, the shuffle or the split sizes; or torch's seeded randperm).
SPLIT_SHA256 = {
    (0, None): "8dde20980ff59074ea9ea8ec035781d6677faea60bda9c1680d909619846db29",
    (7, 100): "3649b2a162397eefe43c43dd6bf07dbb04227a43f25d7fbd62f189c67a069476",
}


def _splits(seed: int, val_size: int | None):
    overrides = {"data_seed": seed, **({"val_size": val_size} if val_size else {})}
    d = load_data(resolve_config("digits-fc", overrides).data)
    return d, (d.train, d.val, d.test)


def test_shipped_digits_have_their_checksum_shape_levels_and_labels():
    """Fails for a damaged or regenerated digits.npz, a wrong dtype / shape, or levels that are
    not the integers 0..16 (num_bins = 17)."""
    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert torch.equal(x, x.round()) and int(x.min()) == 0 and int(x.max()) == DIGITS_BINS - 1 == 16
    assert sorted(torch.unique(x).int().tolist()) == list(range(17))
    assert torch.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    content = x.to(torch.uint8).numpy().tobytes() + y.to(torch.uint8).numpy().tobytes()
    assert hashlib.sha256(content).hexdigest() == DIGITS_SHA256
    folder = resources.files("ebflow.datasets")
    assert folder.joinpath("digits.npz").is_file()
    notice = folder.joinpath("NOTICE").read_text()
    assert "CC BY 4.0" in notice and "Optical Recognition of Handwritten Digits" in notice
    a, _ = load_digits()
    a[0] = -1  # fresh tensors: a caller's change does not leak into the next load
    assert torch.equal(load_digits()[0], x)


def test_a_damaged_digits_file_is_an_error_not_wrong_data(monkeypatch):
    monkeypatch.setattr(ebflow.datasets, "DIGITS_SHA256", "0" * 64)
    with pytest.raises(EBFlowError, match=r"damaged.*reinstall"):
        load_digits()


@pytest.mark.skipif(not HAVE_SKLEARN, reason="scikit-learn is not installed: nothing to compare with")
def test_shipped_digits_are_scikit_learns_in_the_same_order():
    from sklearn.datasets import load_digits as sklearn_digits

    ref = sklearn_digits()
    x, y = load_digits()
    assert np.array_equal(x[:, 0].numpy().astype(np.float64), ref.images)
    assert np.array_equal(y.numpy(), ref.target)


@pytest.mark.parametrize("seed, val_size", sorted(SPLIT_SHA256, key=str))
def test_digits_splits_are_those_of_the_former_scikit_learn_path(seed, val_size):
    """Fails when the application's digits splits differ in any value or in their order from
    what ``sklearn.datasets.load_digits`` + the seeded shuffle gave (checked against
    scikit-learn when it is installed, and against pinned checksums always)."""
    d, tensors = _splits(seed, val_size)
    assert d.num_bins == 17 and d.name == "digits"
    assert [t.shape[0] for t in tensors] == [1797 - 297 - (val_size or 300), val_size or 300, 297]
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in tensors)).hexdigest()
    assert digest == SPLIT_SHA256[(seed, val_size)]
    if HAVE_SKLEARN:
        from sklearn.datasets import load_digits as sklearn_digits

        images = torch.from_numpy(sklearn_digits().images.astype(np.float32)).unsqueeze(1)
        images = images[torch.randperm(1797, generator=torch.Generator().manual_seed(seed))]
        n_val = val_size or 300
        old = (images[297 + n_val :], images[297 : 297 + n_val], images[:297])
        for new, ref in zip(tensors, old, strict=True):
            assert new.dtype == ref.dtype and torch.equal(new, ref)
