"""Show, attend and tell (Xu et al., 2015): a residual CNN encoder and an LSTM decoder with soft attention.

The encoder turns a uint8 image into a grid of feature vectors; the decoder emits one word per
step, attending over the grid with additive attention, a gating scalar on the attended context
and the "deep output" layer of the paper. The encoder and one decoder step are separate
modules because they are exported as separate ONNX graphs: the server runs the encoder once per
image and the step once per word, batching the steps of many captions together.

Two things the paper does not have, both because spatial relations ("left of") need to know
where an object is: the encoder sees two coordinate channels next to RGB (CoordConv), and the
grid gets a learned position embedding. And, in training only, an auxiliary head (`objects`)
asks each grid cell whether an object's centre falls in it and, if so, its colour, shape and size
(the scene generator knows them): with scenes drawn in many styles, the caption loss alone taught
the encoder shapes too slowly. The head is not part of the exported graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from training.models.resnet import BasicBlock, norm_layer

PAD, START, END, UNKNOWN = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<start>", "<end>", "<unk>")


@dataclass
class CaptionerConfig:
    vocabulary: list[str]  # index -> word; starts with SPECIAL_TOKENS
    image_size: int = 64
    widths: tuple[int, ...] = (24, 48, 96)  # the stem's, then one residual block per width, each halving H, W
    embed_dim: int = 64
    hidden_dim: int = 256
    attention_dim: int = 128
    dropout: float = 0.3
    max_length: int = 24  # words, not counting <start> and <end>
    max_repeats: int | None = None  # the most times a caption may say one word; None: any number
    objects_head: bool = False  # the auxiliary per-cell object head (training only)
    instance_norm: bool = False  # IBN stem and first block (see models/resnet.py InstanceBatchNorm)
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.25, 0.25, 0.25])

    def __post_init__(self) -> None:
        self.widths = tuple(self.widths)
        assert tuple(self.vocabulary[: len(SPECIAL_TOKENS)]) == SPECIAL_TOKENS, (
            f"the vocabulary must start with {SPECIAL_TOKENS}"
        )

    @property
    def grid_size(self) -> int:
        return self.image_size // 2 ** len(self.widths)

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]

    @property
    def positions(self) -> int:
        """L: the grid cells the decoder attends over."""
        return self.grid_size**2

    @property
    def state_dim(self) -> int:
        return self.hidden_dim


def coordconv_stem(width: int, instance_norm: bool = False) -> nn.Sequential:
    """The first layer of an encoder that sees RGB and the x, y coordinate channels: stride 2."""
    return nn.Sequential(
        nn.Conv2d(3 + 2, width, 3, stride=2, padding=1, bias=False),
        norm_layer(width, instance_norm),
        nn.ReLU(inplace=True),
    )


def coordinates(size: int) -> torch.Tensor:
    """(1, 2, size, size): x then y, each -1 at the first pixel and 1 at the last (CoordConv)."""
    axis = torch.linspace(-1.0, 1.0, size)
    return torch.stack([axis.view(1, -1).expand(size, -1), axis.view(-1, 1).expand(-1, size)]).unsqueeze(0)


class Encoder(nn.Module):
    """uint8 (N, 3, H, W) -> features (N, L, D), L = grid cells (8x8 for 64x64 images), D = last width."""

    def __init__(self, config: CaptionerConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.stem = coordconv_stem(c.widths[0], c.instance_norm)
        blocks, previous = [], c.widths[0]
        for width in c.widths[1:]:
            blocks.append(BasicBlock(previous, width, stride=2, instance=c.instance_norm and not blocks))
            previous = width
        self.blocks = nn.Sequential(*blocks)
        self.position = nn.Parameter(torch.zeros(1, c.grid_size**2, c.feature_dim))
        nn.init.normal_(self.position, std=0.02)
        self.register_buffer("coords", coordinates(c.image_size), persistent=False)  # (1, 2, H, W): x, y
        self.register_buffer("mean", torch.tensor(c.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(c.std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        c = self.config
        assert images.ndim == 4 and images.shape[1:] == (3, c.image_size, c.image_size), (
            f"expected (N, 3, {c.image_size}, {c.image_size}), got {tuple(images.shape)}"
        )
        x = (images.float() / 255.0 - self.mean) / self.std
        x = torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1)], dim=1)  # (N, 5, H, W)
        x = self.blocks(self.stem(x))  # (N, D, g, g)
        return x.flatten(2).transpose(1, 2) + self.position  # (N, L, D)


@dataclass
class DecoderState:
    h: torch.Tensor  # (N, hidden)
    c: torch.Tensor  # (N, hidden)


class Decoder(nn.Module):
    """One word per step: attend over the features with h, gate the context, advance the LSTM, predict."""

    def __init__(self, config: CaptionerConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        vocab, d = len(c.vocabulary), c.feature_dim
        self.embedding = nn.Embedding(vocab, c.embed_dim, padding_idx=PAD)
        self.init_h = nn.Linear(d, c.hidden_dim)
        self.init_c = nn.Linear(d, c.hidden_dim)
        self.attend_features = nn.Linear(d, c.attention_dim)  # precomputed once per image
        self.attend_hidden = nn.Linear(c.hidden_dim, c.attention_dim)
        self.attention_score = nn.Linear(c.attention_dim, 1)
        self.gate = nn.Linear(c.hidden_dim, 1)  # beta: how much of the context the step uses
        self.lstm = nn.LSTMCell(c.embed_dim + d, c.hidden_dim)
        self.out_hidden = nn.Linear(c.hidden_dim, c.embed_dim)  # the deep output layer: L_h
        self.out_context = nn.Linear(d, c.embed_dim)  # L_z
        self.out_words = nn.Linear(c.embed_dim, vocab)  # L_o
        self.dropout = nn.Dropout(c.dropout)

    def prepare(self, features: torch.Tensor) -> tuple[torch.Tensor, DecoderState]:
        """Per image, once: the projected features the attention reuses, and the initial state."""
        mean = features.mean(dim=1)  # (N, D)
        state = DecoderState(torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean)))
        return self.attend_features(features), state  # (N, L, A)

    def step(
        self, tokens: torch.Tensor, state: DecoderState, features: torch.Tensor, projected: torch.Tensor
    ) -> tuple[torch.Tensor, DecoderState, torch.Tensor]:
        """tokens (N,) -> logits (N, V), the next state and the attention weights (N, L)."""
        scores = self.attention_score(torch.tanh(projected + self.attend_hidden(state.h).unsqueeze(1)))
        alpha = F.softmax(scores.squeeze(2), dim=1)  # (N, L)
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # (N, D)
        context = torch.sigmoid(self.gate(state.h)) * context
        embedded = self.embedding(tokens)  # (N, E)
        h, c = self.lstm(torch.cat([embedded, context], dim=1), (state.h, state.c))
        deep = embedded + self.out_hidden(self.dropout(h)) + self.out_context(context)
        return self.out_words(self.dropout(deep)), DecoderState(h, c), alpha


#: What the auxiliary head says about each grid cell: object centre here (1 logit), colour (4),
#: shape (3), size (2).
OBJECT_OUTPUTS = 1 + 4 + 3 + 2


class Captioner(nn.Module):
    """Encoder + decoder, with the teacher-forced forward pass used in training."""

    def __init__(self, config: CaptionerConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.objects = nn.Linear(config.feature_dim, OBJECT_OUTPUTS) if config.objects_head else None

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing: tokens (N, T) from <start> -> logits (N, T-1, V) and alphas (N, T-1, L).

        Step t reads tokens[:, t] and predicts tokens[:, t + 1].
        """
        return self.tell(self.encoder(images), tokens)

    def tell(self, features: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing from the encoder's features (N, L, D); see forward."""
        projected, state = self.decoder.prepare(features)
        logits, alphas = [], []
        for t in range(tokens.shape[1] - 1):
            step_logits, state, alpha = self.decoder.step(tokens[:, t], state, features, projected)
            logits.append(step_logits)
            alphas.append(alpha)
        return torch.stack(logits, 1), torch.stack(alphas, 1)
