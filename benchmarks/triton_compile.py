"""GPU compile check of every Triton specialisation kdfast's launchers make, without a GPU.

    python -m benchmarks.triton_compile [--ops kd sp ...] [--arch sm90 sm80] [--jobs 2] [--out DIR]

1. Records every launch of the shape catalogue (benchmarks/triton_catalogue.py) with the
   launchers' device helpers answering as the target GPU (sm90: a 132-SM H200, the whole
   catalogue; sm80: a 108-SM A100, the main shape of every op in float32 and bfloat16), launching
   nothing (benchmarks/triton_launches.py).
2. Dedupes the launches into distinct specialisations with the installed Triton's own binder
   (``create_function_from_signature`` + ``JITFunction._pack_args``, as ``JITFunction.run``
   does): an int argument equal to 1 becomes a constexpr, ints and pointers get their
   16-divisibility attributes, exactly as on a GPU.
3. Compiles each with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
   (``--jobs`` processes) and reads registers and spill bytes from Triton's own ``ptxas -v`` log,
   shared memory, num_warps and num_stages from the kernel's metadata.

Fails (exit status 1, the failures listed) on a launcher error, a compile error, spills in a
specialisation used by a float32/bfloat16/float16 case (float64-only spills are reported and
allowed; RESIDUAL_SPILLS would bound an accepted one: today none), shared memory over the
target's opt-in limit and a grid over the CUDA launch limits.
Writes one CSV per target and Triton version: ``<out>/triton-compile-<arch>-triton<version>.csv``.
Runs under any Triton from 3.6 (the GPU machine's) to 3.8 with only torch (a CPU build is
enough), triton and numpy installed; TRITON_INTERPRET must be unset.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import multiprocessing
import os
import re
import resource
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.triton_launches import (
    DEVICES,
    Device,
    Launch,
    grid_errors,
    import_kernels,
    kernel_module,
    recording,
    stand_in,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COLUMNS = (
    "kernel",
    "op",
    "dtypes",
    "constexprs",
    "specialisation",
    "num_warps",
    "num_stages",
    "registers",
    "spill_stores",
    "spill_loads",
    "shared",
    "grid",
    "launches",
    "example",
    "status",
)
SPILL_FREE_DTYPES = ("float32", "bfloat16", "float16")
# Residual spills: kernel ("module:qualname" without "kdfast.kernels.") -> the most spill bytes
# (stores + loads) that one of its float32/bfloat16/float16 specialisations may have, on any target
# and Triton version. Empty: every such specialisation compiles without spills (sm_90 with triton
# 3.6 and 3.8, sm_80 with 3.8; the last entry, LCC's backward tile kernel, was removed 2026-12-04
# by its launch options, kernels/lcc.py _TILE_MAXNREG). An entry is for a spill that is understood
# and accepted, with the reason next to it; any spill not bounded here fails.
RESIDUAL_SPILLS: dict[str, int] = {}


# ----------------------------------------------------------------------------- recording


def record(device: Device, ops: tuple[str, ...]) -> tuple[list[Launch], list[str], list[str]]:
    """(launches, launcher errors, patched device helpers) of the catalogue's cases of ``ops``."""
    from benchmarks.triton_catalogue import cases

    launches: list[Launch] = []
    errors = []
    for op in ops:  # before recording() patches the modules' device helpers
        try:
            kernel_module(op)
        except Exception as e:  # noqa: BLE001 -- reported as a finding, the other ops still checked
            errors.append(f"{op}: importing kdfast.kernels.{op} raised {type(e).__name__}: {e}")
    ops = tuple(op for op in ops if f"kdfast.kernels.{op}" in sys.modules)
    current = ("", "", "")
    with recording(device, launches, lambda: current) as helpers:
        for case in cases(ops, device.main_only):
            current = (case.op, case.dtype, case.case)
            try:
                case.run()
            except Exception as e:  # noqa: BLE001 -- a launcher's failure is a finding of the check
                errors.append(f"{case.op} {case.dtype} {case.case}: launcher raised {type(e).__name__}: {e}")
    return launches, errors, helpers


# ----------------------------------------------------------------------------- binding


def _kernel(name: str):
    module, qualname = name.split(":")
    fn = sys.modules[module]
    for part in qualname.split("."):
        fn = getattr(fn, part)
    return fn


_BINDERS: dict = {}


