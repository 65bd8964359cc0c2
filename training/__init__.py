"""Offline training of the served models: datasets, nn.Modules, train loops, ONNX export."""
