"""The shared layer of the Triton op modules: what more than one of them uses.

No op module imports a private name of another one: a helper two modules need lives here, under a
public name. Family libraries keep their own public APIs (``softmax.py``: the streaming row
softmax of KD and DKD, and ``_logits.py``: their kernels' shared passes; ``relational.py``: the
Gram tiles of SP and RKD).

* host: dtype tables, the launch device context, the SM count, argument checks, the memory
  layout of strided launches (block_attention, HCL), the alignment and stage-chunking rules of the
  launches that take per-stage tuple arguments (AT, block_attention, HCL, map_distance), float
  scalars passed as two float32 values;
* device (``@triton.jit``, inlined where called: no cost): a correctly rounded sqrt, ``log1p``,
  the feature power ``g(x) = |x|^p`` of AT and its derivative, the offsets and loads of a
  [channels, positions] tile in a launch's layout, runtime selection from tuple arguments.
"""

import contextlib
import functools
import math
import struct
from collections.abc import Iterable, Sequence
from typing import TypeVar

import torch
import triton
import triton.language as tl
from torch import Tensor

T = TypeVar("T")

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}

# Tuple-argument launches: stages (modules, groups) per launch; longer lists are launched in chunks.
MAX_STAGES = 8
# The largest alignment (in elements) a launcher proves and restates with tl.multiple_of: the
# divisibility Triton itself assumes for its integer arguments.
MAX_ALIGN = 16
# Integer powers up to this one are computed with exact products, larger or real ones as
# exp2(p * log2|x|) (no libdevice pow: it does not run in the Triton interpreter).
MAX_INT_POWER = 8


# ----------------------------------------------------------------------------- host helpers


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of an op on `dtype` inputs (and of its float outputs such as losses,
    maps and statistics): float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.cache
def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs one program at a time).
    Each op module multiplies it by the programs per SM its launches aim for."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Makes ``device`` current for the launch (Triton launches on the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def check_rows(
    name: str, label: str, t: Tensor, shape: tuple[int, ...], dtypes: Iterable[torch.dtype], device: torch.device
) -> None:
    """Raises ValueError unless ``t`` has ``shape``, one of ``dtypes`` and lives on ``device``."""
    if tuple(t.shape) != shape or t.dtype not in dtypes or t.device != device:
        raise ValueError(
            f"{name}: {label} must be {shape} of {[str(d) for d in dtypes]} on "
            f"{device}, got {tuple(t.shape)} {t.dtype} on {t.device}"
        )


def split_scalar(x: float) -> tuple[float, float]:
    """``x`` as two float32 values ``hi + lo`` (Triton passes Python floats as float32); the
    kernel adds them back with :func:`scalar`."""
    x = float(x)
    hi = struct.unpack("f", struct.pack("f", x))[0]
    lo = x - hi  # exact in float64; NaN for x = inf
    return hi, struct.unpack("f", struct.pack("f", lo))[0] if math.isfinite(lo) else 0.0


# Memory layouts of a launch that reads (B, C, H, W) tensors through strides (the LAYOUT constexpr
# of block_attention and HCL, chosen by :func:`layout_of`).
CONTIGUOUS = 0  # every tensor has its positions y * W + x at unit stride
CHANNELS_LAST = 1  # every tensor has unit channel stride and positions that flatten to one stride
STRIDED = 2  # anything else: read through the c, y, x strides


def _hw_unit(t: Tensor) -> bool:
    """Whether positions y * W + x of ``t`` are at unit stride (contiguous per channel)."""
    _, _, h, w = t.shape
    return (w == 1 or t.stride(3) == 1) and (h == 1 or t.stride(2) == w)


def _channels_unit(t: Tensor) -> bool:
    """Whether ``t`` has unit channel stride and positions that flatten to one stride."""
    _, c, h, w = t.shape
    return (c == 1 or t.stride(1) == 1) and (h == 1 or w == 1 or t.stride(2) == w * t.stride(3))