def bind(launch: Launch, arch: int):
    """The installed Triton's view of a launch on ``arch``: (key, options, signature, constexprs,
    attrs, backend, target); ``key`` identifies the compiled specialisation (Triton's own cache
    key without the source hash)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _kernel(launch.kernel)
    if (launch.kernel, arch) not in _BINDERS:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        _BINDERS[launch.kernel, arch] = target, backend, create_function_from_signature(fn.signature, fn.params, backend)
    target, backend, binder = _BINDERS[launch.kernel, arch]
    args = [stand_in(a) for a in launch.args]
    kwargs = {k: stand_in(v) for k, v in launch.kwargs.items()}
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug  # as JITFunction.run
    if hasattr(knobs.compilation, "instrumentation_mode"):  # triton >= 3.7
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*args, **kwargs)
    key = (launch.kernel, str(specialization), str(sorted(options.items())))
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return key, options, signature, constexprs, attrs, backend, target


def _describe_binding(fn, signature: dict, constexprs: dict, attrs: dict) -> tuple[str, str]:
    """(constexprs "NAME=value ...", the other parameters' "name:type[attrs]" in order); an
    element of a tuple parameter is named ``name[i]``."""
    names = fn.arg_names

    def label(path: tuple[int, ...]) -> str:
        return names[path[0]] + "".join(f"[{i}]" for i in path[1:])

    consts = " ".join(
        f"{label(path)}={value!r}"
        for path, value in constexprs.items()
        if names[path[0]] not in ("debug", "instrumentation_mode")
    )
    attr_of: defaultdict[int, list[str]] = defaultdict(list)
    for path, values in attrs.items():
        attr_of[path[0]] += [
            ("" if len(path) == 1 else f"{label(path)}:") + (f"div{v}" if k == "tt.divisibility" else f"{k}={v}")
            for k, v in values
        ]
    params = " ".join(
        f"{name}:{signature[name]}" + (f"[{','.join(attr_of[i])}]" if attr_of[i] else "")
        for i, name in enumerate(names)
        if signature[name] != "constexpr"
    )
    return consts.replace("triton.language.", "tl."), params


# ----------------------------------------------------------------------------- compiling


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_one(job: tuple[Launch, int]) -> dict:
    """Compiles one specialisation (a representative launch) for ``arch``; returns its resources
    or its error."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
    knobs.nvidia.dump_ptxas_log = True  # printed by make_cubin: registers and spills
    launch, arch = job
    _, options, signature, constexprs, attrs, _, target = bind(launch, arch)
    log = io.StringIO()
    start = _cpu_seconds()
    try:
        with contextlib.redirect_stdout(log):  # Triton prints the ptxas -v log (TRITON_DUMP_PTXAS_LOG)
            compiled = triton.compile(
                ASTSource(_kernel(launch.kernel), signature, constexprs, attrs), target=target, options=options.__dict__
            )
    except Exception as e:  # noqa: BLE001 -- a compile error is a finding of the check
        lines = [line for line in str(e).splitlines() if line.strip()]
        return {"status": "error", "error": f"{type(e).__name__}: " + " | ".join(lines[-3:])[:900]}
    text = log.getvalue()
    regs = _PTXAS_REGS.search(text)
    spills = _PTXAS_SPILLS.search(text)
    if not (regs and spills):
        return {"status": "error", "error": "no ptxas -v report in Triton's log"}
    md = compiled.metadata
    return {
        "status": "ok",
        "registers": int(regs.group(1)),
        "spill_stores": int(spills.group(1)),
        "spill_loads": int(spills.group(2)),
        "shared": md.shared,
        "num_warps": md.num_warps,
        "num_stages": md.num_stages,
        "cpu_seconds": _cpu_seconds() - start,
    }


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class Specialisation:
    """The launches that share one compiled kernel on one target."""

    launch: Launch  # the first one, compiled as the representative
    constexprs: str
    params: str
    launches: list[Launch] = field(default_factory=list)
    result: dict = field(default_factory=dict)

    @property
    def dtypes(self) -> list[str]:
        return sorted({la.dtype for la in self.launches})

    @property
    def ops(self) -> list[str]:
        return sorted({la.op for la in self.launches})

    @property
    def largest_grid(self) -> tuple[int, int, int]:
        return max((la.grid for la in self.launches), key=lambda g: g[0] * g[1] * g[2])


def specialise(launches: list[Launch], arch: int) -> list[Specialisation]:
    """The distinct specialisations of ``launches`` on ``arch``, in first-launch order."""
    specs: dict[tuple, Specialisation] = {}
    for launch in launches:
        key, _, signature, constexprs, attrs, _, _ = bind(launch, arch)
        if key not in specs:
            specs[key] = Specialisation(launch, *_describe_binding(_kernel(launch.kernel), signature, constexprs, attrs))
        specs[key].launches.append(launch)
    return list(specs.values())


def compile_all(specs: list[Specialisation], arch: int, jobs: int) -> None:
    """Fills every specialisation's ``result`` (``jobs`` processes)."""
    work = [(spec.launch, arch) for spec in specs]
    results: Iterator[dict]
    if jobs <= 1:
        results = map(compile_one, work)
    else:  # fork: the workers inherit the imported kernel modules (and the import shim)
        pool = multiprocessing.get_context("fork").Pool(jobs)
        results = pool.imap(compile_one, work)
    for done, (spec, result) in enumerate(zip(specs, results, strict=True), 1):
        spec.result = result
        if done % 50 == 0:
            print(f"  {done}/{len(specs)} compiled", flush=True)
    if jobs > 1:
        pool.close()
        pool.join()


# ----------------------------------------------------------------------------- checks and tables


def failures(specs: list[Specialisation], device: Device) -> list[str]:
    """The failures among compiled specialisations (see the module docstring)."""
    found = []
    for spec in specs:
        r = spec.result
        where = (
            f"{spec.launch.kernel.split('.')[-1]} [{spec.constexprs}] ({', '.join(spec.ops)}; "
            f"{', '.join(spec.dtypes)}; e.g. {spec.launch.dtype} {spec.launch.case})"
        )
        if r["status"] != "ok":
            found.append(f"compile error: {where}: {r['error']}")
            continue
        spilled = r["spill_stores"] + r["spill_loads"]
        allowed = RESIDUAL_SPILLS.get(spec.launch.kernel.removeprefix("kdfast.kernels."), 0)
        if spilled > allowed and set(spec.dtypes) & set(SPILL_FREE_DTYPES):
            found.append(
                f"spills {r['spill_stores']}/{r['spill_loads']} bytes (stores/loads), {r['registers']} registers: {where}"
            )
        if r["shared"] > device.shared_optin:
            found.append(f"shared memory {r['shared']} > {device.shared_optin} bytes: {where}")
    return found


def write_table(path: Path, specs: list[Specialisation]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for spec in sorted(specs, key=lambda s: (s.launch.kernel, s.constexprs, s.params)):
            r = spec.result
            ok = r["status"] == "ok"
            writer.writerow(
                [
                    spec.launch.kernel.removeprefix("kdfast.kernels."),
                    " ".join(spec.ops),
                    " ".join(spec.dtypes),
                    spec.constexprs,
                    spec.params,
                    *(
                        r[k] if ok else ""
                        for k in ("num_warps", "num_stages", "registers", "spill_stores", "spill_loads", "shared")
                    ),
                    "x".join(map(str, spec.largest_grid)),
                    len(spec.launches),
                    f"{spec.launch.dtype} {spec.launch.case}",
                    "ok" if ok else r["error"],
                ]
            )


def check(arch_names: list[str], ops: tuple[str, ...], jobs: int, out: Path) -> list[str]:
    """Records, compiles and tabulates for every target; returns every failure."""
    import triton

    everything = []
    for name in arch_names:
        device = DEVICES[name]
        start = time.perf_counter()
        launches, errors, helpers = record(device, ops)
        errors += [f"{la.op} {la.dtype} {la.case}: {la.kernel}: {e}" for la in launches for e in grid_errors(la)]
        specs = specialise(launches, device.arch)
        print(
            f"{name}: {len(launches)} launches -> {len(specs)} specialisations "
            f"({time.perf_counter() - start:.1f} s; device helpers answering as {device.sms} SMs: "
            f"{', '.join(helpers)})",
            flush=True,
        )
        start = time.perf_counter()
        compile_all(specs, device.arch, jobs)
        found = errors + failures(specs, device)
        path = out / f"triton-compile-{name}-triton{triton.__version__}.csv"
        write_table(path, specs)
        cpu: defaultdict[str, float] = defaultdict(float)
        for spec in specs:
            cpu[spec.launch.op] += spec.result.get("cpu_seconds", 0.0)
        print(
            f"{name}: compiled in {time.perf_counter() - start:.1f} s, {len(found)} failures; table: {path}; "
            f"CPU seconds {sum(cpu.values()):.0f}: " + ", ".join(f"{op} {s:.0f}" for op, s in cpu.items()),
            flush=True,
        )
        everything += [f"{name} triton {triton.__version__}: {f}" for f in found]
    return everything


def main(argv: list[str] | None = None) -> int:
    from benchmarks.triton_catalogue import OPS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--arch", nargs="+", choices=list(DEVICES), default=list(DEVICES))
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder of the CSV tables")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="kdfast-triton-cache-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # compiled kernels are not kept
        import_kernels()
        found = check(args.arch, tuple(args.ops), args.jobs, args.out)
    for line in found:
        print("FAIL", line)
    print(
        f"{len(found)} failures"
        if found
        else "all specialisations compile, within the limits, no spills but those RESIDUAL_SPILLS bounds"
    )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
