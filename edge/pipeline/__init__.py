"""One frame, from pixels to a measurement: the typed seams (``types``), preprocess, the
host postprocess, measurement, and :class:`~cellseg.edge.pipeline.contract.Pipeline`, the one
contract every backend's pipeline keeps (frame in, :class:`~cellseg.edge.pipeline.contract.FrameResult`
out). numpy and OpenCV only; no engine, no I/O."""
