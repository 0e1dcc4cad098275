"""CRD, the method (kdfast/distillers/crd.py): the peers' computation, sampling, the memory banks in
the engine (training, exact resume, 2-process gloo DDP) and the loaders' indices.

The peers' CRD (RepDistiller's CRDLoss / ContrastMemory, mdistiller's CRD) is written out here in
plain torch (:func:`peer_step`) and compared with the distiller on the same weights, batch and
contrast indices: the loss, the gradients, the normalisation constants and the bank update.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, exact_config, set_args, tiny

from kdfast import distillers, models
from kdfast.data import build_loaders
from kdfast.data.schedule import EpochSchedule
from kdfast.distillers.crd import CRD
from kdfast.engine import checkpoint, load_config, train
from kdfast.engine.assembly import build_distiller, seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")

CRD_RUN = [*TINY, "model.teacher=resnet8", "method.nce_k=256"]  # a tiny run with banks of 256 negatives


def make_crd(teacher, student, labels: torch.Tensor, **params) -> CRD:
    distiller = distillers.create("crd", student, teacher, params)
    assert isinstance(distiller, CRD)
    distiller.bind_training_set(labels)
    return distiller


def peer_step(distiller: CRD, student, x, y, feats, idx: torch.Tensor, contrast_idx: torch.Tensor):
    """One step of the peers' CRD, written out as RepDistiller computes it, on copies of the
    distiller's embedding heads, banks and constants: (CE + 0.8 (L_s + L_t), new banks, Z)."""
    p = distiller.params
    embed_s, embed_t = (
        torch.nn.Linear(m.linear.in_features, p.feat_dim).double()
        for m in (distiller.contrast.embed_s, distiller.contrast.embed_t)
    )
    embed_s.load_state_dict(distiller.contrast.embed_s.linear.state_dict())
    embed_t.load_state_dict(distiller.contrast.embed_t.linear.state_dict())
    memory_v1, memory_v2 = distiller.contrast.memory_s.clone(), distiller.contrast.memory_t.clone()
    n, k = memory_v1.shape[0], contrast_idx.shape[1] - 1

    def normalize(v):
        return v.div(v.pow(2).sum(1, keepdim=True).pow(0.5))

    out = student.features(x)
    v1, v2 = normalize(embed_s(out.pooled)), normalize(embed_t(feats.pooled))
    w1 = torch.index_select(memory_v1, 0, contrast_idx.view(-1)).view(len(x), k + 1, -1)
    w2 = torch.index_select(memory_v2, 0, contrast_idx.view(-1)).view(len(x), k + 1, -1)
    out_v2 = torch.exp(torch.bmm(w1, v2.unsqueeze(2)) / p.nce_temperature)
    out_v1 = torch.exp(torch.bmm(w2, v1.unsqueeze(2)) / p.nce_temperature)
    z_v1, z_v2 = (out_v1.mean() * n).item(), (out_v2.mean() * n).item()
    out_v1, out_v2 = (out_v1 / z_v1).squeeze(2), (out_v2 / z_v2).squeeze(2)

    def contrast_loss(o):
        m, pn = o.shape[1] - 1, 1 / float(n)
        log_d1 = torch.log(o[:, 0] / (o[:, 0] + m * pn + 1e-7))
        log_d0 = torch.log(torch.full_like(o[:, 1:], m * pn) / (o[:, 1:] + m * pn + 1e-7))
        return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0)) / o.shape[0]

    loss = F.cross_entropy(out.logits, y) + p.feat_weight * (contrast_loss(out_v1) + contrast_loss(out_v2)).squeeze()
    with torch.no_grad():
        for memory, v in ((memory_v1, v1), (memory_v2, v2)):
            pos = torch.index_select(memory, 0, idx).mul(p.nce_momentum).add(torch.mul(v, 1 - p.nce_momentum))
            memory.index_copy_(0, idx, normalize(pos))
    return loss, (memory_v1, memory_v2), (z_v1, z_v2), (embed_s, embed_t)


