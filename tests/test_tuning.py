"""The one stratified split: pinned indices, so every split the figures in docs/ rest on stays put."""

import numpy as np
import pytest

from patcher.datasets import SPECS, _split_frames, group_codes, load_frames
from patcher.tuning import stratified_split

Y = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 0, 1])
G = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2])


def test_pinned_indices_for_a_share_fractions_and_hold_one():
    assert [p.tolist() for p in stratified_split(Y, G, 0.5, 0)] == [[0, 1, 5, 7, 8, 9], [2, 3, 4, 6, 10, 11]]
    assert [p.tolist() for p in stratified_split(Y, G, (0.5, 0.25, 0.25), 3)] == [
        [1, 3, 4, 5, 8, 9], [0, 2, 6, 10, 11], [7]]
    # hold_one: every cell of two or more rows gives one row, the one-row cells (g=2) give none
    assert [p.tolist() for p in stratified_split(Y, G, 0.2, [0, 7], hold_one=True)] == [
        [0, 2, 4, 6, 10], [1, 3, 5, 7, 8, 9, 11]]


def test_the_dataset_splits_stay_where_the_figures_were_measured():
    """Through the loader's own split (its seed and shares), not a restatement of them."""
    spec = SPECS["adult"]
    full, test_file = load_frames("adult")
    train, tune, _ = _split_frames(spec, full, test_file, group_codes(full, spec.sensitive["sex"]))
    assert (len(train), len(tune)) == (21113, 9049)
    assert tune.index[:6].tolist() == [0, 3, 7, 11, 12, 14] and int(tune.index.to_numpy().sum()) == 136511766
    spec = SPECS["compas"]
    full, test_file = load_frames("compas")
    parts = _split_frames(spec, full, test_file, group_codes(full, spec.sensitive["race"]))
    assert [len(p) for p in parts] == [3703, 1234, 1235]
    assert parts[2].index[:6].tolist() == [3, 5, 14, 20, 21, 23] and int(parts[2].index.to_numpy().sum()) == 3812454


def test_every_cell_keeps_its_share_and_the_seed_decides():
    rng = np.random.default_rng(0)
    y, groups = rng.integers(0, 2, 1000), (rng.random(1000) < 0.2).astype(np.int64)
    held, fit = stratified_split(y, groups, 0.3, seed=0)
    assert len(np.intersect1d(fit, held)) == 0 and len(fit) + len(held) == 1000
    for g in (0, 1):
        for c in (0, 1):
            cell = (groups == g) & (y == c)
            assert cell[held].sum() == round(0.3 * cell.sum())
    assert np.array_equal(held, stratified_split(y, groups, 0.3, seed=0)[0])
    assert not np.array_equal(held, stratified_split(y, groups, 0.3, seed=1)[0])


def test_hold_one_needs_two_parts():
    with pytest.raises(ValueError, match="two parts"):
        stratified_split(Y, G, (0.5, 0.25, 0.25), 0, hold_one=True)
