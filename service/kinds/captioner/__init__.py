"""The captioner kind: an encoder graph per image, then a server-side beam search over the decoder graph."""