def test_matches_the_peers_step(pair):
    """Same weights, batch and contrast indices (float64): the distiller's loss is the peers' CE +
    0.8 (L_s + L_t) with their first-batch Z, its gradients are theirs, and its banks after the
    step are their momentum update."""
    teacher, student, x, y, _ = pair
    teacher, student = copy.deepcopy(teacher), copy.deepcopy(student)
    torch.manual_seed(3)
    labels = torch.randint(0, 10, (40,))
    labels[torch.arange(8) * 5] = y  # the batch's images are rows 0, 5, ..., 35
    distiller = make_crd(teacher, student, labels, nce_k=30)
    for module in (teacher, distiller):
        module.double()
    twin, x = copy.deepcopy(student), x.double()
    with torch.no_grad():
        feats = teacher.features(x)
    idx = torch.arange(8) * 5
    contrast_idx = distiller.sample(idx, y)
    expected, banks, zs, heads = peer_step(distiller, twin, x, y, feats, idx, contrast_idx)
    _, losses = distiller(x, y, feats, 1, indices=idx, contrast_indices=contrast_idx)
    total = sum(losses.values())
    torch.testing.assert_close(total, expected, rtol=1e-10, atol=0)
    total.backward()
    expected.backward()
    for a, b in zip(student.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-12)
    for mine, theirs in ((distiller.contrast.embed_s.linear, heads[0]), (distiller.contrast.embed_t.linear, heads[1])):
        torch.testing.assert_close(mine.weight.grad, theirs.weight.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(distiller.contrast.z, torch.tensor(zs, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(distiller.contrast.memory_s, banks[0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(distiller.contrast.memory_t, banks[1], rtol=1e-12, atol=1e-15)


def test_sampling(pair):
    """Column 0: the sample's own row ("exact") or a row of its class ("relax"); the negatives:
    images of other classes, distinct per sample, or drawn with replacement where a class has fewer
    other images than nce_k (or with replace: true); reproducible from (seed, step, rank)."""
    teacher, student, *_ = pair
    labels = torch.arange(60) % 6
    crd = make_crd(teacher, student, labels, nce_k=40)
    idx = torch.tensor([0, 7, 14, 21, 59])
    y = labels[idx]
    rows = crd.sample(idx, y)
    assert rows.shape == (5, 41) and rows.dtype == torch.int64
    assert torch.equal(rows[:, 0], idx)
    assert (labels[rows[:, 1:]] != y[:, None]).all()
    assert all(len(set(r.tolist())) == 40 for r in rows[:, 1:])
    assert torch.equal(crd.sample(idx, y), rows)  # same step: same draw
    crd.contrast.steps += 1
    assert not torch.equal(crd.sample(idx, y), rows)
    relaxed = make_crd(teacher, student, labels, nce_k=40, mode="relax").sample(idx, y)
    assert (labels[relaxed[:, 0]] == y).all()
    for crd in (make_crd(teacher, student, labels, nce_k=51), make_crd(teacher, student, labels, nce_k=500, replace=True)):
        rows = crd.sample(idx, y)
        assert (labels[rows[:, 1:]] != y[:, None]).all() and rows.min() >= 0 and rows.max() < 60
    counts = torch.bincount(rows[0, 1:], minlength=60)  # 500 draws over the 50 images of other classes
    assert (counts[labels != y[0]] > 0).all() and (counts[labels == y[0]] == 0).all()


def test_banks_state_dict_and_unbound_errors(pair):
    teacher, student, x, y, feats = pair
    crd = make_crd(teacher, student, torch.arange(20) % 10)
    state = crd.state_dict()
    assert state["contrast.memory_s"].shape == (20, 128) and state["contrast.z"].tolist() == [-1.0, -1.0]
    fresh = distillers.create("crd", models.create("resnet8", 10), teacher)
    assert isinstance(fresh, CRD)
    fresh.load_state_dict(state)  # an unbound distiller takes the saved banks (kdfast viz)
    assert torch.equal(fresh.contrast.memory_t, crd.contrast.memory_t)
    with pytest.raises(ValueError, match="needs the batch's sample indices"):
        crd(x, y, feats, 1)
    with pytest.raises(RuntimeError, match="no training set bound"):
        distillers.create("crd", models.create("resnet8", 10), teacher)(x, y, feats, 1, indices=torch.arange(8))
    with pytest.raises(ValueError, match="mode must be one of"):
        distillers.make_params("crd", {"mode": "nope"})


def test_loaders_hand_the_indices():
    """yield_indices: every training batch is (images, labels, indices), the positions of its images."""
    loaders = build_loaders("digits", batch_size=100, seed=3)
    loaders.train.yield_indices = True
    seen = []
    for images, labels, index in loaders.train:
        assert torch.equal(labels, loaders.train.labels[index]) and len(images) == len(index)
        seen.append(index)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(1437))
    assert len(next(iter(loaders.test))) == 2


def _config(out: Path, teacher_ckpt: Path, epochs: int, *extra: str):
    return exact_config("digits/crd", out, teacher_ckpt, epochs, "method.nce_k=256", *extra)


def test_trains_and_the_loss_decreases(tmp_path, teacher_ckpt):
    """20 images per class, batch 40: every bank row is an embedding after the first epoch. The NCE
    loss first rises (the random rows that Z was set on give way to the still similar embeddings of
    an untrained student and a random teacher), then falls well below its peak as the heads learn
    to tell the images apart; CE falls throughout (measured: crd 10.2, peak 27.7 at epoch 5, 9.5 at
    epoch 12)."""
    extra = (
        "data.train_per_class=20",
        "data.batch_size=40",
        "train.max_train_batches=5",
        "method.nce_k=128",
        "optim.milestones=[20]",
    )
    train(_config(tmp_path, teacher_ckpt, 12, *extra))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "loss.ce", "loss.crd"} <= set(rows[0])
    crd = [r["loss.crd"] for r in rows]
    assert crd[-1] < 0.6 * max(crd) and rows[-1]["loss"] < 0.6 * max(r["loss"] for r in rows)
    assert rows[-1]["loss.ce"] < rows[0]["loss.ce"]
    state = checkpoint.load(tmp_path / "last.pt")["distiller"]
    assert state["contrast.memory_s"].shape == (200, 128) and (state["contrast.z"] > 0).all()
    assert state["contrast._extra_state"]["steps"] == 12 * 5


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def test_resume_equals_uninterrupted_run(tmp_path, teacher_ckpt):
    """Banks, Z, step count and everything else: bit for bit after 2 + 2 epochs as after 4."""
    train(_config(tmp_path / "full", teacher_ckpt, 4))
    train(_config(tmp_path / "split", teacher_ckpt, 2))
    train(_config(tmp_path / "split", teacher_ckpt, 4), resume=True)
    a, b = (checkpoint.load(tmp_path / run / "last.pt") for run in ("full", "split"))
    _same_state(a["distiller"], b["distiller"])
    assert a["distiller"]["contrast._extra_state"]["steps"] == 12
    for key, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][key]["momentum_buffer"])
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("images_per_s", "epoch_s")} for r in rows]  # noqa: E731
    assert strip(a["history"]) == strip(b["history"])


