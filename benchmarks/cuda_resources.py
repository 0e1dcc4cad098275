"""Resource table of every CUDA kernel instantiation in the built extension, without recompiling.

    python -m benchmarks.cuda_resources [--so PATH] [--arch 90] [--out CSV] [--check]

Reads the cubins that nvcc embedded in ``kdfast/_C*.so`` (its ``.nv_fatbin`` section: one ELF per
``csrc/cuda/*.cu`` file and architecture) and, for each kernel of the chosen architecture, what
ptxas recorded in the cubin (the same numbers as ``nvcc -Xptxas -v`` / ``cuobjdump -res-usage``):

* ``registers``: per thread (``EIATTR_REGCOUNT``); ``register_cap``: the most ptxas was allowed
  (``EIATTR_MAXREG_COUNT``: 255, or what ``__launch_bounds__`` leaves);
* ``stack_frame_bytes``: the kernel's local memory per thread (``EIATTR_FRAME_SIZE``, ptxas's "bytes
  stack frame"): register spills plus any local arrays; ``stack_bytes``: with the frames of the
  functions it calls (``EIATTR_MIN_STACK_SIZE``). ptxas's "bytes spill stores/loads" are not
  stored in the cubin; a stack of 0 proves that there are none, so the check below fails on any;
* ``shared_bytes``: static shared memory (the ``.nv.shared.<kernel>`` section less the 1 KiB that
  sm_80+ reserve in it), ``max_threads`` (``__launch_bounds__``, 0 when none), ``param_bytes``
  (the kernel's argument buffer, ``EIATTR_CBANK_PARAM_SIZE``: at most 4 KiB before CUDA 12.1) and
  ``barriers`` (named barriers used).

``dtype`` is "float64" for an instantiation with ``double`` among its template arguments, else
"reduced" (float32/bfloat16/float16). ``--check`` exits 1 when a reduced instantiation uses a
stack (spills, local arrays or calls that are not inlined). The table is written sorted, so that a rebuild with unchanged
kernels reproduces it byte for byte. Needs only the Python standard library and ``c++filt``
(binutils; without it the names stay mangled).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "cuda-resources-sm90.csv"

FATBIN_MAGIC = 0xBA55ED50
FATBIN_ELF = 2  # entry kind: 1 PTX, 2 ELF (cubin)
FATBIN_COMPRESSED = 0x2000  # entry flag
RESERVED_SHARED = 1024  # bytes of every kernel's .nv.shared section that sm_80+ reserve for the system

# EIATTR attribute codes of .nv.info sections (format byte 0x04: a u16 size and that many bytes;
# 0x03: a u16 value; 0x02: a u8 value; 0x01: no value).
EIATTR_MAX_THREADS = 0x05
EIATTR_FRAME_SIZE = 0x11
EIATTR_MIN_STACK_SIZE = 0x12
EIATTR_CBANK_PARAM_SIZE = 0x19
EIATTR_MAXREG_COUNT = 0x1B
EIATTR_REGCOUNT = 0x2F
EIATTR_NUM_BARRIERS = 0x4C

FIELDS = [
    "file",
    "kernel",
    "dtype",
    "registers",
    "register_cap",
    "stack_frame_bytes",
    "stack_bytes",
    "shared_bytes",
    "max_threads",
    "param_bytes",
    "barriers",
]


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel instantiation of one cubin (see the module docstring for the columns)."""

    file: str
    kernel: str
    dtype: str
    registers: int
    register_cap: int
    stack_frame_bytes: int
    stack_bytes: int
    shared_bytes: int
    max_threads: int
    param_bytes: int
    barriers: int

    def row(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    offset: int
    size: int


def elf_sections(elf: bytes) -> list[Section]:
    """The section headers of a little-endian ELF64 image, named."""
    (shoff,) = struct.unpack_from("<Q", elf, 0x28)
    entsize, count, names_index = struct.unpack_from("<HHH", elf, 0x3A)
    raw = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * entsize) for i in range(count)]
    names_offset = raw[names_index][4]

    def name(offset: int) -> str:
        start = names_offset + offset
        return elf[start : elf.index(b"\0", start)].decode()

    return [Section(name(r[0]), r[4], r[5]) for r in raw]


