"""Plain PyTorch local training and evaluation, shared by clients, the server and the mesh."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class Cancelled(Exception):
    """Training stopped between two batches because cancel() said so (the round ended, the process is stopping)."""

    def __init__(self, batches: int):
        super().__init__(f"stopped after {batches} batches")
        self.batches = batches


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch_size: int,
          max_batches: int = 0, seed: int = 0, proximal_mu: float = 0.0, momentum: float = 0.0,
          cancel: Callable[[], bool] | None = None) -> dict[str, float]:
    """SGD on (x, y) for `epochs` passes (or `max_batches` batches if > 0); returns loss/accuracy/batches.
    cancel(), if given, is asked before each batch: True raises Cancelled (the model is left half-trained).

    proximal_mu > 0 adds FedProx's mu/2 * ||w - w_start||^2 (Li et al. 2020), w_start = the weights
    training started from (the global model). momentum > 0 is heavy-ball momentum as torch.optim.SGD
    makes it (buffer = grad at the first step, then momentum * buffer + grad), started afresh each call.
    """
    model.train()
    # Plain SGD by hand, the update torch.optim.SGD(lr) makes on the CPU (param.add_(grad, alpha=-lr)):
    # the first torch.optim optimizer a process builds imports torch._dynamo, ~1.9 s of CPU per client.
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    buffers: list[torch.Tensor | None] = [None] * len(params)  # momentum buffers, one per parameter
    generator = torch.Generator().manual_seed(seed)
    loss_sum, correct, seen, batches = 0.0, 0, 0, 0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            if cancel is not None and cancel():
                raise Cancelled(batches)
            idx = order[start:start + batch_size]
            xb, yb = x[idx], y[idx]                       # xb: (B, C, H, W), yb: (B,)
            model.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = nn.functional.cross_entropy(logits, yb)
            if anchor is not None:
                loss = loss + proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
            loss.backward()
            with torch.no_grad():
                for i, p in enumerate(params):
                    if p.grad is None:
                        continue
                    step = p.grad
                    if momentum:
                        buf = buffers[i]
                        step = buffers[i] = p.grad.clone() if buf is None else buf.mul_(momentum).add_(p.grad)
                    p.add_(step, alpha=-lr)
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
            seen += len(idx)
            batches += 1
            if max_batches and batches >= max_batches:
                return train_summary(loss_sum, correct, seen, batches)
    return train_summary(loss_sum, correct, seen, batches)


def train_summary(loss_sum: float, correct: int, seen: int, batches: int) -> dict[str, float]:
    """What a training pass reports: mean loss and accuracy over the examples seen, examples, batches."""
    return {"loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1),
            "examples": float(seen), "batches": float(batches)}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000,
             progress: Callable[[int, int], None] | None = None) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of model on (x, y); progress(done, total) after each batch."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start:start + batch_size])
        yb = y[start:start + batch_size]
        loss_sum += nn.functional.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
        if progress is not None:
            progress(min(start + batch_size, len(x)), len(x))
    n = max(len(x), 1)
    return loss_sum / n, correct / n
