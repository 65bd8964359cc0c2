"""The ways in: gRPC (task API and KServe v2) and HTTP/REST; each turns wire messages into the data
plane's requests and its results back into wire messages."""
