"""Render the screenshots of the user guide (docs/user_guide.md) by going through the workflow.

Needs a display; headless: ``xvfb-run -a -s "-screen 0 1600x1000x24" python docs/gui_screenshots.py``.
Trains with the panel's defaults on the CPU (1800 steps, at most 5 minutes: under Xvfb on 2 cores the limit ends
the run); ``--steps`` trades time for prediction quality.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

WINDOW_SIZE = (1500, 950)
TRAIN_STEPS = 1800  # the panel's default on the CPU


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "images")
    parser.add_argument("--steps", type=int, default=TRAIN_STEPS)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="protoseg-shots-"))
    os.environ.setdefault("PROTOSEG_PROJECTS_DIR", str(work / "projects"))

    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from napari_protoseg.annotations.project import write_project
    from napari_protoseg.annotations.synthetic import generate_sample
    from napari_protoseg.plugin.session import PANEL_TIME_LIMIT, PREDICTION_INSTANCES, PREDICTION_SEMANTIC
    from napari_protoseg.training.engine import TrainConfig, warmup_for_steps

    app = QApplication.instance() or QApplication([])

    def pump(seconds: float = 0.3, until=None, timeout: float = 1800.0) -> None:
        start = time.monotonic()
        while True:
            app.processEvents()
            time.sleep(0.01)
            elapsed = time.monotonic() - start
            if until is None and elapsed >= seconds:
                return
            if until is not None and (until() or elapsed > timeout):
                return

    sample = generate_sample(shape=(8, 256, 256), seed=0)
    folder = write_project(work / "em-sample", sample.image, sample.annotations)
    viewer = napari.Viewer(title="protoseg", show=True)
    viewer.window._qt_window.resize(*WINDOW_SIZE)
    viewer.open(str(folder), plugin="napari-protoseg")
    _, panel = viewer.window.add_plugin_dock_widget("napari-protoseg", "protoseg")
    # The panel's defaults (crops, losses, 5 min limit) for the CPU; only the step count can be changed.
    panel.set_train_config(TrainConfig(steps=args.steps, checkpoint_every=50, time_limit=PANEL_TIME_LIMIT,
                                       pseudo_label_warmup=warmup_for_steps(TrainConfig(), args.steps)))
    panel.confirm = lambda question: True
    args.out.mkdir(parents=True, exist_ok=True)

    def show_sections(*names: str) -> None:
        for name, section in panel.sections.items():
            (section.expand if name in names else section.collapse)()
        pump(0.5)

    def shot(name: str) -> None:
        pump(0.8)
        viewer.screenshot(str(args.out / name), canvas_only=False, flash=False)
        print("wrote", args.out / name)

    # 1. Annotate: scribbles on plane 0; the user paints a membrane stroke in the chosen class.
    viewer.layers["Tags"].visible = False
    viewer.dims.set_current_step(0, 0)
    panel.annotate_section.class_combo.setCurrentIndex(panel.session.class_ids.index(2))
    masks = panel.annotate_section.activate_layer("masks")
    masks.brush_size = 3
    # A stroke along a real membrane: the skeleton of the true membrane in a window of plane 0.
    from skimage.morphology import skeletonize

    window = (slice(20, 110), slice(140, 240))
    skeleton = skeletonize(sample.semantic[0][window] == 2)
    for y, x in zip(*np.nonzero(skeleton)):
        masks.paint((0, y + window[0].start, x + window[1].start), 2)
    viewer.reset_view()
    show_sections("Classes", "Annotate")
    shot("gui_annotate.png")

    # 2. Train: the view is on plane 7, which nobody annotated; the preview shows it while training.
    viewer.dims.set_current_step(0, 7)
    viewer.layers.selection.active = viewer.layers[folder.name]
    show_sections("Train")
    panel.train_section.train_button.click()
    train = panel.train_section
    pump(until=lambda: train.last_event is not None and train.last_event.step >= train.last_event.total_steps // 2
         and train.preview_view.shown is not None)
    shot("gui_training.png")

    # 3. Review: the prediction of plane 7 arrives as layers; the user corrects one instance.
    pump(until=lambda: not panel.jobs.busy())
    viewer.layers["Masks"].visible = False
    viewer.layers["Boxes"].visible = False
    viewer.layers["Points"].visible = False
    instances = viewer.layers[PREDICTION_INSTANCES]
    viewer.layers.selection.active = instances
    instances.mode = "paint"
    ids, counts = np.unique(instances.data[7][instances.data[7] > 0], return_counts=True)
    if len(ids):
        instances.selected_label = int(ids[np.argmax(counts)])
    panel.review_section.accept_scope.setCurrentIndex(1)
    show_sections("Review", "Predict")
    shot("gui_review.png")

    # 4. Predict the whole stack and look at what the model was trained on.
    viewer.layers.selection.active = viewer.layers[PREDICTION_SEMANTIC]
    panel.predict_section.predict("stack")
    pump(until=lambda: not panel.jobs.busy())
    viewer.dims.set_current_step(0, 5)
    show_sections("Predict", "Model", "Project")
    shot("gui_model.png")
    viewer.close()


if __name__ == "__main__":
    main()
