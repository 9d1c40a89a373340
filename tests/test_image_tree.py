"""ImageNet-100 and folder datasets, on small fake trees of real image files."""

import numpy as np
import pytest
from PIL import Image

from pipeline.beton import convert_dataset
from pipeline.datasets import get_dataset
from pipeline.datasets.image_tree import imagenet100_classes
from pipeline.errors import UserError
from pipeline.loaders import eval_loader
from pipeline.params import load_params
from tests.helpers import make_tree, write_params


def tree_params(tmp_path, name, root, **extra):
    return load_params(write_params(tmp_path / "p.yaml", datasets={name: {"root": str(root), **extra}}))


def test_imagenet100_class_list():
    wnids = imagenet100_classes()
    assert len(wnids) == len(set(wnids)) == 100 and wnids == sorted(wnids)
    assert wnids[0] == "n01558993" and "n02869837" in wnids  # PAPER.md section 5


def test_imagenet100_lists_missing_classes(tmp_path):
    wnids = imagenet100_classes()
    make_tree(tmp_path / "imagenet", wnids[3:])
    (tmp_path / "imagenet" / "val" / wnids[10] / "0.JPEG").unlink()
    params = tree_params(tmp_path, "imagenet100", tmp_path / "imagenet")
    with pytest.raises(UserError) as error:
        get_dataset("imagenet100").prepare(params, tmp_path / "raw", tmp_path / "downloads")
    message = str(error.value)
    assert "7 class folder(s) missing or without images" in message
    for wnid in wnids[:3]:
        assert f"train/{wnid}" in message and f"val/{wnid}" in message
    assert f"val/{wnids[10]}" in message and f"train/{wnids[10]}" not in message
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize("root, message", [(None, "datasets.imagenet100.root is not set"),
                                           ("/nonexistent", "no such folder")])
def test_imagenet100_root_problems(tmp_path, root, message):
    params = load_params(write_params(tmp_path / "p.yaml", datasets={"imagenet100": {"root": root}}))
    with pytest.raises(UserError, match=message):
        get_dataset("imagenet100").prepare(params, tmp_path / "raw", tmp_path / "downloads")


def test_imagenet100_builds_jpeg_betons(tmp_path):
    wnids = imagenet100_classes()
    make_tree(tmp_path / "imagenet", wnids, size=(40, 30))
    (tmp_path / "imagenet" / "train" / "n99999999").mkdir()  # classes outside the 100 are ignored
    Image.new("RGB", (8, 8)).save(tmp_path / "imagenet" / "train" / "n99999999" / "x.JPEG")
    params = tree_params(tmp_path, "imagenet100", tmp_path / "imagenet", max_resolution=32)
    spec = get_dataset("imagenet100")
    spec.prepare(params, tmp_path / "raw", tmp_path / "downloads")
    meta = convert_dataset("imagenet100", params, tmp_path / "raw", tmp_path / "ffcv")
    assert meta["train"]["count"] == 200 and meta["test"]["per_class"] == [1] * 100
    assert meta["storage"] == {"write_mode": "jpg", "jpeg_quality": 90, "max_resolution": 32}
    labels = np.concatenate([y.numpy() for _, y in eval_loader(tmp_path / "ffcv" / "test.beton", 64, crop_size=16)])
    assert labels.tolist() == list(range(100))


def test_folder_raw_round_trip_is_exact(tmp_path):
    make_tree(tmp_path / "tree", ["cat", "dog", "eel"], size=(32, 32), fmt="PNG")
    params = tree_params(tmp_path, "folder", tmp_path / "tree")
    get_dataset("folder").prepare(params, tmp_path / "raw", tmp_path / "downloads")
    meta = convert_dataset("folder", params, tmp_path / "raw", tmp_path / "ffcv")
    assert meta["classes"] == ["cat", "dog", "eel"] and meta["train"]["per_class"] == [2, 2, 2]
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in eval_loader(tmp_path / "ffcv" / "train.beton", 4)])
    images, labels = np.concatenate(images), np.concatenate(labels)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert (images[:, 0] == (labels * 2)[:, None, None]).all()  # lossless: red channel = 2 * class


def test_unreadable_image_fails_conversion_cleanly(tmp_path):
    make_tree(tmp_path / "tree", ["a", "b"], size=(32, 32), fmt="PNG")
    (tmp_path / "tree" / "train" / "b" / "1.png").write_bytes(b"not an image")
    params = tree_params(tmp_path, "folder", tmp_path / "tree")
    get_dataset("folder").prepare(params, tmp_path / "raw", tmp_path / "downloads")
    with pytest.raises(UserError, match=r"train/b/1.png: not a readable image"):
        convert_dataset("folder", params, tmp_path / "raw", tmp_path / "ffcv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml", "raw", "tree"]
