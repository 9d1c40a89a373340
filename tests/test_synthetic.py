import numpy as np
import pytest
import torch
from torch import nn

from pipeline.datasets import get_dataset
from pipeline.datasets.synthetic import class_names, generate
from pipeline.params import load_params
from tests.helpers import write_params


def test_same_seed_same_bytes_other_seed_other_bytes():
    a, labels_a = generate(np.random.default_rng(5), 10, 20)
    b, labels_b = generate(np.random.default_rng(5), 10, 20)
    c, _ = generate(np.random.default_rng(6), 10, 20)
    assert a.tobytes() == b.tobytes() and np.array_equal(labels_a, labels_b)
    assert a.tobytes() != c.tobytes()


@pytest.mark.parametrize("size", [16, 32])
def test_balanced_classes_of_rgb_images(size):
    images, labels = generate(np.random.default_rng(0), 20, 7, size)
    assert images.shape == (140, size, size, 3) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [7] * 20
    assert len(set(class_names(20))) == 20


def test_prepare_writes_independent_train_and_test(tmp_path):
    path = write_params(tmp_path / "p.yaml", datasets={"synthetic": {"train_per_class": 4, "test_per_class": 2}})
    spec = get_dataset("synthetic")
    spec.prepare(load_params(path), tmp_path / "raw", tmp_path / "downloads")
    data = spec.load(tmp_path / "raw")
    assert len(data.train) == 40 and len(data.test) == 20 and data.classes == class_names(10)
    assert not (data.train.images[:20] == data.test.images).all(axis=(1, 2, 3)).any()


def test_colour_alone_does_not_give_the_class():
    """Nearest class-mean on mean colour is near chance: the class is in shape and texture."""
    train, train_y = generate(np.random.default_rng(0), 10, 200)
    test, test_y = generate(np.random.default_rng(1), 10, 100)
    centroids = np.stack([train[train_y == c].mean((0, 1, 2)) for c in range(10)])
    colour = test.mean((1, 2))
    predicted = np.argmin(((colour[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == test_y).mean() < 0.2


def test_class_is_learnable_from_pixels():
    """A small CNN trained for seconds on CPU is far above the 10% chance level (0.84 when written)."""
    torch.manual_seed(0)
    train, train_y = generate(np.random.default_rng(0), 10, 150)
    test, test_y = generate(np.random.default_rng(1), 10, 50)
    to_tensor = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - 0.5  # noqa: E731
    x, y, x_test = to_tensor(train), torch.from_numpy(train_y), to_tensor(test)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(6):
        for i in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1).numpy() == test_y).mean()
    assert accuracy > 0.6, accuracy
