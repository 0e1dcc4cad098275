"""End-to-end benchmark: images/s of one distillation training step, kdfast vs an eager fp32 peer.

One step = teacher forward + student forward/backward + losses + SGD update, for a CIFAR pair
(default resnet32x4 -> resnet8x4, 100 classes, synthetic 32 x 32 images). Both sides run in the
same process:

* ``kdfast``: device-resident batches, channels_last, bf16 autocast on GPU (``amp="auto"``), the
  teacher under ``inference_mode``, the registered distiller (fused ``kdfast.functional`` losses);
* ``eager-fp32``: what the peers' code does (mdistiller / RepDistiller): a ``DataLoader`` over a
  CPU ``TensorDataset`` copied to the device every step, fp32, no compile, the teacher under
  ``no_grad``, the unfused losses of ``kdfast.reference`` (and the same trainable extras as the
  distiller: LCC's class-aware attention).

Every method runs with its distiller's default parameters, which the reference losses repeat.

Rows use the columns of ``benchmarks/common.py`` (op ``e2e_<method>``, pass ``train_step``,
shape ``BxCxHxW`` of the batch, so images/s = B * 1000 / median_ms).
"""

from __future__ import annotations

import csv
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from kdfast import distillers, models
from kdfast.engine.trainer import autocast
from kdfast.models import Features, KDModel
from kdfast.nn import ClassAwareAttention
from kdfast.reference import at as ref_at, dkd as ref_dkd, kd as ref_kd, lcc as ref_lcc, rkd as ref_rkd, sp as ref_sp

__all__ = ["METHODS", "run_e2e", "benchmarks_common"]

NUM_CLASSES = 100
ReferenceLoss = Callable[[Features, Features, Tensor], Tensor]
"""(student features, teacher features, labels) -> the total loss of one batch, unfused."""


def _lcc_reference(teacher: KDModel) -> tuple[ReferenceLoss, nn.Module]:
    """LCC's defaults: 0.1 CE + 0.9 KD (T=4) + 3 LCC (last stage, grid 4, mask of a class-aware attention)."""
    attention = ClassAwareAttention(teacher.stage_channels[-1], NUM_CLASSES)

    def loss(s: Features, t: Features, y: Tensor) -> Tensor:
        mask, attention_ce = attention(t.stages[-1], y)
        lcc = ref_lcc.local_correlation_loss(s.stages[-1], t.stages[-1], 4, mask=mask)
        return 0.1 * F.cross_entropy(s.logits, y) + 0.9 * ref_kd.kd_loss(s.logits, t.logits, 4.0) + 3.0 * lcc + attention_ce

    return loss, attention


def _stateless(loss: ReferenceLoss) -> Callable[[KDModel], tuple[ReferenceLoss, nn.Module]]:
    """A method without trainable extras."""
    return lambda teacher: (loss, nn.Module())


# method -> f(teacher) = (reference loss, the trainable extras it uses)
REFERENCE_METHODS: dict[str, Callable[[KDModel], tuple[ReferenceLoss, nn.Module]]] = {
    "kd": _stateless(lambda s, t, y: 0.1 * F.cross_entropy(s.logits, y) + 0.9 * ref_kd.kd_loss(s.logits, t.logits, 4.0)),
    "at": _stateless(lambda s, t, y: F.cross_entropy(s.logits, y) + 1000 * ref_at.at_stage_losses(s.stages[1:], t.stages[1:]).sum()),
    "dkd": _stateless(lambda s, t, y: F.cross_entropy(s.logits, y) + ref_dkd.dkd_loss(s.logits, t.logits, y, 1.0, 8.0, 4.0)),
    "sp": _stateless(lambda s, t, y: F.cross_entropy(s.logits, y) + 3000 * ref_sp.sp_loss(s.stages[-1], t.stages[-1])),
    "rkd": _stateless(lambda s, t, y: F.cross_entropy(s.logits, y) + ref_rkd.rkd_loss(s.pooled, t.pooled, 25.0, 50.0)),
    "lcc": _lcc_reference,
}
METHODS = tuple(REFERENCE_METHODS)
STEP_EPOCH = 10**6  # past every warm-up ramp (DKD): the full loss is timed


