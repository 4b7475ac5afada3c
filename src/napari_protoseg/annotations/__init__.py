"""Annotations and project folders: the class table, masks, boxes, points and tags, their
validation and atomic writing, and the synthetic EM sample. NumPy only: no PyTorch, no napari."""
