"""Evaluates a global model on the server's test split (loaded once, lazily): in the server's process
(Evaluator) or in a child process of its own (ProcessEvaluator, evaluation 'process').

The child is `python -m app.evaluator`. It loads the split once and then answers, for each model written to its
stdin (8-byte little-endian length, then the weights as safetensors bytes), JSON lines on its stdout: progress
`{"done": n, "of": N}` and the result `{"loss": l, "accuracy": a}` (or `{"error": "..."}`). It exits when its
stdin closes, so it ends with the server however the server ends. Nothing is pickled.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any, Callable

import numpy as np
import torch

from shared.datasets import load_split, to_tensors
from shared.models import build_model, get_weights, set_weights
from shared.protocol import decode_weights, encode_weights
from shared.training import evaluate

log = logging.getLogger("meshfed.evaluation")
Progress = Callable[[int, int], None]  # (test samples done, of how many)
NICENESS = 10  # the evaluation process's: below the server's, which it would otherwise slow on a shared core


class Evaluator:
    """Callable: weights -> (loss, accuracy) on the first `limit` test samples (all if 0)."""

    def __init__(self, dataset: str, model: str, data_dir: str | None = None, limit: int = 0):
        self.dataset, self.model_name, self.data_dir, self.limit = dataset, model, data_dir, limit
        self._lock = threading.Lock()
        self._data: tuple[torch.Tensor, torch.Tensor] | None = None
        self._model: torch.nn.Module | None = None

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._data is None:
            split = load_split(self.dataset, train=False, data_dir=self.data_dir)
            indices = np.arange(min(self.limit, len(split.labels))) if self.limit else None
            self._data = to_tensors(split, indices)
        return self._data

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self._load()[0].shape[1:])

    def initial_weights(self, seed: int) -> dict[str, np.ndarray]:
        return get_weights(build_model(self.model_name, self.input_shape, seed=seed))

    def __call__(self, weights: dict[str, np.ndarray], progress: Progress | None = None) -> tuple[float, float]:
        with self._lock:
            x, y = self._load()
            if self._model is None:
                self._model = build_model(self.model_name, self.input_shape)
            set_weights(self._model, weights)
            return evaluate(self._model, x, y, progress=progress)


class ProcessEvaluator(Evaluator):
    """An Evaluator whose forward passes run in a child process at a lower priority (NICENESS): the server's
    interpreter (its GIL, the threads that serve the model and verify and sum the next round's updates) stays free
    while a model is scored, and on a shared core the OS runs the round's work first. The child starts on first
    use and again after it died; a dead or failing child is an error of that evaluation, as in-process."""

    def __init__(self, dataset: str, model: str, data_dir: str | None = None, limit: int = 0):
        super().__init__(dataset, model, os.path.abspath(data_dir) if data_dir else None, limit)
        self._child: subprocess.Popen | None = None
        self._shape: tuple[int, ...] | None = None

    def _start(self) -> subprocess.Popen:
        if self._child is not None and self._child.poll() is None:
            return self._child
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        args = [sys.executable, "-m", "app.evaluator", "--dataset", self.dataset, "--model", self.model_name,
                "--limit", str(self.limit), "--torch-threads", str(torch.get_num_threads())]
        self._child = subprocess.Popen([*args, *(["--data-dir", self.data_dir] if self.data_dir else [])],
                                       env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        hello = self._answer(self._child, None)
        self._shape = tuple(hello["input_shape"])
        log.info("evaluation process %d started: %d test samples", self._child.pid, hello["samples"])
        return self._child

    def _answer(self, child: subprocess.Popen, progress: Progress | None) -> dict[str, Any]:
        """The child's next answer, passing progress lines on; RuntimeError if it failed or died."""
        assert child.stdout is not None
        while line := child.stdout.readline():
            answer = json.loads(line)
            if "error" in answer:
                raise RuntimeError(f"the evaluation process failed: {answer['error']}")
            if "done" not in answer:
                return answer
            if progress is not None:
                progress(answer["done"], answer["of"])
        code = child.wait()
        raise RuntimeError(f"the evaluation process exited with {code} (its error is in the server's log)")

    @property
    def input_shape(self) -> tuple[int, ...]:
        with self._lock:
            self._start()
            assert self._shape is not None
            return self._shape

    def __call__(self, weights: dict[str, np.ndarray], progress: Progress | None = None) -> tuple[float, float]:
        data = encode_weights(weights)
        with self._lock:
            child = self._start()
            assert child.stdin is not None
            try:
                child.stdin.write(len(data).to_bytes(8, "little") + data)
                child.stdin.flush()
            except OSError:  # it died since _start looked: the read below says how
                pass
            answer = self._answer(child, progress)
            return float(answer["loss"]), float(answer["accuracy"])

    def close(self) -> None:
        """End the child (it also ends by itself when the server's process ends: its stdin closes)."""
        with self._lock:
            if self._child is not None and self._child.poll() is None:
                assert self._child.stdin is not None
                self._child.stdin.close()  # its read ends; it exits
                try:
                    self._child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._child.kill()
                    self._child.wait()


def _serve(evaluator: Evaluator, source: IO[bytes], out: IO[str]) -> None:
    """The child's loop: a model in, progress and its score out, until the server closes the pipe."""
    def say(message: dict[str, Any]) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    say({"input_shape": list(evaluator.input_shape), "samples": len(evaluator._load()[1])})
    while len(head := source.read(8)) == 8:
        data = source.read(int.from_bytes(head, "little"))
        try:
            loss, accuracy = evaluator(decode_weights(data), lambda done, of: say({"done": done, "of": of}))
        except Exception as exc:  # reported to the server, which fails that round's evaluation
            say({"error": f"{type(exc).__name__}: {exc}"[:500]})
            continue
        say({"loss": loss, "accuracy": accuracy})


def main() -> None:
    p = argparse.ArgumentParser(description="meshfed's evaluation process (started by the server)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir")
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--torch-threads", type=int, default=0)
    args = p.parse_args()
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    if hasattr(os, "setpriority"):  # the server's work on the round's path (serving models, verifying and summing
        os.setpriority(os.PRIO_PROCESS, 0, NICENESS)  # updates, committing) goes first; this takes the idle CPU
    out = os.fdopen(os.dup(1), "w")  # the answers' own descriptor: stray prints go to stderr, not into them
    os.dup2(2, 1)
    try:
        _serve(Evaluator(args.dataset, args.model, args.data_dir, args.limit), sys.stdin.buffer, out)
    except Exception as exc:  # e.g. the test split is missing: the server reads this as the evaluation's error
        out.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:500]}) + "\n")
        out.flush()
        sys.exit(1)


if __name__ == "__main__":
    main()
