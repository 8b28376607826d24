"""Multi-task data sets for MMoE-style experiments.

``synthetic_regression``: the MMoE synthetic generator (Ma et al. 2018, as in papers.md §1.7):
tasks come in pairs whose weight vectors have cosine ``rho``; ``y = w.x + sum_i sin(a_i w.x + b_i) + eps``.
``multi_digits``: Multi-MNIST built from scikit-learn's bundled 8x8 handwritten digits: two digits
overlaid on a 10x12 canvas with random vertical offsets; task 0 is the left digit, task 1 the right.
Digits of the test pairs never appear in training pairs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def synthetic_regression(num_pairs: int = 4, rhos: Sequence[float] = (0.9, 0.5), n_train: int = 20_000,
                         n_test: int = 2_000, dim: int = 100, noise: float = 0.01, seed: int = 0
                         ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``((x_train, y_train), (x_test, y_test))`` with ``y`` of shape ``[n, 2 * num_pairs]``."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0].T  # orthonormal rows
    ws = []
    for p in range(num_pairs):
        rho = rhos[p % len(rhos)]
        u1, u2 = basis[2 * p], basis[2 * p + 1]
        ws += [u1, rho * u1 + (1 - rho**2) ** 0.5 * u2]
    W = torch.stack(ws)  # [tasks, dim]
    alpha = torch.arange(1, 11, dtype=torch.float64)
    beta = (torch.arange(10, dtype=torch.float64)) ** 2

    def make(n):
        x = torch.randn(n, dim, generator=g, dtype=torch.float64)
        wx = x @ W.T  # [n, tasks]
        y = wx + torch.sin(alpha * wx.unsqueeze(-1) + beta).sum(-1) + noise * torch.randn(wx.shape, generator=g,
                                                                                            dtype=torch.float64)
        return x.float(), y.float()

    return make(n_train), make(n_test)


def multi_digits(n_train: int = 10_000, n_test: int = 2_000, seed: int = 0
                 ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``((x_train, y_train), (x_test, y_test))``: ``x`` is ``[n, 120]`` in [0, 1], ``y`` is ``[n, 2]`` labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("multi_digits needs scikit-learn (pip install scikit-learn, or moekit[dev])") from e
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # [1797, 8, 8]
    labels = torch.tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)
    cut = int(0.8 * len(labels))
    pools = perm[:cut], perm[cut:]

    def make(n, pool):
        a = pool[torch.randint(0, len(pool), (n,), generator=g)]
        b = pool[torch.randint(0, len(pool), (n,), generator=g)]
        dy = torch.randint(0, 3, (n, 2), generator=g)
        canvas = torch.zeros(n, 10, 12)
        for i in range(n):
            canvas[i, dy[i, 0] : dy[i, 0] + 8, 0:8] = images[a[i]]
            right = canvas[i, dy[i, 1] : dy[i, 1] + 8, 4:12]
            canvas[i, dy[i, 1] : dy[i, 1] + 8, 4:12] = torch.maximum(right, images[b[i]])
        return canvas.reshape(n, -1), torch.stack([labels[a], labels[b]], dim=1)

    return make(n_train, pools[0]), make(n_test, pools[1])