def test_two_process_gloo_ddp(tmp_path, torchrun_cli, teacher_ckpt):
    """2 processes x 8 images x 3 steps: rank 0's saved banks hold the update of every image that
    either process trained on, and no other row moved from its initial value (the banks as the
    engine builds them: seeded, then bound); Z is set."""
    overrides = [*CRD_RUN, f"model.teacher_checkpoint={teacher_ckpt}"]
    sets = set_args(overrides)
    proc = torchrun_cli(29531, "train", "digits/crd", "--out-dir", str(tmp_path), "--epochs", "1", *sets, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = checkpoint.load(tmp_path / "last.pt")["distiller"]
    cfg = load_config("digits/crd", overrides)
    teacher = models.create("resnet8", 10)
    seed_everything(cfg.train.seed)  # as the engine builds a student's distiller
    initial = build_distiller(cfg, 10, teacher)
    initial.bind_training_set(build_loaders("digits").train.labels)
    seen = torch.cat([EpochSchedule(1437, 8, shuffle=True, seed=0, rank=r, world_size=2).indices(0)[:24] for r in (0, 1)])
    for name in ("memory_s", "memory_t"):
        moved = (state[f"contrast.{name}"] != getattr(initial.contrast, name)).any(dim=1)
        assert torch.equal(moved.nonzero().flatten(), seen.sort().values), name
        assert torch.allclose(state[f"contrast.{name}"][seen].norm(dim=1), torch.ones(48))
    assert (state["contrast.z"] > 0).all() and state["contrast._extra_state"]["steps"] == 3


def _ddp_worker(rank: int, init: str, result: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    torch.manual_seed(0)
    teacher = models.create("resnet8", 10).eval().requires_grad_(False)
    crd = make_crd(teacher, models.create("resnet8", 10), torch.arange(30) % 10, nce_k=12)
    torch.manual_seed(1 + rank)  # each process its own batch
    x, idx = torch.randn(4, 3, 32, 32), torch.arange(4) + 4 * rank
    with torch.inference_mode():
        feats = teacher.features(x)
    crd(x, idx % 10, feats, 1, indices=idx)
    torch.save({"memory_s": crd.contrast.memory_s, "memory_t": crd.contrast.memory_t, "z": crd.contrast.z}, f"{result}.{rank}")
    torch.distributed.destroy_process_group()


def test_ddp_replicas_stay_equal(tmp_path):
    """Two gloo processes with different batches: after a step both hold the same banks (each row
    of both batches updated) and the same Z."""
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_ddp_worker, args=(f"file://{tmp_path / 'init'}", str(tmp_path / "r")), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"r.{rank}") for rank in (0, 1))
    for key in ("memory_s", "memory_t", "z"):
        assert torch.equal(r0[key], r1[key]), key
    moved = ((r0["memory_s"].norm(dim=1) - 1).abs() < 1e-5).nonzero().flatten()
    assert torch.equal(moved, torch.arange(8))


