"""Where the server evaluates each committed global model (run option `evaluation`).

  inline      the round evaluates its new model while it is committed; the next round starts after both
  background  one worker thread evaluates each committed model while the next round trains: the round's time
              is its training and aggregation, not the test split's forward passes
  process     as background, but the worker hands each model to a child process that holds the test split
              (app/evaluator.ProcessEvaluator): the forward passes' Python work leaves the server's GIL to the
              threads that receive, verify and sum the next round's updates

One worker and a FIFO: metrics are recorded and published in round order. At most MAX_PENDING models wait for
it; a round that would add one more waits (memory stays a few models, and evaluation never falls far behind).
A round committed but not yet evaluated when the server dies is evaluated when it comes back
(RoundLoop.evaluate_unevaluated), from its stored checkpoint. With `background` or `process`, a round whose accuracy
reaches target_accuracy ends the run when the next round would start: usually one round more was trained, up to
MAX_PENDING + 1 when evaluating takes longer than a round.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

log = logging.getLogger("meshfed.evaluation")
MODES = ("inline", "background", "process")
MAX_PENDING = 2
PROGRESS_EVERY = 2.0  # seconds between an evaluation's progress lines (a short one logs none)


def progress_log(what: str) -> Callable[[int, int], None]:
    """A progress callback for Evaluator: logs `<what>: 4000/10000 test samples` at most every PROGRESS_EVERY
    seconds (the whole test split takes 4-7 s on these 2 cores)."""
    said_at = time.monotonic()

    def progress(done: int, of: int) -> None:
        nonlocal said_at
        if done < of and time.monotonic() - said_at >= PROGRESS_EVERY:
            said_at = time.monotonic()
            log.info("%s: %d/%d test samples", what, done, of)
    return progress


class EvaluationWorker:
    def __init__(self) -> None:
        self._queue: queue.Queue[Callable[[], None]] = queue.Queue(maxsize=MAX_PENDING)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.reached: dict[str, str] = {}  # run id -> why it finished, found by an evaluation in the background
        self.failed: set[str] = set()      # runs whose evaluation failed in the background: the loop stops them

    def submit(self, job: Callable[[], None]) -> None:
        """Run `job` after the jobs before it; blocks while MAX_PENDING jobs wait."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="evaluation", daemon=True)
                self._thread.start()
        self._queue.put(job)

    def forget(self, run_id: str) -> None:
        self.reached.pop(run_id, None)
        self.failed.discard(run_id)

    def drain(self) -> None:
        """Wait until every submitted job is done (a run ends only after its last round is evaluated)."""
        self._queue.join()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                job()
            except Exception:  # keep the worker alive; the round stays unevaluated and is retried on restart
                log.exception("evaluating a committed model failed")
            finally:
                self._queue.task_done()