def benchmarks_common():
    """``benchmarks.common`` from a source checkout (it is not an installed package), or None."""
    root = Path(__file__).resolve().parents[2]
    if (root / "benchmarks" / "common.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        from benchmarks import common
    except ImportError:
        return None
    return common


def _synthetic(batch: int, batches: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch * batches, 3, 32, 32, generator=gen), torch.randint(0, NUM_CLASSES, (batch * batches,), generator=gen)


def _models(teacher: str, student: str, device: torch.device, memory_format: torch.memory_format):
    torch.manual_seed(0)
    t = models.create(teacher, NUM_CLASSES).to(device, memory_format=memory_format).eval().requires_grad_(False)
    s = models.create(student, NUM_CLASSES).to(device, memory_format=memory_format)
    return t, s


def _kdfast_step(method: str, teacher: str, student: str, device: torch.device, data: tuple[Tensor, Tensor],
                 batch: int) -> Callable[[], None]:
    t, s = _models(teacher, student, device, torch.channels_last)
    distiller = distillers.create(method, s, t).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(distiller.sgd_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    images = data[0].to(device).contiguous(memory_format=torch.channels_last)
    labels = data[1].to(device)
    batches = _cycle(list(zip(images.split(batch), labels.split(batch))))

    def step() -> None:
        x, y = next(batches)
        opt.zero_grad(set_to_none=True)
        with autocast(device, "auto"):
            with torch.inference_mode():
                feats = t.features(x)
            _, losses = distiller(x, y, feats, STEP_EPOCH)
        if not distiller.backward_done:
            sum(losses.values()).backward()
        opt.step()
        distiller.after_step(STEP_EPOCH)

    return step


def _eager_step(method: str, teacher: str, student: str, device: torch.device, data: tuple[Tensor, Tensor],
                batch: int) -> Callable[[], None]:
    t, s = _models(teacher, student, device, torch.contiguous_format)
    loss_fn, extras = REFERENCE_METHODS[method](t)
    extras.to(device)
    opt = torch.optim.SGD([*s.parameters(), *extras.parameters()], lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = DataLoader(TensorDataset(*data), batch_size=batch, shuffle=True, drop_last=True)
    batches = _cycle(loader)

    def step() -> None:
        x, y = (v.to(device, non_blocking=True) for v in next(batches))
        with torch.no_grad():
            feats_t = t.features(x)
        loss = loss_fn(s.features(x), feats_t, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _cycle(iterable) -> Iterator:
    while True:
        yield from iterable


def _time(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> tuple[list[float], int | None]:
    """Per-step milliseconds and (GPU) peak bytes allocated above the step's starting point."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    for _ in range(warmup):
        step()
    sync(device)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
    return times, peak


def _quantiles(times: Sequence[float]) -> tuple[float, float, float]:
    if len(times) < 2:
        return times[0], times[0], times[0]
    cuts = statistics.quantiles(times, n=5, method="inclusive")
    return statistics.median(times), cuts[0], cuts[3]


def run_e2e(device: torch.device, methods: Sequence[str] = METHODS, batch: int = 64, iters: int = 20, warmup: int = 3,
            teacher: str = "resnet32x4", student: str = "resnet8x4", out: Path | None = None) -> list[dict[str, str]]:
    """Measure every method both ways, print a table, merge the rows into the results CSV; returns the rows."""
    common = benchmarks_common()
    data = _synthetic(batch, 4)
    env = common.environment(device) if common else {"device": str(device), "torch": torch.__version__, "triton": ""}
    amp_dtype = "bfloat16" if device.type == "cuda" else "float32"
    rows = []
    print(f"end-to-end distillation step, {teacher} -> {student}, batch {batch}, {device} ({env['device']})")
    print(f"{'method':<8} {'backend':<11} {'ms/step':>9} {'images/s':>9} {'speed-up':>9}")
    for method in methods:
        base_ms = None
        for backend, build, dtype in (("eager-fp32", _eager_step, "float32"), ("kdfast", _kdfast_step, amp_dtype)):
            times, peak = _time(build(method, teacher, student, device, data, batch), device, warmup, iters)
            median, p20, p80 = _quantiles(times)
            base_ms = base_ms or median
            print(f"{method:<8} {backend:<11} {median:>9.2f} {batch * 1e3 / median:>9.1f} {base_ms / median:>8.2f}x", flush=True)
            rows.append({"op": f"e2e_{method}", "backend": backend, "pass": "train_step", "dtype": dtype,
                         "shape": f"{batch}x3x32x32", "median_ms": f"{median:.6g}", "p20_ms": f"{p20:.6g}",
                         "p80_ms": f"{p80:.6g}", "peak_mem_bytes": "" if peak is None else str(peak), "gbps": "",
                         **env, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), "note": ""})
    _write(rows, device, out, common)
    return rows


def _write(rows: list[dict[str, str]], device: torch.device, out: Path | None, common) -> None:
    if common is not None:
        path = out or common.default_results_path(device)
        common.merge_csv(path, [common.Row(*(row[c] for c in common.CSV_COLUMNS)) for row in rows])
    else:  # an installed kdfast without the checkout's benchmarks/: same columns, appended
        path = out or Path(f"kdfast-e2e-{device.type}.csv")
        new = not path.exists()
        with path.open("a", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)
    print(f"rows written to {path}")
