"""Running ONNX graphs: onnxruntime sessions and their providers, and the dynamic batcher."""
