"""Inference backends: an engine (load, warm up, infer, close) and the pipeline that runs
frames through it, registered in one table (:mod:`cellseg.edge.engines.registry`). ONNX Runtime
on any CPU; TensorRT with CUDA pre- and postprocessing kernels on a Jetson or an NVIDIA GPU
(tensorrt and pycuda are imported inside their modules, only when that backend runs)."""
