import torch
import torchvision

from pipeline.backbones import resnet18


def test_width_64_is_torchvisions_resnet18():
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    reference.fc = torch.nn.Identity()
    ours = resnet18("imagenet")
    ours.load_state_dict(reference.state_dict(), strict=True)  # same modules and shapes
    ours.eval(), reference.eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(ours(x), reference(x))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())


def test_cifar_stem_is_3x3_stride_1_padding_2_without_maxpool():
    model = resnet18("cifar")
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.padding == (2, 2)
    assert model.conv1.bias is None and isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_width_scales_the_feature_dimension():
    model = resnet18("cifar", width=8)
    assert model.feature_dim == 64 and model(torch.randn(3, 3, 32, 32)).shape == (3, 64)
