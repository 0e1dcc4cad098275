"""Benchmark result rows and files, part of the installed package so that ``kdfast bench --e2e``
runs from a wheel: the row (:class:`Row`, ``CSV_COLUMNS``), the environment columns of a device,
the results CSV of a device and its merge, and the CPU peak-memory tracker
(:class:`LiveTensorBytes`). ``benchmarks/common.py`` (the op benchmarks of a source checkout)
builds on these.

Results go to ``benchmarks/results/`` of the source checkout kdfast runs from (an editable
install), else to ``kdfast-results/`` in the current folder.
"""

from __future__ import annotations

import csv
import os
import platform
import re
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "CSV_COLUMNS",
    "KEY_COLUMNS",
    "RESULTS_DIR",
    "LiveTensorBytes",
    "Row",
    "cpu_model",
    "default_results_path",
    "device_model",
    "environment",
    "measured_row",
    "merge_csv",
    "now",
    "results_path",
]

_CHECKOUT_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
RESULTS_DIR = _CHECKOUT_RESULTS if _CHECKOUT_RESULTS.is_dir() else Path("kdfast-results")
CSV_COLUMNS = (
    "op", "backend", "pass", "dtype", "shape", "median_ms", "p20_ms", "p80_ms",
    "peak_mem_bytes", "gbps", "device", "torch", "triton", "timestamp", "note",
)  # fmt: skip
KEY_COLUMNS = ("op", "backend", "pass", "dtype", "shape")


@dataclass(frozen=True)
class Row:
    """One line of a results CSV (CSV_COLUMNS, with ``pass_`` written as "pass")."""

    op: str
    backend: str
    pass_: str
    dtype: str
    shape: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    peak_mem_bytes: int | None  # None where it cannot be measured (see peak_memory_bytes)
    gbps: float | None  # None: not a bandwidth measurement (written empty; kdfast bench --e2e's training steps)
    device: str
    torch: str
    triton: str
    timestamp: str
    note: str = ""  # why a row has no measurement (Case.skip_reason)

    def as_csv(self) -> dict[str, str]:
        values = {("pass" if k == "pass_" else k): v for k, v in asdict(self).items()}
        return {k: _csv_value(v) for k, v in values.items()}


def measured_row(
    op: str,
    backend: str,
    pass_: str,
    dtype: str,
    shape: str,
    times_ms: tuple[float, float, float],
    peak: int | None,
    device: torch.device,
    note: str = "",
    gbps: float | None = float("nan"),
) -> Row:
    """The row of a measurement on `device` taken now: `times_ms` its (median, p20, p80)
    milliseconds (``kdfast.engine.timing.quantiles``), `peak` its peak bytes, the device, torch
    and triton columns of :func:`environment`."""
    median, p20, p80 = times_ms
    return Row(op, backend, pass_, dtype, shape, median, p20, p80, peak, gbps, timestamp=now(), note=note, **environment(device))


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while the mode is active and still alive.

    Every op that goes through the dispatcher passes here (aten ops, kdfast's C++ and Triton
    custom ops, autograd's backward ops); a storage that one of its outputs owns and that no
    input owned (i.e. not a view, not an in-place or ``out=`` result) counts with its nbytes
    from its creation until it is freed (a weakref finalizer on the untyped storage). Not
    counted: allocator slack and caching, scratch memory a kernel allocates and frees inside
    one op, and storages resized after their creation.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._known: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storages seen (or counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for tensor in _tensors((args, kwargs)):
            self._known.setdefault(tensor.untyped_storage(), False)
        out = func(*args, **(kwargs or {}))
        for tensor in _tensors(out):
            self._count(tensor.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        if storage in self._known:
            return
        self._known[storage] = True
        nbytes = storage.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, nbytes)

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes


def _tensors(tree: object) -> list[Tensor]:
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, Tensor)]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) Platinum 8480+", ...)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_model(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def environment(device: torch.device) -> dict[str, str]:
    """The device, torch and triton columns of the rows measured on `device` (on the CPU, the
    device includes torch's thread count)."""
    name = device_model(device)
    if device.type == "cpu":
        threads = torch.get_num_threads()
        name += f" ({threads} thread{'' if threads == 1 else 's'})"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {"device": name, "torch": torch.__version__, "triton": triton_version}


def default_results_path(device: torch.device, study: str = "") -> Path:
    """benchmarks/results/<device type>-<device column, sanitised>.csv, e.g.
    cpu-amd-epyc-2-threads.csv, cuda-nvidia-h100-80gb-hbm3.csv; a benchmark with its own files
    (`study`, e.g. "lakd", "loader") prefixes the name: lakd-cpu-amd-epyc-2-threads.csv."""
    path = results_path(device.type, environment(device)["device"])
    return path.with_name(f"{study}-{path.name}") if study else path


def results_path(device_type: str, device_name: str) -> Path:
    """The results CSV of a device named `device_name` (the rows' device column): see default_results_path."""
    name = re.sub(r"\((r|tm)\)", "", device_name, flags=re.IGNORECASE)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return RESULTS_DIR / f"{device_type}-{slug}.csv"


def merge_csv(path: Path, rows: Iterable[Row | Mapping[str, str]]) -> None:
    """Write `rows` into the CSV at `path`, replacing rows with the same key (KEY_COLUMNS). A row
    is a :class:`Row` or a line of a results CSV as read back (every CSV_COLUMNS key, text values)."""
    merged: dict[tuple[str, ...], dict[str, str]] = {}
    if path.exists():
        with path.open(newline="") as file:
            for line in csv.DictReader(file):
                merged[tuple(line[k] for k in KEY_COLUMNS)] = line
    for row in rows:
        line = row.as_csv() if isinstance(row, Row) else {k: row[k] for k in CSV_COLUMNS}
        merged[tuple(line[k] for k in KEY_COLUMNS)] = line
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".csv.partial")
    with partial.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(merged.values())
    os.replace(partial, path)


def _csv_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
