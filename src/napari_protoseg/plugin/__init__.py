"""The napari side: annotations to layers and back, the reader and writer, the sample data, the
Qt-free session behind the panel, and the panel itself (the only Qt code)."""
