"""What a model is, shared by training and serving: architectures, weights, preprocessing, the artifact and
its life in the BentoML model store. Importing this package does not import torch."""
from tuneserve.models.artifact import ModelCard
from tuneserve.models.preprocessing import ImageDecodeError, Preprocessing, eval_transform, load_image, preprocess

__all__ = ["ImageDecodeError", "ModelCard", "Preprocessing", "eval_transform", "load_image", "preprocess"]
