"""Benchmark of the map-distance loss (AFD/RTK): ``map_distance_loss`` over every (teacher,
student) pair of residual-block outputs, with its defaults (pool "map", AFD's code).

The case is the CIFAR pair wrn_40_2 -> wrn_16_2 of AFD: the 18 teacher and 6 student residual-block
outputs (kdfast.models' ``features(x).blocks``: 32x32x32, 64x16x16 and 128x8x8 blocks, 6 per size
in the teacher, 2 in the student), 108 pairs in three size groups, and attention weights ``att``
(B, 18, 6), a softmax over the students (as AFD's). The eager reference is AFD's code: per teacher
map, the distances to all student values of its size (kdfast/reference/map_distance.py); "compiled"
is torch.compile of it. Inputs are standard normal maps in one dtype; the student maps and att
receive gradients.

A shape is written compactly: the number k of student entries, then entries ``n x B x C x H x W``
(n maps of that shape, in network order), the first k the student's, the others the teacher's.
The GPU sweep takes B = 64 (the CIFAR recipe) and 256, the CPU sweep B = 64; "tiny" is for the
Triton interpreter.

The byte model counts the least traffic: the forward reads every map once (the AT op's channel
reduction); the backward reads the student maps and writes their gradient. The distances
themselves (B T S N multiply-adds over values of B (S U + T) N elements) are small next to it.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from benchmarks.common import Inputs, OpSpec, Shape, by_pass, element_size
from kdfast import functional, models
from kdfast.reference import map_distance as reference

Entry = tuple[int, int, int, int, int]  # (n maps, B, C, H, W)


@functools.cache
def block_shapes(model: str) -> tuple[tuple[int, int, int], ...]:
    """(C, H, W) of every residual-block output of a CIFAR-100 model (one forward at batch 1)."""
    net = models.create(model, 100).eval()
    with torch.no_grad():
        blocks = net.features(torch.zeros(1, 3, 32, 32)).blocks
    return tuple((b.shape[1], b.shape[2], b.shape[3]) for b in blocks)


def _entries(chws: tuple[tuple[int, int, int], ...], batch: int) -> tuple[Entry, ...]:
    """Runs of equal block shapes as (n, B, C, H, W) entries, in network order."""
    entries: list[Entry] = []
    for chw in chws:
        if entries and entries[-1][2:] == chw:
            entries[-1] = (entries[-1][0] + 1, batch, *chw)
        else:
            entries.append((1, batch, *chw))
    return tuple(entries)


def pair_shape(student: tuple[tuple[int, int, int], ...], teacher: tuple[tuple[int, int, int], ...], batch: int) -> Shape:
    s, t = _entries(student, batch), _entries(teacher, batch)
    return ((len(s),), *s, *t)


def expand(shape: Shape) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """The (B, C, H, W) shapes of the student maps and of the teacher maps of a shape."""
    (k,), *entries = shape
    maps = [[tuple(e[1:]) for e in group for _ in range(e[0])] for group in (entries[:k], entries[k:])]
    return maps[0], maps[1]


def _wrn(batch: int) -> Shape:
    return pair_shape(block_shapes("wrn_16_2"), block_shapes("wrn_40_2"), batch)


SHAPES = {
    "cuda": [_wrn(64), _wrn(256)],
    "cuda-quick": [_wrn(64)],
    "cpu": [_wrn(64)],
    "cpu-quick": [_wrn(64)],
    "tiny": [pair_shape(((4, 8, 8), (8, 4, 4)), ((4, 8, 8), (8, 8, 8), (16, 4, 4)), 2)],
}


def pair_inputs(shape: Shape, dtype: torch.dtype, device: torch.device) -> Inputs:
    students, teachers = expand(shape)
    f_s = [torch.randn(s, dtype=dtype, device=device, requires_grad=True) for s in students]
    f_t = [torch.randn(t, dtype=dtype, device=device) for t in teachers]
    logits = torch.randn(students[0][0], len(teachers), len(students), device=device)
    att = logits.softmax(-1).to(dtype).requires_grad_()
    return Inputs((f_s, f_t, att), (*f_s, att))


def pair_bytes(shape: Shape, dtype: torch.dtype, pass_: str) -> int:
    """fwd: every map read once; bwd: the student maps read and their gradient written."""
    students, teachers = expand(shape)
    student = sum(math.prod(s) for s in students) * element_size(dtype)
    teacher = sum(math.prod(t) for t in teachers) * element_size(dtype)
    return by_pass(student + teacher, 2 * student, pass_)


def afd_loss(f_s: list[Tensor], f_t: list[Tensor], att: Tensor) -> Tensor:
    """Eager map-distance loss as AFD's code computes it (a loop over the teacher maps)."""
    return reference.map_distance_loss(f_s, f_t, att)


SPECS = (
    OpSpec(
        name="map_distance_loss",
        family="map_distance",
        reference=afd_loss,
        fused=functional.map_distance_loss,
        make_inputs=pair_inputs,
        bytes_moved=pair_bytes,
        shapes=SHAPES,
    ),
)
