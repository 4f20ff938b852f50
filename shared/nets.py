"""The networks behind the built-in models (shared/models.py registers them by name). Importing this loads torch;
shared.models imports it only when a model is built, so --help and config checks start fast."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class McMahanCNN(nn.Module):
    """The CNN of McMahan et al. 2017 for 1x28x28 inputs (1,663,370 parameters)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5, padding=2)   # 32x28x28 -> pool -> 32x14x14
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)  # 64x14x14 -> pool -> 64x7x7
        self.fc1 = nn.Linear(64 * 7 * 7, 512)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class CifarCNN(nn.Module):
    """A small CNN for 3x32x32 inputs (the TensorFlow-tutorial shape McMahan et al. used for CIFAR-10)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 5, padding=2)   # 32x32x32 -> pool -> 32x16x16
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)  # 64x16x16 -> pool -> 64x8x8
        self.fc1 = nn.Linear(64 * 8 * 8, 384)
        self.fc2 = nn.Linear(384, 192)
        self.fc3 = nn.Linear(192, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


class MLP(nn.Module):
    """McMahan's '2NN': two hidden layers of 200 units, for any input shape."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int = 10, hidden: int = 200):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(int(np.prod(input_shape)), hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
