"""ImageNet's decode="gpu" path (kdfast.data.imagenet.EncodedImageFolder) against the PIL path,
run on the CPU (torchvision's CPU JPEG decoder stands in for nvJPEG): the same crop boxes and flips,
pixels within one uint8 level, the CPU fallbacks (PNG, greyscale and CMYK JPEG), the error on an
undecodable file, the decode/workers settings. Resume and worker-count equality of both paths are
tested in tests/test_data.py (the ImageFolder tests, parametrized over decode)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision import transforms

from kdfast.data import build_loaders, imagenet, resolve_decode
from kdfast.data.imagenet import EncodedImageFolder, SeededImageFolder, WorkerLoader, draw_crop, image_folder, jpeg_components
from kdfast.engine.config import ConfigError, from_dict, validate

SEED = 3
# (height, width, format, PIL mode): landscape, portrait, square, smaller than the crop, very wide,
# then the files the batched decoder is not given (decoded by PIL): PNG, greyscale and CMYK JPEG.
FILES = [
    (375, 500, "JPEG", "RGB"),
    (500, 333, "JPEG", "RGB"),
    (256, 256, "JPEG", "RGB"),
    (120, 160, "JPEG", "RGB"),
    (200, 600, "JPEG", "RGB"),
    (300, 400, "PNG", "RGB"),
    (333, 500, "JPEG", "L"),
    (280, 360, "JPEG", "CMYK"),
]
# Max |difference| in uint8 levels between the two paths. Both decode with libjpeg-turbo (Pillow's
# and torchvision's give the same pixels here, as they do for PNG via the PIL fallback), so what
# remains is the resize: PIL's bilinear filter vs torchvision's antialiased tensor resize, whose
# fixed-point rounding differs by at most one level (measured: max 1 on every image and epoch).
TOLERANCE = 1


def smooth_image(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A photo-like RGB image: gradients that make a crop's position and a flip visible, plus noise."""
    y, x = np.mgrid[0:height, 0:width]
    noise = rng.normal(0, 12, (height, width))
    pixels = np.stack([x * 255 / width, y * 255 / height, (x + y) * 128 / (height + width) + noise], -1)
    return pixels.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """root/{train,val}/{a,b}/ with every entry of FILES in each class folder."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i, (h, w, fmt, mode) in enumerate(FILES):
                image = Image.fromarray(smooth_image(h, w, rng)).convert(mode)
                suffix = "png" if fmt == "PNG" else "jpg"
                image.save(root / split / cls / f"{i}.{suffix}", fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return root


def gpu_path_images(folder: EncodedImageFolder, epoch: int) -> torch.Tensor:
    """uint8 (N, 3, 224, 224): every image of `folder` through the decode="gpu" path on the CPU."""
    batch = folder.collate([folder[(i, epoch)] for i in range(len(folder))])
    images, labels = folder.to_device(batch, torch.device("cpu"))
    assert torch.equal(labels, torch.tensor(folder.targets))
    return images


def pil_path_images(folder: SeededImageFolder, epoch: int) -> torch.Tensor:
    """uint8 (N, 3, 224, 224): every image of `folder` through the PIL path."""
    return torch.stack([folder[(i, epoch)][0] for i in range(len(folder))])


def test_jpeg_components(tree):
    """The workers' collate classifies each file: only the 3-component JPEGs go to the batched decoder."""
    folder = image_folder(tree, True, SEED, "gpu")
    assert isinstance(folder, EncodedImageFolder)
    batch = folder.collate([folder[(i, 0)] for i in range(len(folder))])
    assert batch.components == [3, 3, 3, 3, 3, 0, 1, 4] * 2 and batch.indices == list(range(len(folder)))
    assert jpeg_components(b"\xff\xd8\xff") == 0 and jpeg_components(b"") == 0


def test_gpu_path_draws_the_pil_boxes_and_flips(tree, monkeypatch):
    """The PIL path's RandomResizedCrop.get_params results and flips, recorded, equal draw_crop's."""
    boxes: list[tuple[int, int, int, int]] = []
    flips: list[bool] = []
    get_params, hflip = transforms.RandomResizedCrop.get_params, TF.hflip

    def record_box(img, scale, ratio):
        boxes.append(get_params(img, scale, ratio))
        return boxes[-1]

    def record_flip(img):
        flips[-1] = True
        return hflip(img)

    monkeypatch.setattr(transforms.RandomResizedCrop, "get_params", staticmethod(record_box))
    monkeypatch.setattr(TF, "hflip", record_flip)
    folder = image_folder(tree, True, SEED, "cpu")
    keys = [(index, epoch) for epoch in range(3) for index in range(len(folder))]
    for key in keys:
        flips.append(False)
        folder[key]
    monkeypatch.undo()
    sizes = [Image.open(path).size for path, _ in folder.samples]  # (width, height)
    expected = [draw_crop(SEED, epoch, index, sizes[index][1], sizes[index][0]) for index, epoch in keys]
    assert [(*box, flip) for box, flip in zip(boxes, flips, strict=True)] == expected
    assert 0 < sum(flips) < len(flips) and len(set(boxes)) == len(boxes)