def layout_of(tensors: Iterable[Tensor]) -> int:
    """The LAYOUT of a launch over 4-D ``tensors``: CONTIGUOUS, else CHANNELS_LAST, else STRIDED."""
    tensors = list(tensors)
    if all(_hw_unit(t) for t in tensors):
        return CONTIGUOUS
    return CHANNELS_LAST if all(_channels_unit(t) for t in tensors) else STRIDED


def hw_stride(t: Tensor) -> int:
    """Stride of the flattened positions of a (B, C, H, W) tensor (valid where h and w flatten
    into one)."""
    return t.stride(2) if t.size(3) == 1 else t.stride(3)


def alignment(values: Iterable[int]) -> int:
    """The largest power of two, at most MAX_ALIGN, that divides every one of ``values`` (data
    pointers in elements, strides, extents; a 0 divides by anything): the ALIGN a launcher
    proves for a stage."""
    g = 0
    for v in values:
        g = math.gcd(g, v)
    return min(g & -g, MAX_ALIGN) if g else MAX_ALIGN


def chunks(items: Sequence[T], size: int = MAX_STAGES) -> list[Sequence[T]]:
    """``items`` in consecutive launches of at most ``size`` (the tuple arguments' length)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def stage_slices(count: int, size: int = MAX_STAGES) -> list[slice]:
    """The stages ``0 .. count - 1`` in consecutive launches of at most ``size``, as slices."""
    return [slice(lo, min(lo + size, count)) for lo in range(0, count, size)]


def int_power(p: float) -> int:
    """The INT_P of :func:`feature_power` for the exponent ``p``: ``p`` itself where it is an integer up
    to MAX_INT_POWER (exact products), else -1 (exp2/log2)."""
    return int(p) if float(p).is_integer() and p <= MAX_INT_POWER else -1


# ----------------------------------------------------------------------------- device helpers


@triton.jit
def sqrt_rn(x):
    """Correctly rounded sqrt (tl.sqrt is approximate in float32)."""
    if x.dtype == tl.float32:
        r = tl.sqrt_rn(x)
    else:
        r = tl.sqrt(x)
    return r


@triton.jit
def log1p(y):
    """log(1 + y) for y >= 0, accurate for tiny y (Kahan: log(u) * y / (u - 1), u = 1 + y)."""
    u = 1.0 + y
    small = u == 1.0
    return tl.where(small, y, tl.log(u) * (y / tl.where(small, 1.0, u - 1.0)))


@triton.jit
def scalar(hi, lo, ACC: tl.constexpr):
    """A host float passed as float32 ``hi + lo`` (:func:`split_scalar`), in ACC: float32
    arguments keep float64 kernels within 2^-48 of the float64 value."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def _sign(x):
    """sign(x) in x's dtype: -1, 0 or 1 (0 for 0 and NaN)."""
    return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)


@triton.jit
def _abs_pow(ax, P: tl.constexpr, INT_P: tl.constexpr):
    """``ax ** P`` for ``ax = |x|``: INT_P >= 0 marks an integer P == INT_P, computed as exact
    products (so ``0 ** 0 = 1``); otherwise ``exp2(P * log2(ax))`` with ``0 ** P = 0``."""
    if INT_P >= 0:
        r = tl.full(ax.shape, 1.0, ax.dtype)
        for _ in tl.static_range(INT_P):
            r = r * ax
    else:
        zero = ax == 0  # log2 of 1 there, not of 0: no -inf (nor interpreter warnings)
        r = tl.where(zero, 0.0, tl.exp2(P * tl.log2(tl.where(zero, 1.0, ax))))
    return r


