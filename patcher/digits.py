"""Image tasks the project carries itself, built from scikit-learn's bundled 8x8 digits (no download).

- "colored-digits": binary label digit >= 5; each image is upsampled to 16x16 and its strokes tinted
  one of two colors, the sensitive attribute ("color": group 0 = "red", group 1 = "blue"). In the
  train and tune splits the color agrees with the label 90% of the time (blue ~ label 1), in the
  test split half the time, so a model that learned the color shortcut is unfair (and less
  accurate) on test. This is the colored-MNIST setting of the fairness-reprogramming experiments.
- "noisy-digits": the 10-class task, 20% of the TRAIN labels flipped to "2" (FORML section 4.1,
  after Jiang and Nachum 2020); tune and test keep the true labels. Groups: group 1 = "two" (true
  class 2, the class the noise inflates), group 0 = "other"; per-class metrics (FORML's TPRD and
  maxFNR over classes) come from `y` itself.

Both give the same Dataset/Split classes as patcher.datasets: X float32 [N, 3, 16, 16] in [0, 1],
deterministic per seed. The 1797 images are split 60/20/20 (stratified by digit) before any
augmentation, so no test image is ever seen in training; each split then holds every image
`COPIES[split]` times, each copy shifted by up to one pixel and (colored digits) tinted independently.

`reference_cnn(name, seed)` trains a small CNN on the train split (1 thread, seconds) and exports it
to ONNX ("input" [N, 3, 16, 16] -> "logits" [N, C]), cached on disk like reference_model().
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache

import numpy as np
import pandas as pd

from patcher.datasets import Dataset, Split, TabularEncoder
from patcher.reference_models import ReferenceModel, cache_dir, fit_minibatches
from patcher.tuning import stratified_split

DIGIT_DATASETS = ("colored-digits", "noisy-digits")
SIZE = 16  # 8x8 upsampled twice
# augmented copies of each image per split; the tune split gets more, each tinted afresh, so the cells where the
# color disagrees with the label (10%) hold most of its images rather than a few dozen (a trigger fitted on a
# few dozen minority rows fits them, not the color)
COPIES = {"train": 3, "tune": 8, "test": 3}
AGREE = {"train": 0.9, "tune": 0.9, "test": 0.5}  # P(color agrees with the label), colored digits
NOISE = 0.2  # share of train labels flipped to "2", noisy digits
# stroke colors (RGB): distinct hues of similar brightness, so only the hue carries the group
COLORS = np.array([[0.95, 0.25, 0.2], [0.2, 0.45, 0.95]], np.float32)
CNN_RECIPE = {"channels": [16, 32], "epochs": 12, "batch_size": 64, "lr": 3e-3, "weight_decay": 1e-4, "version": 1,
              "head": "flatten"}
# Colored digits: a global max-pool head, as in the all-convolutional nets of the reprogramming paper (ResNets
# pool globally too): what a channel detects anywhere in the image reaches the decision, so a trigger in the
# border can reach the color evidence. A flatten head gives border pixels weights near zero (no digit ever
# touches them) and leaves an input-agnostic trigger nothing but a constant logit shift.
RECIPES = {"colored-digits": {**CNN_RECIPE, "head": "maxpool", "version": 2}, "noisy-digits": CNN_RECIPE}


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def _render(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """8x8 -> 16x16 (nearest), shifted by up to one pixel (zero fill): [N, 16, 16]."""
    big = np.kron(images, np.ones((2, 2), np.float32))
    out = np.zeros_like(big)
    for i, (dy, dx) in enumerate(rng.integers(-1, 2, size=(len(big), 2))):
        src = big[i, max(0, -dy):SIZE - max(0, dy), max(0, -dx):SIZE - max(0, dx)]
        out[i, max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
    return out


def _split(name: str, part: str, images: np.ndarray, digits: np.ndarray, rng: np.random.Generator) -> Split:
    images, digits = np.repeat(images, COPIES[part], axis=0), np.repeat(digits, COPIES[part])
    gray = _render(images, rng)
    if name == "colored-digits":
        y = (digits >= 5).astype(np.int64)
        agree = rng.random(len(y)) < AGREE[part]
        groups = np.where(agree, y, 1 - y).astype(np.int64)
        X = gray[:, None] * COLORS[groups][:, :, None, None]
        frame = pd.DataFrame({"digit": digits, "label": y, "color": np.array(["red", "blue"])[groups]})
    else:
        y = digits.copy()
        if part == "train":
            flip = rng.random(len(y)) < NOISE
            y[flip] = 2
        groups = (digits == 2).astype(np.int64)
        X = np.repeat(gray[:, None], 3, axis=1)
        frame = pd.DataFrame({"digit": digits, "label": y, "noisy": y != digits})
    return Split(np.ascontiguousarray(X, np.float32), y, groups, frame)


def load_digits_dataset(name: str, seed: int = 0) -> Dataset:
    """Colored or noisy digits, split train/tune/test (deterministic per seed)."""
    if name not in DIGIT_DATASETS:
        raise ValueError(f"unknown image dataset {name!r}; choose one of {', '.join(DIGIT_DATASETS)}")
    images, digits = _digits()
    idx = stratified_split(digits, np.zeros_like(digits), (0.6, 0.2, 0.2), seed)  # strata: the digit
    rng = np.random.default_rng([seed, 1])
    splits = [_split(name, part, images[i], digits[i], rng) for part, i in zip(AGREE, idx, strict=True)]
    if name == "colored-digits":
        return Dataset(name, "color", ("red", "blue"), "blue", False, TabularEncoder(), *splits)
    return Dataset(name, "digit_is_2", ("other", "two"), "two", False, TabularEncoder(), *splits)


def _cnn(torch, n_classes: int, recipe: dict):
    from torch import nn

    c1, c2 = recipe["channels"]
    body = [nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU()]
    if recipe.get("head") == "maxpool":
        return nn.Sequential(*body, nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(c2, n_classes))
    return nn.Sequential(*body, nn.MaxPool2d(2), nn.Flatten(), nn.Linear(c2 * (SIZE // 4) ** 2, n_classes))


def train_cnn(X: np.ndarray, y: np.ndarray, seed: int, recipe: dict = CNN_RECIPE) -> bytes:
    """Train the reference CNN on (X, y) and export it to ONNX bytes."""
    import torch

    from patcher.access import torch_to_onnx

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        net = _cnn(torch, int(y.max()) + 1, recipe)
        opt = torch.optim.Adam(net.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
        Xt, yt = torch.tensor(X), torch.tensor(y)
        fit_minibatches(net, opt, Xt, yt, recipe, gen)
        return torch_to_onnx(net, Xt[:2])
    finally:
        torch.set_num_threads(threads)


def reference_cnn(name: str, seed: int = 0, *, data: Dataset | None = None, data_seed: int = 0,
                  use_cache: bool = True) -> ReferenceModel:
    """The cached reference CNN for an image dataset, trained with `seed` on the train split of the
    dataset drawn with `data_seed` (two model seeds share one dataset: the transfer setting)."""
    data = data or load_digits_dataset(name, data_seed)
    n_classes = int(data.train.y.max()) + 1
    meta = {"dataset": name, "sensitive": data.sensitive, "drop_sensitive": False, "seed": seed,
            "data_seed": data_seed, "recipe": RECIPES[name], "input_shape": [3, SIZE, SIZE], "n_classes": n_classes,
            "copies": COPIES, "colors": COLORS.tolist(), "input": "input", "output": "logits",
            "output_kind": "logits"}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"{name}-{key}.onnx"
    if use_cache and path.exists() and path.with_suffix(".json").exists():
        return ReferenceModel(path.read_bytes(), json.loads(path.with_suffix(".json").read_text()))
    model = ReferenceModel(train_cnn(data.train.X, data.train.y, seed, RECIPES[name]), meta)
    if use_cache:
        model.save(path)
    return model
