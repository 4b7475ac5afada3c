"""The learning engine (PyTorch): crops sampled at the annotations with their targets, the DSP and
WISE-Net losses, and training with progress events, stop, checkpoints and resume."""
