"""Reference servers that `convserve-bench --suite` measures convserve against.

- `noop`: answers KServe v2 inference with zeros of the model's output shape (the transport alone);
- `naive`: runs the ONNX model with onnxruntime inline in the request handler, no batching, no
  checks beyond what decoding needs (what a hand-written server does).

Each exists on stock `grpc.aio` (`grpc_server`) and on stock aiohttp (`http_server`). They import
nothing from `service` (an import-linter contract checks it) and have their own generated stubs in
`_proto`, so making convserve faster or slower cannot change them. They are frozen: the figures
they give are only comparable across runs as long as these files stay as they are.
"""
