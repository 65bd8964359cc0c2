"""gRPC servicers: translate protos to pipeline calls and back, nothing more."""