def nv_info(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(attribute, value bytes) of every entry of an .nv.info section."""
    pos = 0
    while pos + 4 <= len(data):
        fmt, attr = data[pos], data[pos + 1]
        if fmt == 0x04:
            (size,) = struct.unpack_from("<H", data, pos + 2)
            yield attr, data[pos + 4 : pos + 4 + size]
            pos += 4 + size
        else:  # 0x01-0x03: the value (if any) in the entry's last two bytes
            yield attr, data[pos + 2 : pos + 4]
            pos += 4


def fatbin_cubins(so: Path, arch: int) -> Iterator[tuple[str, bytes]]:
    """(source file, cubin) of every uncompressed sm_<arch> ELF entry of the .so's .nv_fatbin."""
    image = so.read_bytes()
    fatbin = next((s for s in elf_sections(image) if s.name == ".nv_fatbin"), None)
    if fatbin is None:
        return
    data = image[fatbin.offset : fatbin.offset + fatbin.size]
    pos = 0
    while pos + 16 <= len(data):
        magic, _, header_size, body_size = struct.unpack_from("<IHHQ", data, pos)
        if magic != FATBIN_MAGIC:
            pos += 8  # containers are 8-byte aligned
            continue
        entry, end = pos + header_size, pos + header_size + body_size
        while entry < end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            entry_arch, name_offset, name_size = struct.unpack_from("<III", data, entry + 28)
            (flags,) = struct.unpack_from("<Q", data, entry + 40)
            if kind == FATBIN_ELF and entry_arch == arch:
                if flags & FATBIN_COMPRESSED:
                    raise RuntimeError(
                        f"{so}: compressed fatbin entries are not supported (build without -Xfatbin -compress-all)"
                    )
                name = data[entry + name_offset : entry + name_offset + name_size].split(b"\0")[0].decode()
                start = entry + entry_header
                yield name, data[start : start + payload]
            entry += entry_header + payload
        pos = end


def cubin_kernels(cubin: bytes) -> Iterator[tuple[str, dict[str, int]]]:
    """(mangled name, resources) of every kernel (.text.<name> section) of a cubin."""
    sections = elf_sections(cubin)
    per_symbol: dict[int, dict[int, int]] = {}  # .nv.info: attribute -> value, by symbol index
    for section in sections:
        if section.name == ".nv.info":
            for attr, value in nv_info(cubin[section.offset : section.offset + section.size]):
                if len(value) == 8:
                    symbol, number = struct.unpack("<II", value)
                    per_symbol.setdefault(symbol, {})[attr] = number
    symtab = next(s for s in sections if s.name == ".symtab")
    strtab = next(s for s in sections if s.name == ".strtab")
    symbols = {}  # function name -> symbol index
    for i in range(symtab.size // 24):
        name_offset, info = struct.unpack_from("<IB", cubin, symtab.offset + 24 * i)
        if info & 0xF == 2:  # STT_FUNC
            start = strtab.offset + name_offset
            symbols[cubin[start : cubin.index(b"\0", start)].decode()] = i
    for section in sections:
        if not section.name.startswith(".text."):
            continue
        name = section.name[len(".text.") :]
        own: dict[int, bytes] = {}
        info = next((s for s in sections if s.name == f".nv.info.{name}"), None)
        if info is not None:
            own = dict(nv_info(cubin[info.offset : info.offset + info.size]))
        shared = next((s.size for s in sections if s.name == f".nv.shared.{name}"), 0)
        attrs = per_symbol.get(symbols.get(name, -1), {})
        yield (
            name,
            {
                "registers": attrs.get(EIATTR_REGCOUNT, 0),
                "register_cap": int.from_bytes(own.get(EIATTR_MAXREG_COUNT, b"\0\0"), "little"),
                "stack_frame_bytes": attrs.get(EIATTR_FRAME_SIZE, 0),
                "stack_bytes": attrs.get(EIATTR_MIN_STACK_SIZE, 0),
                "shared_bytes": max(shared - RESERVED_SHARED, 0),
                "max_threads": int.from_bytes(own.get(EIATTR_MAX_THREADS, b"\0\0\0\0")[:4], "little"),
                "param_bytes": int.from_bytes(own.get(EIATTR_CBANK_PARAM_SIZE, b"\0\0"), "little"),
                "barriers": own.get(EIATTR_NUM_BARRIERS, b"\0")[0],
            },
        )


def demangle(names: list[str]) -> list[str]:
    """The names as c++filt prints them (unchanged without c++filt)."""
    if not names or shutil.which("c++filt") is None:
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def short_name(demangled: str) -> str:
    """`namespace::kernel<template args>` without the return type, the parameter list and kdfast's
    namespaces."""
    name = demangled.removeprefix("void ")
    depth, cut = 0, len(name)
    for i in range(len(name) - 1, -1, -1):  # the '(' that opens the parameter list: the last one at depth 0
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0 and name[i] == "(":
            cut = i
            break
    return name[:cut].replace("(anonymous namespace)::", "").replace("kdfast::", "")


def read_kernels(so: Path, arch: int = 90) -> list[Kernel]:
    """Every kernel instantiation of the .so for sm_<arch>, sorted by file and name."""
    found = [(Path(file).name, name, res) for file, cubin in fatbin_cubins(so, arch) for name, res in cubin_kernels(cubin)]
    names = [short_name(n) for n in demangle([name for _, name, _ in found])]
    kernels = [
        Kernel(file, name, "float64" if "double" in name else "reduced", **res)
        for (file, _, res), name in zip(found, names, strict=True)
    ]
    return sorted(kernels, key=lambda k: (k.file, k.kernel))


def spill_failures(kernels: list[Kernel]) -> list[str]:
    """The reduced-precision instantiations that use a stack (spills, local arrays, calls)."""
    return [
        f"{k.file}: {k.kernel}: {k.stack_frame_bytes} bytes stack frame, {k.stack_bytes} bytes stack ({k.registers} registers)"
        for k in kernels
        if k.dtype == "reduced" and k.stack_bytes > 0
    ]


def extension_path() -> Path:
    """The built kdfast._C, found without importing it (no torch import needed)."""
    found = sorted((ROOT / "kdfast").glob("_C.*.so"))
    if not found:
        raise FileNotFoundError(f"no kdfast/_C*.so under {ROOT}: build the extension first (make .venv/.built)")
    return found[0]


def write_csv(kernels: list[Kernel], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(k.row() for k in kernels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--so", type=Path, help="the extension (default: kdfast/_C*.so of this tree)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90)")
    parser.add_argument("--out", type=Path, help=f"CSV to write (default for sm_90: {DEFAULT_OUT.relative_to(ROOT)})")
    parser.add_argument("--check", action="store_true", help="exit 1 on a stack in a reduced instantiation")
    args = parser.parse_args(argv)
    kernels = read_kernels(args.so or extension_path(), args.arch)
    if not kernels:
        print(f"no sm_{args.arch} kernels in the extension (built without CUDA?)", file=sys.stderr)
        return 1
    out = args.out or DEFAULT_OUT.with_name(f"cuda-resources-sm{args.arch}.csv")
    write_csv(kernels, out)
    print(f"{len(kernels)} kernel instantiations of {len({k.file for k in kernels})} files -> {out}")
    failures = spill_failures(kernels)
    for failure in failures:
        print(f"SPILL {failure}", file=sys.stderr)
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())
