"""Evaluation preprocessing: the fast path gives exactly what timm's transform gives."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from snnet_core.data import EXIF_ORIENTATION, image_transform, load_dataset


@pytest.mark.parametrize(
    ("channels", "size", "mean", "std"),
    [(1, 28, (0.5,), (0.5,)), (3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))],
)
@pytest.mark.parametrize("image_size", [(28, 28), (32, 32), (500, 375), (33, 17), (256, 300)])
def test_the_evaluation_transform_matches_timms_bit_for_bit(channels, size, mean, std, image_size):
    """Also for images that already have the resize's or the crop's size, whose steps the
    fast path skips (28x28 at crop 28 and resize 32; 256 wide at resize 256 for 224)."""
    config = {"input_size": (channels, size, size), "mean": mean, "std": std, "crop_pct": 0.875}
    reference = create_transform(
        input_size=(3, size, size), is_training=False, interpolation="bicubic", crop_pct=0.875,
        crop_mode="center", mean=mean, std=std,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (*image_size[::-1], 3), dtype=np.uint8))
    got = image_transform(config)(img)
    want = reference(img.convert("L" if channels == 1 else "RGB"))
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got, want)


@pytest.mark.parametrize("channels", [1, 3])
def test_a_batch_is_preprocessed_as_each_of_its_images(channels):
    size = 28 if channels == 1 else 224
    config = {"input_size": (channels, size, size), "mean": (0.5,) * channels,
              "std": (0.25,) * channels, "crop_pct": 0.875}  # fmt: skip
    rng = np.random.default_rng(1)
    shapes = [(28, 28), (500, 375), (33, 17), (32, 40)]
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in shapes]
    transform = image_transform(config)
    got = transform.batch(imgs)
    assert got.shape == (4, channels, size, size) and got.dtype == torch.float32
    assert torch.equal(got, torch.stack([transform(img) for img in imgs]))


@pytest.mark.parametrize("crop_mode", ["center", "squash"])
@pytest.mark.parametrize("image_size", [(28, 28), (500, 375), (375, 500), (3000, 2), (1, 700)])
def test_work_pixels_is_the_largest_image_preprocessing_makes(crop_mode, image_size):
    """What the server bounds before it resizes anything (a 100000x1 image became 2.8 million
    x 28): the decoded size, or the resize's output, whichever is larger, as the steps make it.
    (A 28x28 input, resized to 32: the thin images stay a few megabytes here.)"""
    config = {"input_size": (3, 28, 28), "mean": (0.5,) * 3, "std": (0.5,) * 3,
              "crop_pct": 0.875, "crop_mode": crop_mode}  # fmt: skip
    tf = image_transform(config)
    img = Image.new("RGB", image_size)
    sizes = [img.size]
    for step in tf.timm.transforms[:-2]:  # the PIL steps, before the tensor
        img = step(img)
        sizes.append(img.size)
    assert tf.work_pixels(*image_size) == max(w * h for w, h in sizes)


def _gradient(width: int = 64, height: int = 48) -> Image.Image:
    """Dark on the left, light on the right."""
    row = np.linspace(0, 255, width).astype(np.uint8)
    return Image.fromarray(np.stack([np.tile(row, (height, 1))] * 3, -1))


def _flipped(x: torch.Tensor) -> bool:
    return x[..., :, :4].mean().item() > x[..., :, -4:].mean().item()


@pytest.mark.parametrize(("augment", "flips"), [("timm", True), ("no-flip", False)])
def test_training_augmentation_flips_images_only_where_asked(augment, flips):
    """``snnet train --augment no-flip``: digits, text or anything whose orientation matters
    are never mirrored (timm's ImageNet transform flips half of them); crops and colour jitter
    keep a left-to-right gradient rising."""
    import random

    random.seed(0)
    torch.manual_seed(0)
    config = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.875}
    tf = image_transform(config, training=True, normalize=False, augment=augment)
    outs = [tf(_gradient()) for _ in range(40)]
    seen = [_flipped(x) for x in outs]
    assert any(seen) is flips and not all(seen)
    assert not all(torch.equal(x, outs[0]) for x in outs)  # still cropped and jittered


def test_no_augmentation_trains_on_what_evaluation_sees():
    config = {"input_size": (1, 28, 28), "mean": (0.5,), "std": (0.5,), "crop_pct": 0.875}
    tf = image_transform(config, training=True, augment="none")
    img = _gradient()
    assert torch.equal(tf(img), image_transform(config)(img))
    with pytest.raises(ValueError, match="allowed: timm, no-flip, none"):
        image_transform(config, training=True, augment="flip")
    # The bundled digits: shifted by up to 2 pixels, unless none.
    assert load_dataset("mnist", "train", config, training=True).max_shift == 2
    assert load_dataset("mnist", "train", config, training=True, augment="none").max_shift == 0


def _reopened(img: Image.Image, **save) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "PNG", **save)
    return Image.open(io.BytesIO(buf.getvalue()))


DIGIT_CONFIG = {"input_size": (1, 28, 28), "mean": (0.5,), "std": (0.5,), "crop_pct": 1.0}


def test_an_image_is_read_as_a_viewer_shows_it_turned_by_its_exif_orientation():
    """A phone stores a photo as its sensor saw it and tags how to turn it: the model must see
    it upright (a digit stored on its side with the tag was read as a 5)."""
    upright = (np.random.default_rng(0).random((28, 28)) * 255).astype(np.uint8)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # "turn 90 degrees clockwise to view"
    stored = Image.fromarray(upright, "L").transpose(Image.Transpose.ROTATE_90)
    tagged = _reopened(stored, exif=exif)
    tf = image_transform(DIGIT_CONFIG)
    want = tf(Image.fromarray(upright, "L"))
    assert torch.equal(tf(tagged), want) and torch.equal(tf.batch([tagged])[0], want)
    assert not torch.equal(tf(_reopened(stored)), want)  # (the same pixels, untagged)


def test_a_16_bit_grey_image_is_read_as_its_8_bit_self():
    """Pillow opens a 16-bit grey PNG as such and its convert clips it at 255 (a 16-bit gradient
    was read as a white image): scaled to 8 bits instead."""
    eight = (np.random.default_rng(1).random((28, 28)) * 255).astype(np.uint8)
    sixteen = _reopened(Image.fromarray(eight.astype(np.uint16) * 257))
    assert sixteen.mode.startswith("I")
    tf = image_transform(DIGIT_CONFIG)
    want = tf(Image.fromarray(eight, "L"))
    assert torch.equal(tf(sixteen), want) and torch.equal(tf.batch([sixteen])[0], want)
    rgb = image_transform(
        {**DIGIT_CONFIG, "input_size": (3, 28, 28), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    )
    assert torch.equal(rgb(sixteen), rgb(Image.fromarray(eight, "L")))


def test_an_image_folder_loads_its_files_as_the_server_reads_them(tmp_path):
    upright = (np.random.default_rng(2).random((28, 28)) * 255).astype(np.uint8)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
    Image.fromarray(upright, "L").transpose(Image.Transpose.ROTATE_90).save(
        tmp_path / "a" / "turned.png", exif=exif
    )
    Image.fromarray(upright.astype(np.uint16) * 257).save(tmp_path / "b" / "deep.png")
    data = load_dataset(str(tmp_path), "train", DIGIT_CONFIG, training=False)
    want = image_transform(DIGIT_CONFIG, normalize=False)(Image.fromarray(upright, "L"))
    assert all(torch.equal(data[i][0], want) for i in range(2))


def test_an_image_whose_exif_pillow_cannot_read_is_read_as_it_is():
    """A PNG whose eXIf chunk is no TIFF block: Pillow's getexif raises; served as before EXIF
    was read (a 500 otherwise), not refused."""
    pixels = (np.random.default_rng(3).random((28, 28)) * 255).astype(np.uint8)
    with pytest.raises(SyntaxError):  # (a first call raises; Pillow then keeps an empty one)
        _reopened(Image.fromarray(pixels, "L"), exif=b"not a TIFF block").getexif()
    broken = _reopened(Image.fromarray(pixels, "L"), exif=b"not a TIFF block")
    tf = image_transform(DIGIT_CONFIG)
    assert torch.equal(tf(broken), tf(Image.fromarray(pixels, "L")))


def _png(path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((28, 28), value, np.uint8), "L").save(path)


def test_an_image_folder_reads_the_servers_formats_and_leaves_out_hidden_files_and_folders(
    tmp_path,
):
    """What a folder copied from a Mac or a notebook holds: hidden folders became classes
    (``.ipynb_checkpoints``), a zip's ``._name`` twins broke the run, GIFs (which the server
    takes) were left out without a word and TIFFs (which it refuses) trained."""
    _png(tmp_path / "a" / "x.png")
    Image.new("L", (28, 28)).save(tmp_path / "a" / "y.gif")
    Image.new("L", (28, 28)).save(tmp_path / "a" / "z.tiff")
    (tmp_path / "a" / "._x.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "a" / "notes.txt").write_text("labelled by hand")
    _png(tmp_path / "b" / "v.png")
    Image.new("RGB", (28, 28)).save(tmp_path / "b" / "w.jpg")
    _png(tmp_path / "b" / ".cache" / "q.png")
    _png(tmp_path / ".ipynb_checkpoints" / "p.png")
    _png(tmp_path / "__MACOSX" / "a" / "r.png")
    data = load_dataset(str(tmp_path), "train", DIGIT_CONFIG, training=False)
    assert data.classes == ["a", "b"]
    assert sorted(p.split("/")[-1] for p, _ in data.samples) == ["v.png", "w.jpg", "x.png", "y.gif"]
    assert [data[i][1] for i in range(len(data))] == [0, 0, 1, 1]
    assert data.other_formats == {".tiff": (1, str(tmp_path / "a" / "z.tiff"))}
    assert "left out, as formats the server does not read: 1 .tiff" in data.other_formats_text()
    # a class folder with nothing the server reads is an error that says what was left out
    (tmp_path / "c").mkdir()
    Image.new("L", (28, 28)).save(tmp_path / "c" / "only.tif")
    with pytest.raises(ValueError, match=r"class folder c holds no image file .* 1 \.tif \(e\.g"):
        load_dataset(str(tmp_path), "train", DIGIT_CONFIG, training=False)


def test_an_unreadable_image_is_named_training_goes_on_without_it_evaluation_stops(
    tmp_path, capsys
):
    """A truncated PNG among the images stopped training with "OSError: Truncated File Read",
    naming no file; one in the evaluation split threw the finished run away (cli)."""
    _png(tmp_path / "a" / "1.png", 10)
    good = (tmp_path / "a" / "1.png").read_bytes()
    (tmp_path / "a" / "2.png").write_bytes(good[: len(good) // 2])  # truncated
    Image.new("L", (28, 28)).save(tmp_path / "a" / "3.png", format="TIFF")  # a TIFF as .png
    _png(tmp_path / "b" / "4.png", 200)
    bad = [str(tmp_path / "a" / n) for n in ("2.png", "3.png")]
    train = load_dataset(str(tmp_path), "train", DIGIT_CONFIG, training=True, augment="none")
    got = [train[i] for i in range(len(train))]  # the next image stands in for each bad one
    assert [y for _, y in got] == [0, 1, 1, 1]
    assert torch.equal(got[1][0], got[3][0]) and torch.equal(got[2][0], got[3][0])
    assert train[1][1] == 1  # (asked again: warned once)
    err = capsys.readouterr().err
    assert all(err.count(f"warning: {p} cannot be read as an image") == 1 for p in bad), err
    assert "training goes on without it" in err
    held = load_dataset(str(tmp_path), "train", DIGIT_CONFIG, training=False)
    assert held[0][1] == 0
    for i, path in enumerate(bad, start=1):
        with pytest.raises(ValueError, match=f"{path} cannot be read as an image .*remove or"):
            held[i]
