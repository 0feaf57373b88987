"""Baselines that `mtbench compare` measures mtserve against, in the same run.

- `zmq_server`: the bare transport, a hand-written ZeroMQ + ONNX Runtime server that
  speaks the same tenant protocol subset (PING, INFER), so the mtserve clients drive it.
- `ray_serve`: Ray Serve with model multiplexing (optional dependency `ray[serve]`).
"""
