"""Bottom-up and top-down attention (Anderson et al., 2018) for the generated scenes.

Bottom up: a small one-stage detector (a CenterNet-style heat map of object centres on a 16x16
grid) proposes `regions` object regions per image. It is trained on the boxes and attributes that
the scene generator knows, so each region comes with its box, how sure the detector is that an
object is there, and the detector's own belief about the object's colour, shape and size. A
region's feature is those factors side by side, not one entangled CNN vector: a red square, which
training never shows, is then "red" in one part of the vector and "square" in another, as every
other pair is.

The factors are only worth that if the detector does not entangle them itself: a network that has
never seen a blue circle learns that blue things are not circles. So colour and the rest come from
two branches: a shallow colour branch with a small receptive field reads the image as it is, and
the trunk that finds objects and names their shape and size is trained on images whose colour
channels are shuffled (`permutation`), so no colour tells it anything about a shape.

Top down: two LSTMs per word, as in the paper. The attention LSTM reads the previous word, the
language LSTM's last state and a summary of all regions; its state weighs the regions (additive
attention); the language LSTM reads the attended region and the attention LSTM's state and
predicts the word.

The decoder keeps the factors apart too. A decoder that reads whole region vectors and its own
previous words learns that "blue" is never followed by "circle", and says "a blue triangle" for a
blue circle. So the two LSTMs only ever see where regions are and how sure the detector is, never
what they are, and read each colour, shape and size word they said as just "a colour", "a shape",
"a size"; they decide which region comes next and what kind of word. Which colour, shape or size
that word is comes from the attended region's attribute probabilities alone, added (as
log-probabilities, with a learned gain per attribute) to the logits of the words that name them.

The encoder and one decoder step have the show-attend-tell captioner's interface (see
training/models/captioner.py): `encoder(images)` gives the features attended over, the decoder's
`prepare` and `step` take and give the same tensors, and h, c hold both LSTMs' states side by
side, so the same decoding, export and server code run both models.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from training.data.scenes import COLOURS, SHAPES, SIZES
from training.models.captioner import PAD, SPECIAL_TOKENS, DecoderState, coordconv_stem, coordinates
from training.models.resnet import BasicBlock

#: The factors a region's feature holds, in order: attribute probabilities, then its box, then
#: how sure the detector is that it holds an object. Every attribute value is also a word.
ATTRIBUTES: dict[str, tuple[str, ...]] = {"colour": tuple(COLOURS), "shape": SHAPES, "size": tuple(SIZES)}
ATTRIBUTE_DIM = sum(len(values) for values in ATTRIBUTES.values())
BOX_FEATURES = 4  # centre x, centre y, width, height, in fractions of the image
STRIDE = 4  # image pixels per heat-map cell


@dataclass
class BottomUpTopDownConfig:
    vocabulary: list[str]  # index -> word; starts with SPECIAL_TOKENS
    image_size: int = 64
    widths: tuple[int, ...] = (24, 32, 48, 64)  # the stem's (stride 2), one block at stride 2, then stride 1
    regions: int = 4  # regions proposed per image: at most three objects, and one to spare
    embed_dim: int = 64
    hidden_dim: int = 128  # each LSTM's: they only track order and word kinds
    attention_dim: int = 64
    dropout: float = 0.3
    max_length: int = 24  # words, not counting <start> and <end>
    max_repeats: int | None = None  # the most times a caption may say one word; None: any number
    instance_norm: bool = False  # IBN trunk stem and first block (see models/resnet.py InstanceBatchNorm)
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])

    def __post_init__(self) -> None:
        self.widths = tuple(self.widths)
        assert tuple(self.vocabulary[: len(SPECIAL_TOKENS)]) == SPECIAL_TOKENS, (
            f"the vocabulary must start with {SPECIAL_TOKENS}"
        )
        assert self.image_size % STRIDE == 0, f"the image size must be a multiple of {STRIDE}"

    @property
    def map_size(self) -> int:
        """Cells per side of the heat map."""
        return self.image_size // STRIDE

    @property
    def positions(self) -> int:
        """L: what the decoder attends over."""
        return self.regions

    @property
    def feature_dim(self) -> int:
        return ATTRIBUTE_DIM + BOX_FEATURES + 1

    @property
    def state_dim(self) -> int:
        """h and c hold the attention LSTM's state, then the language LSTM's."""
        return 2 * self.hidden_dim


@dataclass
class DetectorOutput:
    """Per heat-map cell: (N, 1, S, S) centre logits, (N, 2, S, S) offsets and sizes, attribute logits."""

    centre: torch.Tensor
    offset: torch.Tensor  # where in its cell the centre lies, 0..1 (sigmoid)
    size: torch.Tensor  # box width and height in fractions of the image
    attributes: dict[str, torch.Tensor]  # name -> (N, values, S, S) logits


class Detector(nn.Module):
    """uint8 (N, 3, H, W) -> per-cell predictions on a (H/4, W/4) map: object centres, boxes, attributes.

    The trunk (centres, boxes, shape, size) and the colour branch see the image separately; see the
    module's docstring.
    """

    def __init__(self, config: BottomUpTopDownConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.stem = coordconv_stem(c.widths[0], c.instance_norm)
        blocks, previous = [], c.widths[0]
        for i, width in enumerate(c.widths[1:]):
            blocks.append(
                BasicBlock(previous, width, stride=2 if i == 0 else 1, instance=c.instance_norm and i == 0)
            )
            previous = width
        self.blocks = nn.Sequential(*blocks)
        self.centre = nn.Conv2d(previous, 1, 1)
        nn.init.constant_(self.centre.bias, -2.2)  # start by saying "no object" (~10 %) everywhere
        self.offset = nn.Conv2d(previous, 2, 1)
        self.size = nn.Conv2d(previous, 2, 1)
        self.attributes = nn.ModuleDict(
            {name: nn.Conv2d(previous, len(v), 1) for name, v in ATTRIBUTES.items() if name != "colour"}
        )
        self.colour = nn.Sequential(  # receptive field 11 px: an object's colour, little of its outline
            nn.Conv2d(3, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 24, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(24),
            nn.ReLU(inplace=True),
            nn.Conv2d(24, 32, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, len(ATTRIBUTES["colour"]), 1),
        )
        self.register_buffer("coords", coordinates(c.image_size), persistent=False)  # (1, 2, H, W): x, y
        self.register_buffer("mean", torch.tensor(c.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(c.std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, permutation: torch.Tensor | None = None) -> DetectorOutput:
        """`permutation` (N, 3): the order of colour channels the trunk sees, per image (training only)."""
        c = self.config
        assert images.ndim == 4 and images.shape[1:] == (3, c.image_size, c.image_size), (
            f"expected (N, 3, {c.image_size}, {c.image_size}), got {tuple(images.shape)}"
        )
        x = (images.float() / 255.0 - self.mean) / self.std
        colour = self.colour(x)  # (N, colours, S, S)
        if permutation is not None:
            x = x.gather(1, permutation.view(-1, 3, 1, 1).expand_as(x))
        x = torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1)], dim=1)  # (N, 5, H, W)
        x = self.blocks(self.stem(x))  # (N, C, S, S)
        heads = {name: head(x) for name, head in self.attributes.items()}
        return DetectorOutput(
            centre=self.centre(x),
            offset=torch.sigmoid(self.offset(x)),
            size=F.softplus(self.size(x)) * 0.25,
            attributes={name: colour if name == "colour" else heads[name] for name in ATTRIBUTES},
        )


class RegionEncoder(nn.Module):
    """uint8 images -> the `regions` strongest object centres as factored region features (N, R, F)."""

    def __init__(self, config: BottomUpTopDownConfig) -> None:
        super().__init__()
        self.config = config
        self.detector = Detector(config)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.detect(images)[0]

    def detect(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (N, R, F), boxes (N, R, 4): left, top, right, bottom in fractions of the image)."""
        c = self.config
        out = self.detector(images)
        heat = torch.sigmoid(out.centre)  # (N, 1, S, S)
        peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat).float()  # one cell per object
        score, index = peaks.flatten(1).topk(c.regions, dim=1)  # (N, R): strongest first

        def at_peaks(maps: torch.Tensor) -> torch.Tensor:  # (N, K, S, S) -> (N, R, K)
            flat = maps.flatten(2)
            return flat.gather(2, index.unsqueeze(1).expand(-1, flat.shape[1], -1)).transpose(1, 2)

        cells = c.map_size
        column = (index % cells).float()
        row = torch.div(index, cells, rounding_mode="floor").float()
        offset, size = at_peaks(out.offset), at_peaks(out.size)  # (N, R, 2) each
        centre_x = (column + offset[..., 0]) / cells
        centre_y = (row + offset[..., 1]) / cells
        geometry = torch.stack([centre_x, centre_y, size[..., 0], size[..., 1]], dim=2)  # (N, R, 4)
        factors = [F.softmax(at_peaks(out.attributes[name]), dim=2) for name in ATTRIBUTES]
        features = torch.cat([*factors, geometry, score.unsqueeze(2)], dim=2)  # (N, R, F)
        half = geometry[..., 2:] / 2
        boxes = torch.cat([geometry[..., :2] - half, geometry[..., :2] + half], dim=2).clamp(0.0, 1.0)
        return features, boxes


