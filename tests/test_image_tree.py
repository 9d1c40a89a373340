"""ImageNet-100 and folder datasets, on small fake trees of real image files."""

import hashlib
import json
import resource
import subprocess

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.beton import convert_dataset
from pipeline.datasets import get_dataset
from pipeline.datasets.image_tree import imagenet100_classes
from pipeline.errors import UserError
from pipeline.loaders import eval_loader
from pipeline.params import load_params
from stages.cli import app
from tests.helpers import convert_args, make_tree, stage_process, write_params, write_png16


def tree_params(tmp_path, name, root, **extra):
    return load_params(write_params(tmp_path / "p.yaml", datasets={name: {"root": str(root), **extra}}))


def folder_cli(tmp_path, command: str, **folder):
    """`prepare` or `convert` of the `folder` dataset at tmp_path/tree, through the CLI, in this process."""
    params = write_params(tmp_path / "p.yaml", datasets={"folder": {"root": str(tmp_path / "tree"), **folder}})
    paths = {
        "prepare": ["--out", str(tmp_path / "raw")],
        "convert": convert_args(tmp_path),
    }[command]
    return CliRunner().invoke(app, [command, "--dataset", "folder", "--params", str(params), *paths])


def assert_refused(result, message: str) -> None:
    """Exit 1, the message on the error line, no traceback."""
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output, result.output


def test_imagenet100_class_list():
    wnids = imagenet100_classes()
    assert len(wnids) == len(set(wnids)) == 100 and wnids == sorted(wnids)
    assert wnids[0] == "n01558993" and "n02869837" in wnids  # docs/method.md section 5


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


@pytest.mark.parametrize(
    "root, message", [(None, "datasets.imagenet100.root is not set"), ("/nonexistent", "no such folder")]
)
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


def test_zero_byte_first_image_fails_convert_promptly(tmp_path):
    """Issue 14: a large tree whose first train image was a zero-byte .jpg: `convert` named it but did not
    exit within 3 minutes. Now every image is opened before anything is written."""
    make_tree(tmp_path / "tree", ["a", "b"], per_split=(("train", 300), ("val", 5)), size=(8, 8), fmt="PNG")
    (tmp_path / "tree" / "train" / "a" / "0.jpg").write_bytes(b"")  # sorts first
    assert folder_cli(tmp_path, "prepare").exit_code == 0
    convert = stage_process(
        "convert",
        "--dataset",
        "folder",
        "--params",
        str(tmp_path / "p.yaml"),
        "--raw",
        str(tmp_path / "raw"),
        "--out",
        str(tmp_path / "ffcv"),
        "--metadata",
        str(tmp_path / "m.json"),
    )
    try:
        output = convert.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        convert.kill()
        raise
    assert convert.returncode == 1 and "Traceback" not in output
    assert f"error: {tmp_path / 'tree/train/a/0.jpg'}: not a readable image" in output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml", "raw", "tree"]


