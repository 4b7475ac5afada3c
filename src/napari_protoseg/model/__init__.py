"""The network and its file (PyTorch): the U-Net with the Decoupled-Semantic-Prototypes head and the
WISE-Net instance heads, what it sees of an image, and the model file (weights and JSON, no pickle)."""