@triton.jit
def feature_power(x, P: tl.constexpr, INT_P: tl.constexpr, ODD_SIGNED: tl.constexpr):
    """The feature power ``g(x) = |x|^P``, or ``sign(x) |x|^P`` when ODD_SIGNED (AT's mode "mean"
    with an odd integer P); INT_P from :func:`int_power`."""
    r = _abs_pow(tl.abs(x), P, INT_P)
    if ODD_SIGNED:
        r = _sign(x) * r
    return r


@triton.jit
def feature_power_grad(x, P: tl.constexpr, INT_P: tl.constexpr, ODD_SIGNED: tl.constexpr):
    """``g'(x)`` of :func:`feature_power`: ``P |x|^(P-1)``, times sign(x) unless ODD_SIGNED (``|x|^0 = 1``,
    ``sign(0) = 0``)."""
    r = P * _abs_pow(tl.abs(x), P - 1, INT_P - 1)
    if not ODD_SIGNED:
        r = _sign(x) * r
    return r


@triton.jit
def tile_offsets(offs_c, offs_hw, width, sc, sy, sx, LAYOUT: tl.constexpr):
    """[BLOCK_C, BLOCK_HW] element offsets of channels offs_c at positions offs_hw (y * width + x)
    of a tensor with (c, y, x) strides sc, sy, sx; the unit stride of the LAYOUT (:func:`layout_of`)
    is a literal 1 (with CHANNELS_LAST, sx is the stride of the flattened positions)."""
    if LAYOUT == 0:
        offs = offs_c[:, None] * sc + offs_hw[None, :]
    elif LAYOUT == 1:
        offs = offs_c[:, None] + offs_hw[None, :] * sx
    else:
        y = offs_hw // width
        offs = offs_c[:, None] * sc + (y * sy + (offs_hw - y * width) * sx)[None, :]
    return offs


@triton.jit
def read_tile(view, offs_c, offs_hw, width, mask, LAYOUT: tl.constexpr, ACC: tl.constexpr):
    """[BLOCK_C, BLOCK_HW] of a sample ``view`` = (pointer, c, y, x strides) at channels offs_c and
    positions offs_hw (:func:`tile_offsets`), in ACC (0 outside ``mask``)."""
    offs = tile_offsets(offs_c, offs_hw, width, view[1], view[2], view[3], LAYOUT)
    return tl.load(view[0] + offs, mask=mask, other=0.0).to(ACC)


@triton.jit
def pick(values, i):
    """``values[i]`` of a tuple of pointer arguments, for a runtime index i (selects, no branch)."""
    v = values[0]
    for r in tl.static_range(1, len(values)):
        v = tl.where(i == r, values[r], v)
    return v


@triton.jit
def pick_int(values, i, DTYPE: tl.constexpr):
    """``values[i]`` of a tuple of integer arguments, for a runtime index i, as a DTYPE scalar.
    Every value is made a DTYPE scalar first (``tl.full``): Triton passes an integer argument equal
    to 1 as a constexpr, and a runtime one converts as ``tl.where`` would convert it."""
    v = tl.full([], values[0], DTYPE)
    for r in tl.static_range(1, len(values)):
        v = tl.where(i == r, tl.full([], values[r], DTYPE), v)
    return v


@triton.jit
def pick_field(rows, i, COL: tl.constexpr, DTYPE: tl.constexpr):
    """``rows[i][COL]`` of a tuple of integer tuples, for a runtime index i, as a DTYPE scalar
    (each value made a DTYPE scalar first, as in :func:`pick_int`)."""
    v = tl.full([], rows[0][COL], DTYPE)
    for r in tl.static_range(1, len(rows)):
        v = tl.where(i == r, tl.full([], rows[r][COL], DTYPE), v)
    return v


@triton.jit
def stage_of(pid, firsts):
    """Index s of the stage whose programs ``firsts[s] .. firsts[s + 1] - 1`` hold ``pid``."""
    s = tl.zeros([], tl.int32)
    for r in tl.static_range(1, len(firsts) - 1):
        s += (pid >= firsts[r]).to(tl.int32)
    return s
