"""On-device side of cellseg: frames in, measurements out.

Imports only numpy, OpenCV and the standard library at module level; hardware SDKs
(tensorrt, pycuda) are imported inside their backend modules, and torch/ultralytics never.
"""
