"""convserve: serve classic vision models from ONNX over gRPC."""

__version__ = "0.1.0"
