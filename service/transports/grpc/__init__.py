"""gRPC servicers: protobuf messages to the data plane's types and back, nothing more."""
