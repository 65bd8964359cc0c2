"""Bytes on the wire <-> numpy arrays: encoded and raw images, KServe v2 tensors and datatypes."""
