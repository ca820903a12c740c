"""CNN feature extraction: model recipes, preprocessing, ONNX export and serving helpers.

Serving needs NumPy, OpenCV and onnxruntime only; ``architectures`` and ``export``
import torch and are used at export time (the ``export`` extra).
"""
