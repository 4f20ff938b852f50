"""The models meshfed trains, chosen by name, and their weights as ordered numpy arrays.

A model is a function of the input shape (C, H, W) and the number of classes, registered by name:

    @register_model("logreg")
    def logreg(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), num_classes))

Put it in a module and start the server and the clients with --model-module that.module --model logreg.
Every conv and linear layer starts Glorot-uniform with zero biases (glorot_init), whoever registered it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:  # torch loads when a model is built, not when this registry is imported (--help, config checks)
    from torch import nn

ModelFactory = Callable[[tuple[int, ...], int], "nn.Module"]  # (input shape, classes) -> model
MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    def add(factory: ModelFactory) -> ModelFactory:
        MODELS[name] = factory
        return factory
    return add


@register_model("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    from shared.nets import MLP
    return MLP(input_shape, num_classes)


@register_model("cnn")
def cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    from shared.nets import CifarCNN, McMahanCNN
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
    import torch
    torch.manual_seed(seed)
    return glorot_init(MODELS[name](tuple(input_shape), num_classes))


def glorot_init(model: nn.Module) -> nn.Module:
    """Glorot-uniform weights and zero biases in every conv and linear layer: TensorFlow's defaults, so
    the initialisation McMahan et al.'s TensorFlow models had. PyTorch's own (Kaiming-uniform, a=sqrt(5))
    learns more slowly here: bench/RESULTS.md, Learning quality."""
    from torch import nn
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
    import torch
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()}, strict=True)


def weight_spec(weights: dict[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype string): what every update for this model must match."""
    return {k: (tuple(v.shape), v.dtype.str) for k, v in weights.items()}
