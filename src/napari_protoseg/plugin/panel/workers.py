"""The panel's background work: thread workers for training, prediction and saving, how they stop,
and running GUI-thread work in small steps so that napari's event loop stays responsive."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Sequence

from napari.qt.threading import GeneratorWorker, create_worker
from qtpy.QtCore import QTimer

from napari_protoseg.plugin.session import SessionError

CLOSE_WAIT_SECONDS = 60.0
GIL_SWITCH_SECONDS = 0.001
TURN_MS = 5
PREPARING = "preparing"  # stands for the prediction worker while its layers are being made

_warm_up_lock = threading.Lock()
_warm_up_done: threading.Event | None = None


def _import_torch_lazies(done: threading.Event) -> None:
    try:
        import torch

        # The first optimiser imports torch._dynamo (and sympy, ...) lazily; one tiny step does it.
        net = torch.nn.Conv2d(1, 1, 3)
        optimizer = torch.optim.AdamW(net.parameters())
        net(torch.zeros(1, 1, 4, 4)).sum().backward()
        optimizer.step()
    except Exception:  # noqa: BLE001 - only a warm-up; training reports real problems itself
        pass
    finally:
        done.set()


def warm_up_torch() -> threading.Event:
    """Import, in a background thread, what PyTorch imports lazily on its first optimiser (about 2 s of
    holding the GIL). Done while the user annotates, it no longer stalls napari when training starts.
    Returns an event that is set when the imports are done."""
    global _warm_up_done
    with _warm_up_lock:
        if _warm_up_done is None:
            _warm_up_done = threading.Event()
            threading.Thread(target=_import_torch_lazies, args=(_warm_up_done,), name="protoseg-warm-up").start()
        return _warm_up_done


class StoppableWorker(GeneratorWorker):
    """A generator worker whose ``quit()`` (napari's cancel, closing the window) asks the generator to
    stop cleanly through ``stop_flag`` instead of abandoning it mid-run, so training still writes its
    checkpoint and reports its last event."""

    stop_flag: threading.Event | None = None

    def quit(self) -> None:
        if self.stop_flag is not None:
            self.stop_flag.set()
        else:
            super().quit()


class WorkerFailure(Exception):
    """An exception raised inside a worker generator, carried out to the panel. (superqt's generator
    worker takes a RuntimeError for "the worker was deleted" and drops it without a signal; PyTorch
    raises RuntimeErrors for real problems, such as running out of memory.)"""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def _run_until_done(generator, done: threading.Event):
    """Iterate ``generator`` and set ``done`` when it ends, however it ends."""
    try:
        yield from generator
    except Exception as err:
        raise WorkerFailure(err) from err
    finally:
        done.set()


def _stoppable_worker(generator, done: threading.Event, stop_flag: threading.Event, *, yielded, errored,
                      finished) -> StoppableWorker:
    """An unstarted worker running ``generator`` (``done`` set when it ends, however it ends) that
    napari's cancel or closing the window stops through ``stop_flag``."""
    worker = create_worker(_run_until_done, generator, done, _worker_class=StoppableWorker, _start_thread=False,
                           _connect={"yielded": yielded, "errored": errored, "finished": finished})
    worker.stop_flag = stop_flag
    return worker


def _limit_torch_threads() -> None:
    """Leave one CPU core to napari's event loop while training on the CPU."""
    import torch

    cores = os.cpu_count() or 1
    if cores > 1 and torch.get_num_threads() >= cores:
        torch.set_num_threads(cores - 1)


class BackgroundJobs:
    """At most one training run, one prediction run, one stack-learning run and one project save at a
    time, each in a thread worker; the flags that stop them, and the events set when they have ended."""

    def __init__(self):
        self.train_worker = None
        self.predict_worker = None  # PREPARING while the prediction's layers are being made
        self.save_worker = None
        self.learn_worker = None  # learning the stack (self-supervised), between training runs
        self.stop_learning = threading.Event()
        self.learning_done = threading.Event()
        self.learning_done.set()
        self.stop_training = threading.Event()
        self.stop_prediction = threading.Event()
        self.training_done = threading.Event()
        self.prediction_done = threading.Event()
        self.training_done.set()
        self.prediction_done.set()
        self._running = 0
        self._switch_interval: float | None = None

    def busy(self) -> bool:
        """Training or prediction is running (or a prediction is being prepared)."""
        return self.train_worker is not None or self.predict_worker is not None

    def start_training(self, generator, *, yielded, errored, finished) -> None:
        """Run a training generator; ``finished()`` is called after the worker is forgotten."""
        def ended():
            self.train_worker = None
            self._background_ended()
            finished()

        self.train_worker = _stoppable_worker(generator, self.training_done, self.stop_training,
                                              yielded=yielded, errored=errored, finished=ended)
        _limit_torch_threads()
        self._background_started()
        self.train_worker.start()

    def start_prediction(self, generator, *, yielded, errored, finished) -> None:
        """Run a prediction generator; ``finished()`` is called after the worker is forgotten."""
        def ended():
            self.predict_worker = None
            self._background_ended()
            finished()

        self.predict_worker = _stoppable_worker(generator, self.prediction_done, self.stop_prediction,
                                                yielded=yielded, errored=errored, finished=ended)
        self._background_started()
        self.predict_worker.start()

    def start_stack_learning(self, generator, *, yielded, errored, finished) -> None:
        """Run a stack-learning generator; ``finished()`` is called after the worker is forgotten."""
        def ended():
            self.learn_worker = None
            self._background_ended()
            finished()

        self.stop_learning.clear()
        self.learn_worker = _stoppable_worker(generator, self.learning_done, self.stop_learning,
                                              yielded=yielded, errored=errored, finished=ended)
        _limit_torch_threads()
        self._background_started()
        self.learn_worker.start()

    def start_save(self, write: Callable, *, returned, errored) -> None:
        """Run ``write()`` (a project snapshot's) in a thread."""
        self.save_worker = create_worker(
            write, _start_thread=True,
            _connect={"returned": returned, "errored": errored,
                      "finished": lambda: setattr(self, "save_worker", None)})

    def stop_all_and_wait(self, seconds: float = CLOSE_WAIT_SECONDS) -> None:
        """Ask training and prediction to stop and wait (at most ``seconds``) until they have."""
        for flag in (self.stop_training, self.stop_prediction, self.stop_learning):
            flag.set()
        deadline = time.monotonic() + seconds
        for done in (self.training_done, self.prediction_done, self.learning_done):
            done.wait(max(0.0, deadline - time.monotonic()))

    def _background_started(self) -> None:
        """While a worker runs, napari's event loop gets the GIL back within 1 ms (Python's default
        switch interval is 5 ms, long enough to make the loop stutter while a worker computes)."""
        self._running += 1
        if self._running == 1:
            self._switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(GIL_SWITCH_SECONDS)

    def _background_ended(self) -> None:
        self._running = max(0, self._running - 1)
        if self._running == 0 and self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None


def run_in_turns(steps: Sequence[Callable[[], None]], *, cancelled: Callable[[], bool],
                 refused: Callable[[SessionError], None]) -> None:
    """Run the callables one per turn of the event loop (napari repaints and reacts in between).
    A ``SessionError`` ends the sequence and goes to ``refused``; ``cancelled()`` ends it quietly."""
    # Each step waits for a timer of TURN_MS: Qt runs zero-delay single shots back to back, before the
    # repaint and the input that came in meanwhile.
    if not steps:
        return

    def run_first():
        if cancelled():
            return
        try:
            steps[0]()
        except SessionError as err:
            refused(err)
            return
        run_in_turns(steps[1:], cancelled=cancelled, refused=refused)

    QTimer.singleShot(TURN_MS, run_first)
