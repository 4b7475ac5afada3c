"""How long napari's event loop stalls while the panel trains and then predicts the plane in view.

Opens a real napari window (1500 x 950, shown) with the plugin's sample data and the protoseg panel,
lets a 20 ms QTimer beat, clicks "Train on current labels" (found by its text) with a small step count
and waits until the training and the prediction that follows it are done. Prints the worst gaps
between two beats, what was happening then (the last thing that happened before the gap and what
happened during it) and where the GUI thread was (the Python stack, sampled every few ms).

Needs a display: ``xvfb-run -a -s "-screen 0 1600x1000x24" python tools/event_loop_stalls.py``
(run from the repository root with ``PYTHONPATH=src``).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

WINDOW_SIZE = (1500, 950)
BEAT_MS = 20
TRAIN_BUTTON_TEXT = "Train on current labels"
STALL_SECONDS = 0.100
# Frames of these packages name where the GUI thread was during a gap.
WHERE_PACKAGES = ("napari_protoseg", "/napari/", "/vispy/", "/superqt/", "/numpy/", "/qtpy/", "/OpenGL/")


class StackSampler(threading.Thread):
    """Samples the GUI thread's Python stack every ``every`` seconds: (time, innermost-first frames)."""

    def __init__(self, every: float = 0.005):
        super().__init__(name="stack-sampler", daemon=True)
        self.every = every
        self.target = threading.main_thread().ident
        self.samples: list[tuple[float, tuple]] = []
        self.running = True

    def run(self) -> None:
        while self.running:
            frame = sys._current_frames().get(self.target)
            stack = []
            while frame is not None and len(stack) < 80:
                stack.append((frame.f_code.co_filename, frame.f_code.co_name, frame.f_lineno))
                frame = frame.f_back
            self.samples.append((time.perf_counter(), tuple(stack)))
            time.sleep(self.every)


def _short(frame) -> str:
    filename, name, line = frame
    parts = Path(filename).parts
    return f"{'/'.join(parts[-2:])}:{name}:{line}"


def _where(stack) -> str | None:
    """The frames of a sample worth naming (None when the GUI thread was idle in the event loop)."""
    kept = [f for f in stack if any(p in f[0] for p in WHERE_PACKAGES)]
    if not kept:
        return None
    ours = [f for f in kept if "napari_protoseg" in f[0]]
    inner = " < ".join(_short(f) for f in kept[:3])
    return inner + (f"  [from {_short(ours[-1])}]" if ours and ours[-1] not in kept[:3] else "")