@pytest.mark.parametrize("train", [True, False])
def test_gpu_path_pixels_match_the_pil_path(tree, train):
    pil, encoded = image_folder(tree, train, SEED, "cpu"), image_folder(tree, train, SEED, "gpu")
    assert isinstance(encoded, EncodedImageFolder)
    for epoch in range(2):
        expected, got = pil_path_images(pil, epoch), gpu_path_images(encoded, epoch)
        assert got.shape == expected.shape == (len(pil), 3, 224, 224) and got.dtype == torch.uint8
        difference = (got.int() - expected.int()).abs()
        assert difference.max() <= TOLERANCE, difference.amax(dim=(1, 2, 3))


def test_batched_decoder_failure_falls_back_per_image(tree, monkeypatch):
    """When the batched call fails (a damaged JPEG among good ones), each image is decoded alone."""
    folder = image_folder(tree, True, SEED, "gpu")
    expected = gpu_path_images(folder, 0)
    monkeypatch.setattr(imagenet, "decode_jpegs", lambda data, device: [])
    assert torch.equal(gpu_path_images(folder, 0), expected)


@pytest.mark.parametrize("content", [b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2, b"not an image", b""])
def test_undecodable_file_names_it(tmp_path, content):
    for cls in ("a", "b"):
        (tmp_path / "val" / cls).mkdir(parents=True)
        Image.fromarray(smooth_image(60, 80, np.random.default_rng(0))).save(tmp_path / "val" / cls / "0.jpg")
    bad = tmp_path / "val" / "b" / "1.jpg"
    bad.write_bytes(content)
    folder = image_folder(tmp_path, False, SEED, "gpu")
    with pytest.raises(ValueError, match=re.escape(f"cannot read image file {bad}")):
        gpu_path_images(folder, 0)


def test_decode_setting(tree):
    assert resolve_decode("auto", "cpu") == "cpu" and resolve_decode("auto", "cuda") == "gpu"
    assert resolve_decode("gpu", "cpu") == "gpu"
    with pytest.raises(ValueError, match="gpu, cpu, auto"):
        build_loaders("imagenet", tree, decode="nvjpeg")
    for decode, cls in (("gpu", EncodedImageFolder), ("cpu", SeededImageFolder), ("auto", SeededImageFolder)):
        loaders = build_loaders("imagenet", tree, batch_size=4, workers=0, decode=decode)
        assert isinstance(loaders.train, WorkerLoader) and isinstance(loaders.test, WorkerLoader)
        assert isinstance(loaders.train.dataset, cls) and isinstance(loaders.test.dataset, cls)
    build_loaders("digits", decode="gpu")  # ignored by the device-resident datasets


@pytest.mark.parametrize(("key", "value"), [("decode", "nvjpeg"), ("workers", -1)])
def test_config_rejects_bad_values(key, value):
    with pytest.raises(ConfigError, match=f"data.{key}"):
        validate(from_dict({"data": {key: value}}), check_files=False)


def test_workers_default_to_the_available_cores(tree, monkeypatch):
    monkeypatch.setattr(imagenet.os, "sched_getaffinity", lambda pid: set(range(12)))
    loader = WorkerLoader(image_folder(tree, True, SEED, "gpu"), 4, train=True)
    assert loader.dataloader.num_workers == 12  # not capped at 8
    assert WorkerLoader(image_folder(tree, True, SEED, "cpu"), 4, train=True, workers=1).dataloader.num_workers == 1


@pytest.mark.gpu
def test_nvjpeg_path_on_cuda(tree):
    """On CUDA the batch is decoded by nvJPEG, whose IDCT and colour conversion differ from
    libjpeg-turbo's by a few levels; the boxes and flips are the same, so the mean difference is small."""
    train = image_folder(tree, True, SEED, "gpu")
    assert isinstance(train, EncodedImageFolder)
    batch = train.collate([train[(i, 0)] for i in range(len(train))])
    images, _ = train.to_device(batch, torch.device("cuda"))
    difference = (images.cpu().float() - pil_path_images(image_folder(tree, True, SEED, "cpu"), 0).float()).abs()
    assert images.is_cuda and difference.mean() < 2