def test_raw_mode_refuses_an_image_of_another_size(tmp_path):
    """Issue 14: one 10000x10000 image among 32x32 ones was converted, then pretraining crashed in FFCV."""
    make_tree(tmp_path / "tree", ["a", "b"], per_split=(("train", 3), ("val", 2)), size=(32, 32), fmt="PNG")
    Image.new("L", (10000, 10000)).save(tmp_path / "tree" / "train" / "b" / "1.png")
    assert folder_cli(tmp_path, "prepare").exit_code == 0
    result = folder_cli(tmp_path, "convert")
    assert_refused(
        result,
        f"error: {tmp_path / 'tree/train/b/1.png'}: 10000x10000 pixels, but 9 other images are "
        "32x32 and datasets.folder images must all have one size",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml", "raw", "tree"]


def test_class_folder_only_in_val_is_an_error(tmp_path):
    """Issue 14: a class folder present only in val/ was dropped without a word."""
    make_tree(tmp_path / "tree", ["a", "b"])
    make_tree(tmp_path / "tree", ["a", "b", "c"], per_split=(("val", 1),))
    assert_refused(folder_cli(tmp_path, "prepare"), "1 class folder(s) under val/ but not under train/: c")
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize(
    "folders, message",
    [
        (("val",), None),
        (("test",), None),
        (("val", "test"), "both val/ and test/ folders there"),
        ((), "no val/ or test/ folder there"),
    ],
)
def test_test_split_folder_is_val_or_test(tmp_path, folders, message):
    make_tree(tmp_path / "tree", ["a", "b"], per_split=(("train", 2), *((f, 1) for f in folders)))
    result = folder_cli(tmp_path, "prepare")
    if message:
        assert_refused(result, f"datasets.folder.root = {tmp_path / 'tree'}: {message}")
        return
    assert result.exit_code == 0, result.output
    test_files = json.loads((tmp_path / "raw" / "manifest.json").read_text())["files"]["test"]
    assert [entry[:2] for entry in test_files] == [[f"{folders[0]}/a/0.JPEG", 0], [f"{folders[0]}/b/0.JPEG", 1]]


def test_per_class_caps_keep_a_fixed_choice(tmp_path):
    make_tree(tmp_path / "tree", ["a", "b"], per_split=(("train", 9), ("val", 4)))
    assert folder_cli(tmp_path, "prepare", train_per_class=3, test_per_class=1).exit_code == 0
    files = json.loads((tmp_path / "raw" / "manifest.json").read_text())["files"]
    by_hash = sorted((f"{i}.JPEG" for i in range(9)), key=lambda name: hashlib.sha256(name.encode()).digest())
    assert [path for path, label, _ in files["train"] if label == 0] == [f"train/a/{n}" for n in sorted(by_hash[:3])]
    assert len(files["train"]) == 6 and len(files["test"]) == 2
    assert folder_cli(tmp_path, "prepare", train_per_class=None, test_per_class=None).exit_code == 0
    assert len(json.loads((tmp_path / "raw" / "manifest.json").read_text())["files"]["train"]) == 18


@pytest.mark.parametrize("write_mode", ["raw", "jpg"])
def test_folder_metadata_records_shape_mean_and_std(tmp_path, write_mode):
    make_tree(tmp_path / "tree", ["a", "b", "c"], per_split=(("train", 3), ("val", 1)), size=(16, 12), fmt="PNG")
    assert folder_cli(tmp_path, "prepare").exit_code == 0
    result = folder_cli(tmp_path, "convert", write_mode=write_mode)
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "meta.json").read_text())
    train = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "tree" / "train").glob("*/*"))]) / 255
    assert meta["image_shape"] == [12, 16, 3]
    np.testing.assert_allclose(meta["mean"], train.mean((0, 1, 2)), atol=1e-4)
    np.testing.assert_allclose(meta["std"], train.std((0, 1, 2)), atol=1e-4)


def test_16_bit_images_keep_their_high_byte_with_a_warning(tmp_path):
    """Issue 14: a 16-bit PNG was squashed to 8 bits without a word (grayscale: clipped to white)."""
    make_tree(tmp_path / "tree", ["a", "b"], per_split=(("train", 2), ("val", 1)), size=(4, 4), fmt="PNG")
    write_png16(tmp_path / "tree" / "train" / "a" / "0.png", np.full((4, 4), 0x1234, np.uint16))
    write_png16(tmp_path / "tree" / "train" / "b" / "0.png", np.full((4, 4, 3), [0xFF00, 0x00FF, 0x8080], np.uint16))
    assert folder_cli(tmp_path, "prepare").exit_code == 0
    result = folder_cli(tmp_path, "convert")
    assert result.exit_code == 0, result.output
    assert (
        f"2 16-bit image(s), e.g. {tmp_path / 'tree/train/a/0.png'}: stored with 8 bits per channel "
        "(the high byte of each value)"
    ) in result.output
    images = np.concatenate([x.numpy() for x, _ in eval_loader(tmp_path / "ffcv" / "train.beton", 4)])
    assert images[0, :, 0, 0].tolist() == [0x12] * 3 and images[2, :, 0, 0].tolist() == [0xFF, 0x00, 0x80]


def test_a_huge_first_image_is_named_before_any_large_allocation(tmp_path):
    """Issue 20: with a 10000x10000 PNG first among 32x32 ones, `convert` decoded it for the pixel statistics
    and ended in numpy's `_ArrayMemoryError ... float64` (under an 8 GB address-space limit). Sizes are now
    read from the headers and the odd image refused before any image is decoded."""
    make_tree(tmp_path / "tree", ["a", "b"], per_split=(("train", 3), ("val", 2)), size=(32, 32), fmt="PNG")
    Image.new("L", (10000, 10000)).save(tmp_path / "tree" / "train" / "a" / "0.png")  # the first image read
    assert folder_cli(tmp_path, "prepare").exit_code == 0

    def limited() -> None:  # 8 GB of address space: the stage's imports take about 4 GB of it
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))

    args = ["--dataset", "folder", "--params", str(tmp_path / "p.yaml"), *convert_args(tmp_path)]
    convert = stage_process("convert", *args, preexec_fn=limited)
    output = convert.communicate(timeout=300)[0]
    assert convert.returncode == 1 and "Traceback" not in output and "Warning" not in output, output
    assert f"error: {tmp_path / 'tree/train/a/0.png'}: 10000x10000 pixels, but 9 other images are 32x32" in output, (
        output
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml", "raw", "tree"]
