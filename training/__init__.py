"""Training stage: dataset import, training, evaluation and ONNX export.

Needs ultralytics and torch (the ``train`` extra); the device never imports this package.
"""
