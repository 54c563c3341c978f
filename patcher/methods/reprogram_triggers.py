"""Fairness-trigger forms: differentiable torch forwards over a flat parameter vector, and ONNX export.

Every trigger maps a flat parameter vector `theta` (length `dim`) to a transform of the model's
input, with the same shape in and out:

- `TabularTrigger`: x~ = x * mask + delta on a set of input columns (all of them by default). The
  mask is "binary" (the reference code: 0/1 in the forward pass, a straight-through estimator for
  the gradient) or "scale" (a real-valued per-column gain). A scale on a one-hot group column moves
  that group's inputs alone, so a trigger can shift one group's scores through the frozen model.
- `BorderTrigger`: x~ = x + tanh(W) on a frame of the image (zero inside), W on a coarse grid of
  `block` x `block` pixel cells, so the zeroth-order search has few dimensions.
- `PatchTrigger`: a p x p corner patch replaces the pixels: x~ = x * (1 - M) + sigmoid(W) * M.
- `ColorTrigger`: a global channel mix, x~[:, c] = sum_c' A[c, c'] x[:, c'] + b[c] at every pixel (C * C + C
  parameters, the identity at the start): a color or tint shared by a whole image (a sensitive attribute
  carried as a hue) can be mixed away by a map that sends both hues to one, whatever the image shows.
  Not elementwise, so it exports as a 1x1 convolution (any number of spatial axes) instead of Mul and Add.
- `FrameTrigger`: the border's frame, but replacing the pixels like the patch (x~ = x * (1 - M) +
  sigmoid(W) * M): what the frame shows is the same for every image, so the trigger cannot fit
  particular images through strokes that reach the edge (an added border can), and under a model
  that pools globally it acts as a per-feature floor that every image shares. Its start is a random
  frame (a uniform gray frame sits on a plateau of a max-pooling model's loss).

Exported graphs contain only constants, Mul and Add (the color mix: one Conv): the trigger's ONNX graph is exact
and tiny.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from patcher.onnx_graphs import GraphBuilder, float_tensor

MaskKind = Literal["binary", "scale"]


class Trigger:
    """Base: `dim` parameters, `init()`, `apply(X, theta)` in torch, `affine(theta)` -> (M, D) with
    x~ = x * M + D exactly (every form here is affine in x), and the ONNX export built from it."""

    dim: int
    shape: tuple[int, ...]  # one input row's shape
    identity_start = True  # init() leaves every input unchanged
    random_starts = False  # random_start() draws other starts (a search may try several)

    def init(self) -> torch.Tensor:
        raise NotImplementedError

    def random_start(self, rng: np.random.Generator) -> torch.Tensor:
        """Another start drawn like init(), for forms with `random_starts`."""
        raise NotImplementedError(f"{type(self).__name__} has one start")

    def affine(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def apply(self, X: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        M, D = self.affine(theta)
        return X * M + D

    def describe(self, theta: torch.Tensor) -> dict:
        return {"form": type(self).__name__, "dim": self.dim}

    def to_onnx(self, theta: torch.Tensor, name: str = "fairness_trigger") -> bytes:
        """input [N, *shape] -> output [N, *shape], x * M + D with the trained M and D baked in."""
        with torch.no_grad():
            M, D = (t.detach().double().cpu().numpy().astype(np.float32) for t in self.affine(theta))
        g = GraphBuilder()
        scaled = g.op("Mul", ["input", g.const(M.reshape(self.shape), "mask")])
        g.op("Add", [scaled, g.const(D.reshape(self.shape), "delta")], "output")
        shape = ["N", *self.shape]
        model = g.model([float_tensor("input", shape)], [float_tensor("output", shape)], name,
                        doc=f"fairness trigger ({type(self).__name__}): output = input * mask + delta")
        return model.SerializeToString()


class TabularTrigger(Trigger):
    def __init__(self, n_features: int, columns: list[int] | None = None, mask: MaskKind = "scale") -> None:
        self.shape = (n_features,)
        self.columns = list(range(n_features)) if columns is None else list(columns)
        self.k = len(self.columns)
        self.mask_kind = mask
        self.dim = 2 * self.k
        self._index = torch.tensor(self.columns, dtype=torch.long)

    def init(self) -> torch.Tensor:
        # binary: mask logits well above 0 (mask = 1); scale: gain 1; delta 0: the identity
        start = 3.0 if self.mask_kind == "binary" else 1.0
        return torch.cat([torch.full((self.k,), start), torch.zeros(self.k)]).double()

    def mask_values(self, theta: torch.Tensor) -> torch.Tensor:
        s = theta[: self.k]
        if self.mask_kind == "scale":
            return s
        soft = torch.sigmoid(s)
        return (s > 0).to(s.dtype) + soft - soft.detach()  # straight-through: hard forward, sigmoid backward

    def affine(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = (self._index.to(theta.device),)
        M = theta.new_ones(self.shape).index_put(index, self.mask_values(theta))
        D = theta.new_zeros(self.shape).index_put(index, theta[self.k:])
        return M, D

    def describe(self, theta: torch.Tensor) -> dict:
        m = self.mask_values(theta).detach().cpu().numpy()
        return {"form": "tabular", "mask": self.mask_kind, "dim": self.dim, "columns": self.columns,
                "mask_values": [round(float(v), 4) for v in m],
                "delta": [round(float(v), 4) for v in theta[self.k:].detach().cpu().numpy()]}


def _frame(h: int, w: int, width: int) -> np.ndarray:
    f = np.ones((h, w), np.float64)
    f[width:h - width, width:w - width] = 0.0
    return f


class BorderTrigger(Trigger):
    """x + tanh(W) on a `width`-pixel frame; W is constant on `block` x `block` cells (coarse: few params)."""

    def __init__(self, shape: tuple[int, int, int], width: int = 2, block: int = 4) -> None:
        c, h, w = shape
        self.shape, self.width, self.block = tuple(shape), width, block
        self.grid = (c, -(-h // block), -(-w // block))
        self._frame = torch.tensor(_frame(h, w, width))
        self.dim = int(np.prod(self.grid))

    def init(self) -> torch.Tensor:
        return torch.zeros(self.dim, dtype=torch.float64)

    def affine(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, h, w = self.shape
        W = theta.reshape(self.grid).repeat_interleave(self.block, 1).repeat_interleave(self.block, 2)[:, :h, :w]
        return theta.new_ones(self.shape), torch.tanh(W) * self._frame.to(theta)

    def describe(self, theta: torch.Tensor) -> dict:
        return {"form": "border", "width": self.width, "block": self.block, "dim": self.dim}


class PatchTrigger(Trigger):
    """A p x p patch in the top-left corner replaces the pixels with sigmoid(W)."""

    identity_start = False

    def __init__(self, shape: tuple[int, int, int], size: int = 4) -> None:
        c, h, w = shape
        self.shape, self.size = tuple(shape), size
        m = np.zeros((h, w))
        m[:size, :size] = 1.0
        self._m = torch.tensor(m)
        self.dim = c * size * size

    def init(self) -> torch.Tensor:
        return torch.zeros(self.dim, dtype=torch.float64)

    def affine(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, h, w = self.shape
        W = theta.new_zeros((c, h, w))
        W[:, : self.size, : self.size] = torch.sigmoid(theta.reshape(c, self.size, self.size))
        m = self._m.to(theta)
        return (1.0 - m).expand(c, h, w), W * m

    def describe(self, theta: torch.Tensor) -> dict:
        return {"form": "patch", "size": self.size, "dim": self.dim}


class FrameTrigger(Trigger):
    """A `width`-pixel frame whose pixels are replaced by sigmoid(W); W on `block` x `block` cells, one
    parameter per channel and cell that holds frame pixels (no dead dimensions for a zeroth-order search)."""

    identity_start = False
    random_starts = True

    def __init__(self, shape: tuple[int, int, int], width: int = 2, block: int = 1, init_scale: float = 1.0,
                 seed: int = 0) -> None:
        c, h, w = shape
        self.shape, self.width, self.block = tuple(shape), width, block
        frame = _frame(h, w, width)
        self._frame = torch.tensor(frame)
        gh, gw = -(-h // block), -(-w // block)
        padded = np.zeros((gh * block, gw * block))
        padded[:h, :w] = frame
        live = padded.reshape(gh, block, gw, block).max(axis=(1, 3)) > 0
        self.grid = (c, gh, gw)
        self._live = torch.tensor(np.flatnonzero(np.tile(live.ravel(), c)))
        self.dim = int(len(self._live))
        self.init_scale, self.seed = init_scale, seed

    def init(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.dim, generator=gen, dtype=torch.float64) * self.init_scale

    def random_start(self, rng: np.random.Generator) -> torch.Tensor:
        return torch.tensor(rng.standard_normal(self.dim) * self.init_scale)

    def affine(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, h, w = self.shape
        cells = theta.new_zeros(int(np.prod(self.grid))).index_put((self._live.to(theta.device),), theta)
        W = cells.reshape(self.grid).repeat_interleave(self.block, 1).repeat_interleave(self.block, 2)[:, :h, :w]
        m = self._frame.to(theta)
        return (1.0 - m).expand(c, h, w), torch.sigmoid(W) * m

    def describe(self, theta: torch.Tensor) -> dict:
        return {"form": "frame", "width": self.width, "block": self.block, "dim": self.dim}


class ColorTrigger(Trigger):
    """x~[:, c] = sum_c' A[c, c'] x[:, c'] + b[c] at every position of a [C, *spatial] input (channels first),
    theta = (A row-major, b); A starts as the identity and b at 0. A few parameters for the whole image, so a
    zeroth-order search needs no subspace; it exports as a 1x1 convolution over the spatial axes."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        if len(shape) < 2:
            raise ValueError(f"a color trigger needs channels-first inputs [C, *spatial], got {list(shape)}")
        self.shape = tuple(int(v) for v in shape)
        self.channels = self.shape[0]
        self.dim = self.channels * self.channels + self.channels

    def init(self) -> torch.Tensor:
        c = self.channels
        return torch.cat([torch.eye(c, dtype=torch.float64).flatten(), torch.zeros(c, dtype=torch.float64)])

    def mix(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.channels
        return theta[: c * c].reshape(c, c), theta[c * c:]

    def affine(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError("a channel mix is not elementwise: use apply() or to_onnx()")

    def apply(self, X: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        A, b = self.mix(theta.to(X.dtype))
        spatial = (1,) * (len(self.shape) - 1)
        return torch.einsum("dc,nc...->nd...", A, X) + b.reshape(self.channels, *spatial)

    def to_onnx(self, theta: torch.Tensor, name: str = "fairness_trigger") -> bytes:
        """input [N, C, *spatial] -> output of the same shape: Conv with a 1x1 kernel A and bias b."""
        with torch.no_grad():
            A, b = (t.detach().double().cpu().numpy().astype(np.float32) for t in self.mix(theta))
        spatial = (1,) * (len(self.shape) - 1)
        g = GraphBuilder()
        g.op("Conv", ["input", g.const(A.reshape(self.channels, self.channels, *spatial), "mix"),
                      g.const(b, "bias")], "output")
        shape = ["N", *self.shape]
        model = g.model([float_tensor("input", shape)], [float_tensor("output", shape)], name,
                        doc="fairness trigger (ColorTrigger): output[:, c] = sum_k mix[c, k] * input[:, k] + bias[c]")
        return model.SerializeToString()

    def describe(self, theta: torch.Tensor) -> dict:
        A, b = self.mix(theta.detach().double().cpu())
        return {"form": "color", "dim": self.dim, "mix": [[round(float(v), 4) for v in row] for row in A.numpy()],
                "bias": [round(float(v), 4) for v in b.numpy()]}


def group_columns(X: np.ndarray, groups: np.ndarray, k: int) -> list[int]:
    """The k input columns most correlated with the group (from the tuning data, no queries): where a
    low-dimensional tabular trigger does the most good."""
    Xf = X.reshape(len(X), -1).astype(np.float64)
    a = (groups == groups.max()).astype(np.float64)
    xs = Xf - Xf.mean(0)
    denom = np.sqrt((xs ** 2).sum(0) * ((a - a.mean()) ** 2).sum()) + 1e-12
    corr = np.abs(xs.T @ (a - a.mean())) / denom
    return sorted(np.argsort(-corr)[:k].tolist())