class TopDownDecoder(nn.Module):
    """One word per step: attention LSTM, attention over the regions, language LSTM, the word."""

    def __init__(self, config: BottomUpTopDownConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        vocab, hidden = len(c.vocabulary), c.hidden_dim
        where = c.feature_dim - ATTRIBUTE_DIM  # box and confidence
        self.embedding = nn.Embedding(vocab, c.embed_dim, padding_idx=PAD)
        self.summary = nn.Sequential(nn.Linear(2 * where + 1, hidden), nn.ReLU())  # the regions as a set
        self.init_state = nn.Linear(hidden, 4 * hidden)  # h1, h2, c1, c2
        self.attention_lstm = nn.LSTMCell(hidden + hidden + c.embed_dim, hidden)  # h2, summary, word
        self.attend_features = nn.Linear(where, c.attention_dim)  # precomputed once per image
        self.attend_hidden = nn.Linear(hidden, c.attention_dim)
        self.attention_score = nn.Linear(c.attention_dim, 1)
        self.language_lstm = nn.LSTMCell(where + hidden, hidden)  # attended region's box, h1
        self.out_hidden = nn.Linear(hidden, vocab)
        self.dropout = nn.Dropout(c.dropout)
        # Each attribute value's word, and the input word every value of an attribute reads as.
        index = {word: i for i, word in enumerate(c.vocabulary)}
        value_words = torch.zeros(ATTRIBUTE_DIM, vocab)
        reads_as = torch.arange(vocab)
        group = []
        for g, values in enumerate(ATTRIBUTES.values()):
            known = [index[v] for v in values if v in index]
            for value in values:
                group.append(g)
                if value in index:
                    value_words[len(group) - 1, index[value]] = 1.0
                    reads_as[index[value]] = min(known)
        self.register_buffer("value_words", value_words, persistent=False)  # (A, V)
        self.register_buffer("reads_as", reads_as, persistent=False)  # (V,)
        self.register_buffer("value_group", torch.tensor(group), persistent=False)  # (A,)
        self.gain = nn.Parameter(torch.ones(len(ATTRIBUTES)))  # how much each attribute's belief counts

    def summarise(self, features: torch.Tensor) -> torch.Tensor:
        """(N, R, F) -> (N, hidden): how many objects the detector is sure of, and the mean and
        spread of where they are, weighted by how sure it is of each."""
        where = features[..., ATTRIBUTE_DIM:]
        weight = features[..., -1:]  # (N, R, 1) the detector's confidence
        count = weight.sum(dim=1)  # (N, 1): the expected number of objects
        total = count.clamp_min(1e-3)
        mean = (weight * where).sum(dim=1) / total  # (N, W)
        spread = ((weight * (where - mean.unsqueeze(1)) ** 2).sum(dim=1) / total + 1e-6).sqrt()
        return self.summary(torch.cat([mean, spread, count], dim=1))

    def prepare(self, features: torch.Tensor) -> tuple[torch.Tensor, DecoderState]:
        """Per image, once: the projected features the attention reuses, and the initial state."""
        hidden = self.config.hidden_dim
        h1, h2, c1, c2 = torch.tanh(self.init_state(self.summarise(features))).split(hidden, dim=1)
        projected = self.attend_features(features[..., ATTRIBUTE_DIM:])
        return projected, DecoderState(torch.cat([h1, h2], 1), torch.cat([c1, c2], 1))

    def step(
        self, tokens: torch.Tensor, state: DecoderState, features: torch.Tensor, projected: torch.Tensor
    ) -> tuple[torch.Tensor, DecoderState, torch.Tensor]:
        """tokens (N,) -> logits (N, V), the next state and the attention weights (N, R)."""
        hidden = self.config.hidden_dim
        h1, h2 = state.h.split(hidden, dim=1)
        c1, c2 = state.c.split(hidden, dim=1)
        summary = self.summarise(features)
        embedded = self.embedding(self.reads_as[tokens])  # a colour word reads as "a colour", ...
        h1, c1 = self.attention_lstm(torch.cat([h2, summary, embedded], dim=1), (h1, c1))
        scores = self.attention_score(torch.tanh(projected + self.attend_hidden(h1).unsqueeze(1)))
        alpha = F.softmax(scores.squeeze(2), dim=1)  # (N, R)
        attended = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # (N, F)
        h2, c2 = self.language_lstm(torch.cat([attended[:, ATTRIBUTE_DIM:], h1], dim=1), (h2, c2))
        belief = (
            torch.log(attended[:, :ATTRIBUTE_DIM].clamp_min(1e-6)) * self.gain[self.value_group]
        )  # (N, A)
        logits = self.out_hidden(self.dropout(h2)) + belief @ self.value_words  # (N, V)
        return logits, DecoderState(torch.cat([h1, h2], 1), torch.cat([c1, c2], 1)), alpha

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing from region features: tokens (N, T) -> logits (N, T-1, V), alphas (N, T-1, R)."""
        projected, state = self.prepare(features)
        logits, alphas = [], []
        for t in range(tokens.shape[1] - 1):
            step_logits, state, alpha = self.step(tokens[:, t], state, features, projected)
            logits.append(step_logits)
            alphas.append(alpha)
        return torch.stack(logits, 1), torch.stack(alphas, 1)


class BottomUpTopDown(nn.Module):
    """The region encoder and the top-down decoder, trained one after the other (see train_butd)."""

    def __init__(self, config: BottomUpTopDownConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = RegionEncoder(config)
        self.decoder = TopDownDecoder(config)
