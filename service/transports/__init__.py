"""The ways in: gRPC (task API and KServe v2) and HTTP/REST; each turns wire messages into calls and back."""
