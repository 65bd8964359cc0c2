"""Per-image normalisation (IBN) in the residual network: scenes-resnet and the caption encoders."""

import torch

from training.models.resnet import InstanceBatchNorm, ResNet, ResNetConfig


def test_the_instance_half_ignores_how_bright_and_contrasty_a_picture_is() -> None:
    torch.manual_seed(0)
    norm = InstanceBatchNorm(8).eval()
    x = torch.randn(2, 8, 16, 16)
    gain, offset = torch.rand(2, 8, 1, 1) + 0.5, torch.randn(2, 8, 1, 1)
    before, after = norm(x), norm(x * gain + offset)
    assert torch.allclose(before[:, :4], after[:, :4], atol=1e-4)  # per-image statistics
    assert not torch.allclose(before[:, 4:], after[:, 4:], atol=1e-2)  # the training set's statistics


def test_an_image_gets_the_same_logits_alone_as_in_a_batch() -> None:
    torch.manual_seed(0)
    model = ResNet(ResNetConfig(instance_norm=True)).eval()
    images = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        batch = model(images)
        alone = torch.cat([model(image.unsqueeze(0)) for image in images])
    assert torch.allclose(batch, alone, atol=1e-5)
    assert isinstance(model.stem[1], InstanceBatchNorm) and isinstance(model.blocks[0].bn1, InstanceBatchNorm)
    assert not isinstance(
        model.blocks[1].bn1, InstanceBatchNorm
    )  # only the first layers: appearance, not content
