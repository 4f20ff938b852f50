"""The models meshfed trains, chosen by name, and their weights as ordered numpy arrays.

A model is a function of the input shape (C, H, W) and the number of classes, registered by name:

    @register_model("logreg")
    def logreg(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), num_classes))

Put it in a module and start the server and the clients with --model-module that.module --model logreg.
Every conv and linear layer starts Glorot-uniform with zero biases (glorot_init), whoever registered it.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

ModelFactory = Callable[[tuple[int, ...], int], nn.Module]  # (input shape, classes) -> model
MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    def add(factory: ModelFactory) -> ModelFactory:
        MODELS[name] = factory
        return factory
    return add


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


@register_model("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return MLP(input_shape, num_classes)


@register_model("cnn")
def cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if tuple(input_shape) == (1, 28, 28):
        return McMahanCNN(num_classes)
    if tuple(input_shape) == (3, 32, 32):
        return CifarCNN(num_classes)
    raise ValueError(f"no CNN for input shape {input_shape}; use --model mlp")


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int = 10, seed: int = 0) -> nn.Module:
    """Build registered model `name` for inputs of `input_shape` (C, H, W), seeded, initialised as TensorFlow
    initialises its layers (glorot_init)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))} (or add one with "
                         "--model-module)")
    torch.manual_seed(seed)
    return glorot_init(MODELS[name](tuple(input_shape), num_classes))


def glorot_init(model: nn.Module) -> nn.Module:
    """Glorot-uniform weights and zero biases in every conv and linear layer: TensorFlow's defaults, so
    the initialisation McMahan et al.'s TensorFlow models had. PyTorch's own (Kaiming-uniform, a=sqrt(5))
    learns more slowly here: bench/RESULTS.md, Learning quality."""
    for layer in model.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return model


def get_weights(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's state as name -> float32 numpy array, in state_dict order (copies)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def set_weights(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Load name -> array weights into the model (names and shapes must match)."""
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}, strict=True)


def weight_spec(weights: dict[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype string): what every update for this model must match."""
    return {k: (tuple(v.shape), v.dtype.str) for k, v in weights.items()}
