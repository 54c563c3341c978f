"""Reference biased models: one torch MLP per dataset, trained on the train split, exported to ONNX.

They play the deployed model in the demo, tests and benchmarks: FP32 [N, d] in, [N, 2] logits
out. Training is deterministic per seed and cached on disk (keyed by everything that changes the
weights), so a benchmark pays for training once. `drop_sensitive` trains a model that never sees
the sensitive column: the realistic case where the group must be inferred from proxies.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from patcher.datasets import Dataset, load_dataset
from patcher.onnx_graphs import mlp_model

# A strong, clearly biased MLP: Adam 1e-3, batch 256, 20 epochs, light weight decay. Trained to
# convergence instead (sklearn's default schedule, 60-100+ epochs here) the model overfits: it loses
# 1.5-2 points of test accuracy, which would flatter every debiasing method measured against it.
RECIPE = {"hidden": [64, 32], "epochs": 20, "batch_size": 256, "lr": 1e-3, "weight_decay": 1e-4, "version": 3}


def cache_dir() -> Path:
    root = os.environ.get("FAIRPATCH_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fairpatch")
    return Path(root) / "models"


@dataclass(frozen=True)
class ReferenceModel:
    onnx_bytes: bytes
    metadata: dict  # dataset, sensitive, drop_sensitive, seed, feature names, recipe

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.onnx_bytes).hexdigest()

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.onnx_bytes)
        path.with_suffix(".json").write_text(json.dumps(self.metadata, indent=1))
        return path


def train_mlp(X: np.ndarray, y: np.ndarray, seed: int, recipe: dict = RECIPE,
              progress: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """Train the reference MLP and return its layers as (W (in, out), b) numpy pairs."""
    import torch
    from torch import nn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads add overhead and make runs less reproducible
    try:
        return _train(torch, nn, X, y, seed, recipe, progress)
    finally:
        torch.set_num_threads(threads)


def fit_minibatches(net, opt, Xt, yt, recipe: dict, gen, progress: bool = False) -> None:
    """Cross-entropy over shuffled minibatches for recipe["epochs"] epochs (every reference model's loop)."""
    import torch
    from torch import nn

    net.train()
    epochs = range(recipe["epochs"])
    if progress:
        from rich.progress import track

        epochs = track(epochs, description="training reference model")
    for _ in epochs:
        order = torch.randperm(len(Xt), generator=gen)
        for i in range(0, len(order), recipe["batch_size"]):
            idx = order[i:i + recipe["batch_size"]]
            opt.zero_grad()
            nn.functional.cross_entropy(net(Xt[idx]), yt[idx]).backward()
            opt.step()


def _train(torch, nn, X, y, seed, recipe, progress):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    sizes = [X.shape[1], *recipe["hidden"], int(y.max()) + 1]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    net = nn.Sequential(*layers)
    opt = torch.optim.Adam(net.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"], fused=True)
    Xt, yt = torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    fit_minibatches(net, opt, Xt, yt, recipe, gen, progress)
    return [(m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy())
            for m in net if isinstance(m, nn.Linear)]


def reference_model(dataset: str, sensitive: str | None = None, *, drop_sensitive: bool = False, seed: int = 0,
                    data: Dataset | None = None, use_cache: bool = True, progress: bool = False) -> ReferenceModel:
    """The cached reference model for (dataset, sensitive, drop_sensitive, seed); trains it if needed."""
    data = data or load_dataset(dataset, sensitive, drop_sensitive)
    meta = {"dataset": data.name, "sensitive": data.sensitive, "drop_sensitive": data.drop_sensitive,
            "seed": seed, "recipe": RECIPE, "feature_names": data.feature_names,
            "input": "input", "output": "logits", "output_kind": "logits"}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"{data.name}-{key}.onnx"
    if use_cache and path.exists() and path.with_suffix(".json").exists():
        return ReferenceModel(path.read_bytes(), json.loads(path.with_suffix(".json").read_text()))
    layers = train_mlp(data.train.X, data.train.y, seed, progress=progress)
    doc = f"fairpatch reference model: {data.name}, sensitive={data.sensitive}, drop_sensitive={drop_sensitive}"
    model = ReferenceModel(mlp_model(layers, name=f"{data.name}_reference", doc=doc), meta)
    if use_cache:
        model.save(path)
    return model
