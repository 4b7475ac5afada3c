"""The image the session works on: which layer it is, its data, and the part of it in view."""

from __future__ import annotations

import numpy as np

from napari_protoseg.annotations.project import check_image
from napari_protoseg.plugin.session.common import PREDICTION_CONFIDENCE, Region, SessionError, problem_lines


class ImageChoice:
    """The chosen image layer of a viewer (the first suitable one unless ``name`` picks another)."""

    def __init__(self, viewer):
        self.viewer = viewer
        self.name: str | None = None  # None: the first suitable image layer

    def layers(self) -> list:
        """Image layers that can be annotated (prediction and preview layers excluded)."""
        from napari.layers import Image

        return [layer for layer in self.viewer.layers
                if isinstance(layer, Image) and layer.name != PREDICTION_CONFIDENCE]

    def layer(self):
        """The chosen image layer; ``SessionError`` when there is none."""
        layers = self.layers()
        if not layers:
            raise SessionError("There is no image. Open an EM image or stack (File > Open, or drag it "
                               "into the window), or a protoseg project folder, first.")
        if self.name is not None:
            for layer in layers:
                if layer.name == self.name:
                    return layer
        return layers[0]

    def data(self) -> np.ndarray:
        """The chosen image as an array, checked to be a single-channel plane or stack."""
        layer = self.layer()
        if layer.rgb:
            raise SessionError(f"The image '{layer.name}' is an RGB colour image, but protoseg segments "
                               "single-channel (grayscale) images. Convert it to grayscale, or right-click "
                               "the layer and choose 'Split RGB', then pick one channel as the image.")
        data = layer.data[0] if layer.multiscale else layer.data
        problems = check_image(data, file=f"The image '{layer.name}'")
        if problems:
            raise SessionError(problem_lines(problems))
        return data

    def shape(self) -> tuple[int, ...]:
        """The checked image's shape, (y, x) or (z, y, x)."""
        return tuple(int(s) for s in np.shape(self.data()))

    def current_plane(self) -> int | None:
        """The plane of the chosen image in view (None for a 2D image)."""
        layer = self.layer()
        if layer.ndim < 3:
            return None
        data_point = np.asarray(layer.world_to_data(self.viewer.dims.point))
        n_planes = int(layer.data.shape[-3] if not layer.multiscale else layer.data[0].shape[-3])
        return int(np.clip(round(float(data_point[-3])), 0, n_planes - 1))

    def plane_shape(self) -> tuple[int, int]:
        layer = self.layer()
        shape = layer.data[0].shape if layer.multiscale else layer.data.shape
        return int(shape[-2]), int(shape[-1])

    def visible_region(self) -> Region:
        """The part of the plane shown on the canvas, in pixels of the image (whole plane at most)."""
        layer = self.layer()
        height, width = self.plane_shape()
        viewer = self.viewer
        camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
        canvas_h, canvas_w = viewer.canvas.size if hasattr(viewer, "canvas") else viewer._canvas_size
        center = np.asarray(viewer.dims.point, dtype=float).copy()
        center[-2:] = np.asarray(camera.center)[-2:]
        half = np.array([canvas_h, canvas_w], dtype=float) / 2.0 / max(camera.zoom, 1e-9)
        low, high = center.copy(), center.copy()
        low[-2:] -= half
        high[-2:] += half
        corners = np.array([layer.world_to_data(low), layer.world_to_data(high)])[:, -2:]
        y0, x0 = np.floor(corners.min(axis=0) + 0.5).astype(int)
        y1, x1 = np.ceil(corners.max(axis=0) + 0.5).astype(int)
        y0, x0 = max(0, int(y0)), max(0, int(x0))
        y1, x1 = min(height, int(y1)), min(width, int(x1))
        if y1 <= y0 or x1 <= x0:
            raise SessionError("The image is not in view; zoom out or press the 'home' button, then try again.")
        return y0, x0, y1, x1

    def place_like_image(self, ndim: int) -> dict:
        """Layer keyword arguments that put a new ``ndim``-D layer on the image (scale, translate)."""
        layer = self.layer()
        return {"scale": layer.scale[-ndim:], "translate": layer.translate[-ndim:]}
