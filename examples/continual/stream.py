"""Permuted digits: scikit-learn's bundled 8×8 digits, one pixel permutation per task.

The continual-learning benchmark of Lopez-Paz & Ranzato (2017) permutes the pixels of
MNIST once per task; here the images are scikit-learn's 1,797 bundled 8×8 digits (no
download), scaled to [0, 1]. Every task uses the same labels with its own permutation of
the 64 pixels, its own random draw of training images and the same held-out test images.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Task", "permuted_digits"]


class Task(NamedTuple):
    """One task of the stream: its training examples (in the order seen) and test set."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def permuted_digits(tasks: int, train_per_task: int, test_size: int, seed: int) -> list[Task]:
    """``tasks`` permuted-digits tasks; the split, permutations and draws depend on ``seed``.

    Raises:
        ValueError: more training or test images than the data set can give.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    if test_size + train_per_task > len(x):
        raise ValueError(
            f"{train_per_task} training and {test_size} test images per task need more than "
            f"the {len(x)} digits"
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    test, pool = order[:test_size], order[test_size:]
    stream = []
    for _ in range(tasks):
        pixels = torch.randperm(x.shape[1], generator=generator)
        train = pool[torch.randperm(len(pool), generator=generator)[:train_per_task]]
        stream.append(Task(x[train][:, pixels], y[train], x[test][:, pixels], y[test]))
    return stream