def canvas_repaint_times(viewer, run_loop, repeats: int = 5) -> list[float]:
    """Seconds each of a few forced repaints of napari's canvas took (empty if napari hides its canvas)."""
    from qtpy.QtWidgets import QApplication

    try:
        scene_canvas = viewer.window._qt_viewer.canvas._scene_canvas
    except AttributeError:
        return []
    app = QApplication.instance()
    times = []
    for _ in range(repeats):
        scene_canvas.update()
        start = time.perf_counter()
        app.processEvents()
        times.append(time.perf_counter() - start)
        pause = time.monotonic()
        run_loop(lambda: time.monotonic() - pause > 0.3, 1.0)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150, help="training steps (default 150)")
    parser.add_argument("--worst", type=int, default=5, help="how many of the worst gaps to list")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds to keep measuring after the panel is idle again (the canvas redraws)")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    parser.add_argument("--no-stacks", action="store_true", help="do not sample the GUI thread's stack")
    args = parser.parse_args(argv)
    os.environ.setdefault("PROTOSEG_PROJECTS_DIR", tempfile.mkdtemp(prefix="protoseg-stalls-"))

    import napari
    import numpy as np
    from napari.layers import Layer
    from qtpy.QtCore import QEventLoop, QTimer
    from qtpy.QtWidgets import QLabel, QPushButton

    from napari_protoseg.plugin.sample_data import napari_sample
    from napari_protoseg.training.engine import warmup_for_steps

    viewer = napari.Viewer(title="protoseg event loop", show=True)
    viewer.window._qt_window.resize(*WINDOW_SIZE)
    for data, meta, kind in napari_sample():
        viewer.add_layer(Layer.create(data, meta, kind))
    def run_loop(until, timeout: float) -> None:
        """Run napari's event loop until ``until()`` (checked every 50 ms) or ``timeout`` seconds."""
        loop = QEventLoop()
        deadline = time.monotonic() + timeout
        check = QTimer()
        check.setInterval(50)
        check.timeout.connect(lambda: (until() or time.monotonic() > deadline) and loop.quit())
        check.start()
        loop.exec()
        check.stop()

    start = time.monotonic()
    run_loop(lambda: time.monotonic() - start > 1.5, 5.0)
    repaints = canvas_repaint_times(viewer, run_loop)
    if repaints:
        print(f"before the run, a plain repaint of the canvas took {', '.join(f'{1000 * t:.0f}' for t in repaints)} ms "
              "(the least any change on the canvas costs the event loop here)")

    events: list[tuple[float, str]] = []  # (time, what happened)
    beats: list[float] = []
    labels = []
    state = {"training done": False}

    def note(text: str) -> None:
        events.append((time.perf_counter(), text))

    def layer_inserted(event) -> None:
        layer = event.value
        note(f"layer '{layer.name}' inserted")
        if layer.name.startswith("Prediction"):
            layer.events.set_data.connect(lambda *_e, name=layer.name: note(f"layer '{name}' data set"))

    viewer.layers.events.inserted.connect(layer_inserted)
    viewer.layers.events.removed.connect(lambda event: note(f"layer '{event.value.name}' removed"))

    def beat() -> None:
        beats.append(time.perf_counter())
        if not state["training done"]:
            for label in labels:
                text = label.text()
                if text.startswith(("Finished ", "Stopped at")):
                    state["training done"] = True
                    note("training finished")
                    break

    heartbeat = QTimer()
    heartbeat.setInterval(BEAT_MS)
    heartbeat.timeout.connect(beat)
    heartbeat.start()
    sampler = None if args.no_stacks else StackSampler()
    if sampler is not None:
        sampler.start()
    run_loop(lambda: len(beats) > 10, 5.0)

    # Opening the panel on the image: napari's work for the review layers happens here (hidden layers).
    note("opening the panel")
    opened = events[-1][0]
    _, panel = viewer.window.add_plugin_dock_widget("napari-protoseg", "protoseg")
    note("panel open")
    panel_built = events[-1][0]
    config = panel.session.train_config
    panel.set_train_config(replace(config, steps=args.steps,
                                   pseudo_label_warmup=warmup_for_steps(config, args.steps)))
    panel.confirm = lambda question: True
    train_button = next(b for b in panel.findChildren(QPushButton) if b.text() == TRAIN_BUTTON_TEXT)
    labels.extend(panel.findChildren(QLabel))
    warmed = getattr(panel, "warmed_up", None)
    run_loop(lambda: warmed is None or warmed.is_set(), 60.0)
    settled = time.monotonic()
    run_loop(lambda: time.monotonic() - settled > 2.0, 5.0)
    made = [t for t, e in events if e.startswith("layer 'Prediction")]
    opening = np.diff(np.asarray([panel_built] + [b for b in beats if b > panel_built]))
    during_review = [t1 - t0 for t0, t1 in zip([panel_built] + beats, beats)
                     if t1 > panel_built and any(t0 < t <= t1 for t in made)]
    print(f"opening the panel: building it took {1000 * (panel_built - opened):.0f} ms; then until idle, worst gap "
          f"{1000 * opening.max(initial=0):.0f} ms; {len(made)} review layers made, in gaps of "
          + (", ".join(f"{1000 * g:.0f}" for g in during_review) or "-") + " ms")

    note("clicked 'Train on current labels'")
    clicked = events[-1][0]
    train_button.click()
    note("training")

    def finished() -> bool:
        return train_button.isEnabled() and any(n.startswith("Prediction") for n in (la.name for la in viewer.layers))

    run_loop(finished, args.timeout)
    note("panel idle again")
    done = events[-1][0]
    idle = time.monotonic()
    run_loop(lambda: time.monotonic() - idle > args.settle, args.settle + 5)
    end = time.perf_counter()
    heartbeat.stop()
    if sampler is not None:
        sampler.running = False

    stamps = np.asarray([clicked] + [b for b in beats if clicked < b <= end])
    gaps = np.diff(stamps)
    order = np.argsort(gaps)[::-1][: args.worst]
    ok = finished()
    print(f"napari_protoseg from {Path(sys.modules['napari_protoseg'].__file__).parent}")
    print(f"train-and-predict run: {done - clicked:.1f} s ({'done' if ok else 'NOT done'}; steps {args.steps}), "
          f"measured {end - clicked:.1f} s with {len(stamps) - 1} beats of {BEAT_MS} ms")
    print(f"worst gap: {1000 * gaps.max():.0f} ms; gaps over {1000 * STALL_SECONDS:.0f} ms: "
          f"{int(np.sum(gaps > STALL_SECONDS))} (together {np.sum(gaps[gaps > STALL_SECONDS]):.2f} s); "
          f"median gap {1000 * np.median(gaps):.0f} ms")
    marks = [(clicked, "training"),
             (next((t for t, e in events if e == "training finished"), done), "prediction (review layers shown, written)"),
             (done, "after the run (redraws)")]
    marks.sort()
    phase = np.searchsorted([t for t, _ in marks], stamps[:-1], side="right") - 1
    for k, (_, name) in enumerate(marks):
        inside = gaps[phase == k]
        if len(inside):
            print(f"  {name}: {len(inside)} gaps, worst {1000 * inside.max():.0f} ms, "
                  f"{int(np.sum(inside > STALL_SECONDS))} over {1000 * STALL_SECONDS:.0f} ms")
    print(f"the {len(order)} worst gaps:")
    for rank, i in enumerate(order, start=1):
        t0, t1 = stamps[i], stamps[i + 1]
        before = [text for t, text in events if t <= t0]
        during = [text for t, text in events if t0 < t <= t1]
        print(f"{rank}. {1000 * (t1 - t0):4.0f} ms at +{t0 - clicked:6.2f} s, after '{before[-1] if before else '-'}'"
              + (f"; during: {'; '.join(during)}" if during else ""))
        if sampler is not None:
            places = collections.Counter(w for t, s in sampler.samples if t0 < t <= t1 and (w := _where(s)))
            count = sum(1 for t, _ in sampler.samples if t0 < t <= t1)
            for where, n in places.most_common(3):
                print(f"     {n}/{count} samples: {where}")
    viewer.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
