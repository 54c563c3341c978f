"""Colored and noisy digits: shapes, the color/label agreement per split, label noise, the reference CNN."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from patcher.digits import load_digits_dataset, reference_cnn


@pytest.fixture(scope="module")
def colored():
    return load_digits_dataset("colored-digits")


def test_colored_digits_shapes_and_groups(colored) -> None:
    for split in (colored.train, colored.tune, colored.test):
        assert split.X.dtype == np.float32 and split.X.shape[1:] == (3, 16, 16)
        assert split.X.min() >= 0.0 and split.X.max() <= 1.0
        assert set(np.unique(split.groups)) == {0, 1} and set(np.unique(split.y)) == {0, 1}
    assert colored.group_names == ("red", "blue") and colored.sensitive == "color"
    # the color is the stroke tint: a red image has more red than blue ink, and vice versa
    red, blue = colored.test.X[:, 0].sum((1, 2)), colored.test.X[:, 2].sum((1, 2))
    assert np.all((red > blue) == (colored.test.groups == 0))


def test_color_agrees_with_label_90_percent_in_train_half_in_test(colored) -> None:
    agree = {name: float(np.mean(s.groups == s.y)) for name, s in
             (("train", colored.train), ("tune", colored.tune), ("test", colored.test))}
    assert 0.87 <= agree["train"] <= 0.93 and 0.86 <= agree["tune"] <= 0.94
    assert 0.45 <= agree["test"] <= 0.55


def test_splits_are_deterministic_and_disjoint(colored) -> None:
    again = load_digits_dataset("colored-digits", seed=0)
    assert np.array_equal(again.test.X, colored.test.X) and np.array_equal(again.train.groups, colored.train.groups)
    other = load_digits_dataset("colored-digits", seed=1)
    assert not np.array_equal(other.test.X, colored.test.X)
    from patcher.digits import COPIES

    images = sum(len(s) // COPIES[name] for name, s in (("train", colored.train), ("tune", colored.tune),
                                                          ("test", colored.test)))
    assert images == 1797 and len(colored.tune) % COPIES["tune"] == 0 and len(colored.tune) > len(colored.test)


def test_noisy_digits_flips_train_labels_only() -> None:
    d = load_digits_dataset("noisy-digits")
    noisy = d.train.frame["noisy"].to_numpy()
    assert 0.15 <= noisy.mean() <= 0.2  # 20% drawn, minus those already "2"
    assert np.all(d.train.y[noisy] == 2)
    assert np.array_equal(d.tune.y, d.tune.frame["digit"].to_numpy())
    assert np.array_equal(d.test.y, d.test.frame["digit"].to_numpy())
    assert set(np.unique(d.test.y)) == set(range(10))
    assert np.array_equal(d.test.groups, (d.test.y == 2).astype(np.int64))


def test_reference_cnn_is_an_onnx_model_that_learned_the_color_shortcut(colored, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FAIRPATCH_CACHE_DIR", str(tmp_path))
    model = reference_cnn("colored-digits", seed=0, data=colored)
    sess = ort.InferenceSession(model.onnx_bytes, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input"] and [o.name for o in sess.get_outputs()] == ["logits"]
    pred = sess.run(None, {"input": colored.test.X})[0].argmax(1)
    agree = colored.test.groups == colored.test.y
    correct = pred == colored.test.y
    acc_agree, acc_conflict = correct[agree].mean(), correct[~agree].mean()
    assert acc_agree > 0.9 and acc_agree - acc_conflict > 0.05  # biased: worse where the color misleads
    cached = reference_cnn("colored-digits", seed=0, data=colored)
    assert cached.onnx_bytes == model.onnx_bytes
