"""Generated from protos/inference with grpc_tools.protoc; frozen with the reference servers."""
