"""Prediction with a trained model: tiled and lazy inference, the instance decoders, and the one
pipeline that turns a model and an image into class maps, confidence and instances."""
