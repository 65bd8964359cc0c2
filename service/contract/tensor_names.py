"""The input and output names of the exported ONNX graphs: trainer and server use the same names.

A classifier's and a generator's names are also written into their manifests (`input.name`,
`output_name`, the generator section), and the server reads them there; the captioner's two graphs
are bound to the names below. A test exports each graph and holds its names against this module.
"""

from __future__ import annotations

#: A classifier: uint8 images (N, C, H, W) -> logits (N, classes).
CLASSIFIER_INPUT = "image"
CLASSIFIER_OUTPUT = "logits"

#: A label-conditional generator: latents z (N, latent) float32 and labels (N,) int64 -> uint8 images.
GENERATOR_INPUTS = ("z", "label")
GENERATOR_OUTPUT = "image"

#: The captioner's encoder, run once per image: the image -> its features, their attention
#: projection and the decoder's initial state.
ENCODER_INPUTS = ("image",)
ENCODER_OUTPUTS = ("features", "projected", "h", "c")
#: The captioner's decoder, one step per word: token, h, c and image_index per hypothesis, features
#: and projected once per image (the graph gathers them by image_index).
DECODER_INPUTS = ("token", "h", "c", "features", "projected", "image_index")
DECODER_OUTPUTS = ("log_probs", "next_h", "next_c", "alpha")
#: Decoder graphs exported before image_index take features and projected once per hypothesis.
PER_HYPOTHESIS_DECODER_INPUTS = DECODER_INPUTS[:5]
#: The encoder of a captioner that attends over object regions also outputs their boxes (N, L, 4):
#: left, top, right, bottom in fractions of the image's width and height.
REGION_BOXES = "boxes"
