"""LeNet-5: shapes, uint8 input, normalisation inside the model, the 84-d features."""

from dataclasses import asdict

import pytest
import torch

from training.models.lenet import LeNet5, LeNetConfig


@pytest.fixture
def model() -> LeNet5:
    torch.manual_seed(0)
    return LeNet5(LeNetConfig(mean=0.3, std=0.33)).eval()


def test_logits_shape_from_uint8(model: LeNet5) -> None:
    x = torch.randint(0, 256, (5, 1, 32, 32), dtype=torch.uint8)
    logits = model(x)
    assert logits.shape == (5, 10)
    assert logits.dtype == torch.float32


def test_features_are_the_fc84_activations(model: LeNet5) -> None:
    x = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    features = model.features(x)
    assert features.shape == (3, 84)
    assert (features >= 0).all(), "features are taken after the ReLU"
    torch.testing.assert_close(model.fc3(features), model(x))


def test_normalisation_uses_the_config(model: LeNet5) -> None:
    x = torch.full((1, 1, 32, 32), 255, dtype=torch.uint8)
    expected = (1.0 - 0.3) / 0.33
    torch.testing.assert_close(model.normalise(x), torch.full((1, 1, 32, 32), expected))
    # uint8 and the same values as floats give the same logits: the cast is part of the model
    torch.testing.assert_close(model(x), model(x.float()))


def test_wrong_shape_is_rejected(model: LeNet5) -> None:
    with pytest.raises(AssertionError, match=r"expected \(N, 1, 32, 32\)"):
        model(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))


def test_config_round_trips_through_a_dict(model: LeNet5) -> None:
    rebuilt = LeNet5(LeNetConfig(**asdict(model.config)))
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(rebuilt.eval()(x), model(x))