def test_with_another_student_as_alone(tmp_path, teacher_ckpt):
    """CRD next to a KD student (one teacher forward per batch, the loader handing indices to CRD
    only): each trains bit for bit as it does alone, banks and step count included."""
    import dataclasses

    from kdfast.engine import train_students
    from kdfast.engine.config import RunConfig, students

    teacher = ["model.teacher=resnet8", f"model.teacher_checkpoint={teacher_ckpt}"]
    base = load_config("digits/kd", tiny(tmp_path / "many", "train.epochs=2", *teacher))
    cfg = dataclasses.replace(base, runs=[RunConfig(seed=0), RunConfig(method={"name": "crd", "nce_k": 256}, seed=0)])
    train_students(cfg)
    for _, name, single in students(cfg):
        alone = dataclasses.replace(single, train=dataclasses.replace(single.train, out_dir=str(tmp_path / "alone" / name)))
        train(alone)
        a, b = (checkpoint.load(root / name / "last.pt") for root in (tmp_path / "many", tmp_path / "alone"))
        _same_state(a["distiller"], b["distiller"])
        assert a["history"][-1]["loss"] == b["history"][-1]["loss"]
    assert "contrast.memory_s" in checkpoint.load(tmp_path / "many" / "crd-s0" / "last.pt")["distiller"]


def test_imagenet_loader_hands_the_indices(tmp_path):
    """The worker loader (ImageNet) under yield_indices: each batch's indices are its images'
    positions, prefetching workers included, and a mid-epoch resume continues with the rest."""
    from PIL import Image

    from kdfast.data.imagenet import WorkerLoader, image_folder

    for cls in ("a", "b", "c"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40 + 8 * i, 36), (80 * i, 60, 30)).save(tmp_path / "train" / cls / f"{i}.jpg")
    loader = WorkerLoader(image_folder(tmp_path, True, 0, "cpu"), 2, train=True, workers=1)
    loader.yield_indices = True
    assert torch.equal(loader.labels, torch.arange(9) // 3)
    loader.set_epoch(0)
    seen = []
    for images, labels, index in loader:
        assert torch.equal(labels, loader.labels[index]) and images.shape[0] == len(index)
        seen.append(index)
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(9))
    loader.set_epoch(1)
    first = next(iter(loader))[2]
    state = loader.state_dict()
    rest = [index for _, _, index in loader]
    loader.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(rest, [index for _, _, index in loader], strict=True))
    assert not any(bool((r[:, None] == first).any()) for r in rest)
