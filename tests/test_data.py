"""kdfast.data: CIFAR files, device-side augmentation, schedule (determinism, resume, sharding),
the digits default and ImageFolder loading. Every file is written by the tests, in the official
formats; the real CIFAR-10 under shared/data is only smoke-tested when present."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdfast.data import (
    DATASETS,
    EpochSchedule,
    Normalize,
    ResidentLoader,
    build_loaders,
    cifar,
    digits,
    load_cifar,
    load_digits32,
    pad_crop_flip,
)
from kdfast.data.imagenet import WorkerLoader

REAL_CIFAR10 = Path(__file__).resolve().parents[1] / "shared" / "data"
if not (REAL_CIFAR10 / "cifar-10-batches-py").is_dir():
    REAL_CIFAR10 = Path("/work/shared/data")
MEAN, STD = (0.25, 0.5, 0.75), (0.5, 0.25, 0.125)


# ---------------------------------------------------------------- official-format files


def write_pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_batch(path: Path, images: np.ndarray, labels: np.ndarray, label_key: bytes) -> None:
    write_pickle(
        path,
        {
            b"batch_label": b"test batch",
            label_key: labels.tolist(),
            b"data": images.reshape(len(images), -1),
            b"filenames": [b"x.png"] * len(images),
        },
    )


def make_cifar(root: Path, name: str, per_file: int = 4, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write a small CIFAR tree under root; return {file name: (images N x 3 x 32 x 32, labels)}."""
    spec = cifar.CIFAR[name]
    folder = root / spec.folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for file in spec.train_files + spec.test_files:
        images = rng.integers(0, 256, (per_file, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, spec.num_classes, per_file)
        write_batch(folder / file, images, labels, spec.label_key)
        written[file] = images, labels
    if name == "cifar10":
        write_pickle(folder / "batches.meta", {b"label_names": [b"c%d" % i for i in range(10)], b"num_vis": 3072})
    else:
        write_pickle(
            folder / "meta",
            {b"fine_label_names": [b"f%d" % i for i in range(100)], b"coarse_label_names": [b"c%d" % i for i in range(20)]},
        )
    return written


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_load_cifar_official_layout(tmp_path, name):
    written = make_cifar(tmp_path, name)
    spec = cifar.CIFAR[name]
    for train, files in ((True, spec.train_files), (False, spec.test_files)):
        images, labels = load_cifar(tmp_path, name, train=train)
        assert images.dtype == torch.uint8 and images.shape == (4 * len(files), 3, 32, 32)
        assert labels.dtype == torch.int64
        np.testing.assert_array_equal(images.numpy(), np.concatenate([written[f][0] for f in files]))
        np.testing.assert_array_equal(labels.numpy(), np.concatenate([written[f][1] for f in files]))
    folder_itself, _ = load_cifar(tmp_path / spec.folder, name, train=False)  # root may be the folder
    assert torch.equal(folder_itself, torch.from_numpy(written[spec.test_files[0]][0]))


def test_missing_files_say_which_and_where(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1.*cifar-10-batches-py.*download=True"):
        load_cifar(tmp_path, "cifar10")
    make_cifar(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_cifar(tmp_path, "cifar10")
    assert "missing data_batch_3 in" in str(info.value) and "data_batch_2" not in str(info.value)
    load_cifar(tmp_path, "cifar10", train=False)  # the test split is complete


def test_download_fetches_only_missing_files(tmp_path, monkeypatch):
    calls = []

    def fake_download(spec, root):
        calls.append(root)
        make_cifar(root, "cifar100")

    monkeypatch.setattr(cifar, "_download", fake_download)
    images, _ = load_cifar(tmp_path, "cifar100", train=False, download=True)
    assert calls == [tmp_path] and len(images) == 4
    load_cifar(tmp_path, "cifar100", train=True, download=True)
    assert len(calls) == 1  # files present: no second download


def damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "garbage":
        path.write_bytes(os.urandom(1000))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "wrong shape":
        write_pickle(path, {b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4})
    elif how == "wrong dtype":
        write_pickle(path, {b"data": np.zeros((4, 3072), np.float32), b"labels": [0] * 4})
    elif how == "label count":
        write_pickle(path, {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3})
    elif how == "label range":
        write_pickle(path, {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]})
    elif how == "missing key":
        write_pickle(path, {b"data": np.zeros((4, 3072), np.uint8)})
    elif how == "code":
        path.write_bytes(pickle.dumps(os.getcwd))  # a pickle that would call a function


@pytest.mark.parametrize(
    "how", ["truncated", "garbage", "empty", "wrong shape", "wrong dtype", "label count", "label range", "missing key", "code"]
)
def test_damaged_file_error_names_it(tmp_path, how):
    make_cifar(tmp_path, "cifar10")
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    damage(bad, how)
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        load_cifar(tmp_path, "cifar10")


def test_unknown_cifar_variant():
    with pytest.raises(ValueError, match="cifar10"):
        load_cifar("/nonexistent", "cifar1000")


# ---------------------------------------------------------------- device-side transforms


def test_normalize_matches_formula_dtype_and_layout():
    images = torch.randint(0, 256, (2, 3, 5, 4), dtype=torch.uint8)
    expected = (images.double() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    out = Normalize(MEAN, STD)(images)
    assert out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    out = Normalize(MEAN, STD, dtype=torch.bfloat16, channels_last=True)(images)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="uint8"):
        Normalize(MEAN, STD)(images.float())


def test_pad_crop_flip_equals_padded_slice_for_every_draw():
    padding, h, w = 2, 5, 6
    image = torch.randint(1, 256, (1, 3, h, w), dtype=torch.uint8)  # nonzero: padding shows as 0
    padded = F.pad(image, (padding,) * 4)
    draws = [(t, c, f) for t in range(2 * padding + 1) for c in range(2 * padding + 1) for f in (False, True)]
    top, left, flip = (torch.tensor(v) for v in zip(*draws))
    out = pad_crop_flip(image.expand(len(draws), -1, -1, -1), top, left, flip, padding)
    for i, (t, c, f) in enumerate(draws):
        window = padded[0, :, t : t + h, c : c + w]
        assert torch.equal(out[i], window.flip(-1) if f else window), (t, c, f)
    assert torch.equal(out[draws.index((padding, padding, False))], image[0])  # centred, unflipped: the image


# ---------------------------------------------------------------- resident loader


def identity_dataset(n: int = 20, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images labelled by their own index, so a batch tells which images it holds."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(1, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen), torch.arange(n)


def loader(train: bool = True, batch_size: int = 6, **kw) -> ResidentLoader:
    images, labels = identity_dataset()
    return ResidentLoader(images, labels, batch_size, mean=MEAN, std=STD, train=train, **kw)


def epoch_batches(ld) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in ld]


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_eval_loader_is_dataset_order_without_augmentation():
    ld = loader(train=False)
    images, labels = identity_dataset()
    batches = epoch_batches(ld)
    assert len(ld) == len(batches) == 4 and [len(y) for _, y in batches] == [6, 6, 6, 2]
    x = torch.cat([b[0] for b in batches])
    assert x.dtype == torch.float32 and x.shape == (20, 3, 8, 8)
    assert torch.equal(torch.cat([b[1] for b in batches]), labels)
    torch.testing.assert_close(x, Normalize(MEAN, STD)(images))
    assert_same_batches(batches, epoch_batches(ld))  # every epoch the same


def test_train_batches_are_crops_and_flips_of_their_images():
    ld = loader(train=True, drop_last=True, dtype=torch.bfloat16, channels_last=True)
    images, _ = identity_dataset()
    normalize = Normalize(MEAN, STD, dtype=torch.bfloat16)
    candidates = [(t, c, f) for t in range(9) for c in range(9) for f in (False, True)]
    top, left, flip = (torch.tensor(v) for v in zip(*candidates))
    seen = set()
    batches = epoch_batches(ld)
    assert len(batches) == len(ld) == 3
    for x, y in batches:
        assert x.shape == (6, 3, 8, 8) and x.dtype == torch.bfloat16
        assert x.is_contiguous(memory_format=torch.channels_last)
        for xi, yi in zip(x, y):
            views = normalize(pad_crop_flip(images[yi].expand(len(candidates), -1, -1, -1), top, left, flip, 4))
            match = [c for c, v in zip(candidates, views) if torch.equal(v, xi)]
            assert match, f"image {yi} is no crop/flip of dataset image {yi}"
            seen.add(match[0])
    assert len(seen) > 5  # the draws vary
    assert len(set(torch.cat([y for _, y in batches]).tolist())) == 18  # no repeats within an epoch


def test_same_seed_same_batches_other_epoch_other_order():
    first = epoch_batches(loader(seed=3))
    assert_same_batches(first, epoch_batches(loader(seed=3)))
    other_seed = epoch_batches(loader(seed=4))
    assert not torch.equal(torch.cat([y for _, y in first]), torch.cat([y for _, y in other_seed]))
    ld = loader(seed=3)
    ld.set_epoch(1)
    second = epoch_batches(ld)
    assert not torch.equal(torch.cat([y for _, y in first]), torch.cat([y for _, y in second]))
    running = loader(seed=3)  # epochs advance by themselves after the last batch
    assert_same_batches(epoch_batches(running) + epoch_batches(running), first + second)


def test_state_dict_resume_reproduces_remaining_batches():
    reference = loader(seed=1)
    expected = epoch_batches(reference) + epoch_batches(reference)
    run = loader(seed=1)
    epoch_batches(run)
    second_epoch = iter(run)
    next(second_epoch), next(second_epoch)
    state = run.state_dict()
    assert state["epoch"] == 1 and state["batch"] == 2
    resumed = loader(seed=0)  # the seed comes from the state
    resumed.load_state_dict(pickle.loads(pickle.dumps(state)))
    assert_same_batches(epoch_batches(resumed), expected[len(run) + 2 :])
    with pytest.raises(ValueError, match="world_size"):
        loader(rank=0, world_size=2).load_state_dict(state)


@pytest.mark.parametrize("n", [20, 21])
def test_ranks_see_disjoint_shards_of_the_same_permutation(n):
    for epoch in (0, 1):
        shards = []
        for rank in (0, 1):
            s = EpochSchedule(n, 4, shuffle=True, seed=7, rank=rank, world_size=2)
            s.set_epoch(epoch)
            shards.append(torch.cat(s.remaining()))
        full = EpochSchedule(n, 4, shuffle=True, seed=7)
        full.set_epoch(epoch)
        order = torch.cat(full.remaining())
        assert len(shards[0]) == len(shards[1]) == n // 2
        assert torch.equal(shards[0], order[0 : n - n % 2 : 2]) and torch.equal(shards[1], order[1 : n - n % 2 : 2])
    evaluation = [torch.cat(EpochSchedule(n, 4, shuffle=False, rank=r, world_size=2).remaining()) for r in (0, 1)]
    assert sorted(torch.cat(evaluation).tolist()) == list(range(n))  # evaluation covers every sample once


def test_sharded_loaders_cover_the_epoch():
    per_rank = [torch.cat([y for _, y in loader(rank=r, world_size=2, seed=5)]) for r in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 10
    assert sorted(torch.cat(per_rank).tolist()) == list(range(20))


@pytest.mark.gpu
def test_cuda_loader_gives_the_cpu_batches():
    for train in (True, False):
        on_gpu = [(x.cpu(), y.cpu()) for x, y in loader(train=train, device="cuda")]
        on_cpu = epoch_batches(loader(train=train))
        assert [torch.equal(a[1], b[1]) for a, b in zip(on_gpu, on_cpu)] == [True] * len(on_cpu)
        torch.testing.assert_close(torch.cat([x for x, _ in on_gpu]), torch.cat([x for x, _ in on_cpu]))


def test_bad_arguments():
    images, labels = identity_dataset()
    with pytest.raises(ValueError, match="uint8"):
        ResidentLoader(images.float(), labels, 4, mean=MEAN, std=STD, train=True)
    with pytest.raises(ValueError, match="one label per image"):
        ResidentLoader(images, labels[:-1], 4, mean=MEAN, std=STD, train=True)
    with pytest.raises(ValueError, match="no batch"):
        ResidentLoader(images, labels, 64, mean=MEAN, std=STD, train=True, drop_last=True)
    with pytest.raises(ValueError, match="rank"):
        EpochSchedule(10, 2, shuffle=True, rank=2, world_size=2)


# ---------------------------------------------------------------- build_loaders, digits


def test_digits_default():
    train, test, num_classes = build_loaders(batch_size=64)
    assert num_classes == 10 and train.num_samples == 1437 and test.num_samples == 360
    x, y = next(iter(train))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and 0 <= y.min() and y.max() < 10
    images, labels = load_digits32(train=True)
    assert images.dtype == torch.uint8 and images.shape == (1437, 3, 32, 32)
    assert sorted(labels.unique().tolist()) == list(range(10))
    stats = images.double() / 255
    torch.testing.assert_close(stats.mean((0, 2, 3)), torch.tensor(digits.MEAN, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(stats.std((0, 2, 3)), torch.tensor(digits.STD, dtype=torch.float64), atol=1e-4, rtol=0)


def test_digits_are_not_flipped_and_cifar_is():
    digits_train = build_loaders("digits", batch_size=8).train
    assert isinstance(digits_train, ResidentLoader)
    assert not digits_train.flip and not digits_train._augment_draws(0)[2].any()
    images, labels = torch.zeros(64, 3, 8, 8, dtype=torch.uint8), torch.arange(64) % 10
    loader = ResidentLoader(images, labels, 8, mean=(0.5,) * 3, std=(0.5,) * 3, train=True)
    assert loader._augment_draws(0)[2].any()


def test_train_per_class_keeps_the_first_images_of_each_class():
    images, labels = load_digits32(train=True)
    train = build_loaders("digits", batch_size=10, train_per_class=5).train
    assert isinstance(train, ResidentLoader)
    assert train.num_samples == 50 and torch.bincount(train.labels).tolist() == [5] * 10
    expected = torch.cat([torch.nonzero(labels == c)[:5, 0] for c in range(10)]).sort().values
    assert torch.equal(train.images, images[expected]) and torch.equal(train.labels, labels[expected])
    with pytest.raises(ValueError, match="class 0 has"):
        build_loaders("digits", train_per_class=1000)
    with pytest.raises(ValueError, match="ImageNet|imagenet|device-resident"):
        build_loaders("imagenet", root="/nonexistent", train_per_class=5)


def test_build_loaders_names(tmp_path):
    with pytest.raises(ValueError, match="digits, cifar10, cifar100, imagenet"):
        build_loaders("mnist")
    with pytest.raises(ValueError, match="root"):
        build_loaders("cifar10")
    make_cifar(tmp_path, "cifar100")
    train, test, num_classes = build_loaders("cifar100", tmp_path, batch_size=2, eval_batch_size=4)
    assert num_classes == 100 and len(train) == 2 and len(test) == 1
    assert DATASETS[0] == "digits"


# ---------------------------------------------------------------- ImageFolder

# ImageNet's decode paths; ids "decode=..." since a bare "gpu" id is the keyword conftest skips without a GPU
# (decode="gpu" runs on CPU tensors here, the CPU JPEG decoder standing in for nvJPEG).
DECODE_PATHS = [pytest.param(decode, id=f"decode={decode}") for decode in ("cpu", "gpu")]


def make_image_tree(root: Path) -> None:
    """Two classes of three 40 x 40 images per split: a PNG and two JPEGs each (the JPEGs take the
    batched decoder of decode="gpu", the PNG its PIL fallback)."""
    rng = np.random.default_rng(0)
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.{'png' if i == 0 else 'jpg'}")


@pytest.mark.parametrize("decode", DECODE_PATHS)
def test_image_folder_batches_determinism_and_resume(tmp_path, decode):
    make_image_tree(tmp_path)
    train, test, num_classes = build_loaders("imagenet", tmp_path, batch_size=2, workers=0, decode=decode)
    assert num_classes == 2 and len(train) == 3 and len(test) == 3
    rng_state = torch.get_rng_state()
    batches = epoch_batches(train)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the per-image seeding leaves the global RNG alone
    x, y = batches[0]
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert sorted(torch.cat([y for _, y in epoch_batches(test)]).tolist()) == [0, 0, 0, 1, 1, 1]
    again = build_loaders("imagenet", tmp_path, batch_size=2, workers=0, decode=decode).train
    assert_same_batches(batches, epoch_batches(again))
    resumed = build_loaders("imagenet", tmp_path, batch_size=2, workers=0, decode=decode).train
    resumed.load_state_dict({**train.state_dict(), "epoch": 0, "batch": 1})
    assert_same_batches(batches[1:], epoch_batches(resumed))


@pytest.mark.parametrize("decode", DECODE_PATHS)
def test_image_folder_workers_give_the_same_batches(tmp_path, decode):
    make_image_tree(tmp_path)
    alone = build_loaders("imagenet", tmp_path, batch_size=2, workers=0, decode=decode).train
    pooled = build_loaders("imagenet", tmp_path, batch_size=2, workers=2, decode=decode).train
    expected = epoch_batches(alone)
    assert_same_batches(expected, epoch_batches(pooled))
    pooled.set_epoch(0)
    next(iter(pooled))  # the workers prefetch further, but the position counts what was handed out
    assert pooled.state_dict()["batch"] == 1
    assert_same_batches(expected[1:], epoch_batches(pooled))  # persistent workers restart mid-epoch


@pytest.mark.gpu
def test_image_folder_on_cuda(tmp_path):
    make_image_tree(tmp_path)
    # the PIL path's copy to the device (decode="auto" would pick the nvJPEG path: tests/test_imagenet_decode.py)
    on_gpu = build_loaders("imagenet", tmp_path, batch_size=2, workers=1, device="cuda", decode="cpu").train
    assert isinstance(on_gpu, WorkerLoader) and on_gpu.dataloader.pin_memory
    on_cpu = epoch_batches(build_loaders("imagenet", tmp_path, batch_size=2, workers=0).train)
    for (x, y), (x_cpu, y_cpu) in zip(on_gpu, on_cpu):
        assert x.is_cuda and torch.equal(y.cpu(), y_cpu)
        torch.testing.assert_close(x.cpu(), x_cpu)


@pytest.mark.parametrize("decode", DECODE_PATHS)
@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_names_the_file(tmp_path, workers, decode):
    make_image_tree(tmp_path)
    bad = tmp_path / "val" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    test = build_loaders("imagenet", tmp_path, batch_size=7, workers=workers, decode=decode).test
    with pytest.raises(ValueError, match=re.escape(f"cannot read image file {bad}")):
        next(iter(test))


def test_missing_image_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="train"):
        build_loaders("imagenet", tmp_path)


# ---------------------------------------------------------------- real data (when present)


@pytest.mark.skipif(
    not (REAL_CIFAR10 / "cifar-10-batches-py" / "test_batch").is_file(), reason="real CIFAR-10 not present under shared/data"
)
def test_real_cifar10_test_batch():
    images, labels = load_cifar(REAL_CIFAR10, "cifar10", train=False)
    assert images.shape == (10000, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.min() == 0 and labels.max() == 9
    assert torch.equal(labels.bincount(), torch.full((10,), 1000))
