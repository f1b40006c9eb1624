"""On-device side of cellseg: frames in, measurements out. Its folders, in the order data flows:

- ``capture/``: where frames come from (folders, image lists, video, cameras) and image reading;
- ``pipeline/``: one frame through preprocess, postprocess and measurement, and the contract
  every backend's pipeline keeps;
- ``engines/``: the inference backends (ONNX Runtime; TensorRT with CUDA kernels) and their registry;
- ``bundles/``: signed engine bundles, the slot store, flashing, which engine a device opens;
- ``service/``: the daemon, its MQTT contract, spool, publisher and health;
- ``growth/``: growth fits (doubling time, passage ETA) and their picture;
- ``tools/``: ``predict``, ``growth``, ``bench``, ``doctor``, ``validate-config``;
- and beside them what all share: ``config``, ``errors``, ``device`` (facts about this
  machine), ``hashing``.

Imports only numpy, OpenCV and the standard library at module level; hardware SDKs
(tensorrt, pycuda) are imported inside their backend modules, and torch/ultralytics never.
"""
