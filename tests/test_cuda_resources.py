"""The resource table of the CUDA kernels (benchmarks/cuda_resources.py), read from the cubins of the
built kdfast._C: every csrc/cuda/*.cu file has kernels for sm_90, no float32/bfloat16/float16
instantiation uses a stack (spills, local arrays or calls), and the committed table
benchmarks/results/cuda-resources-sm90.csv is the one this build gives. Skipped when the extension
was built without CUDA kernels. About 2 s; no GPU, no recompilation."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from benchmarks import cuda_resources

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def kernels() -> list[cuda_resources.Kernel]:
    try:
        so = cuda_resources.extension_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    found = cuda_resources.read_kernels(so, 90)
    if not found:
        pytest.skip("kdfast._C has no sm_90 CUDA kernels (built without CUDA)")
    return found


def test_every_cuda_file_has_sm90_kernels(kernels):
    files = {k.file for k in kernels}
    expected = {p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu")}
    assert files == expected
    assert all(k.registers > 0 for k in kernels), "a kernel read without its register count"


def test_no_stack_in_reduced_precision_kernels(kernels):
    assert cuda_resources.spill_failures(kernels) == []


def test_resource_table_is_current(kernels, tmp_path):
    """The committed CSV is what `python -m benchmarks.cuda_resources` writes for this build:
    regenerate it after changing a kernel."""
    committed = cuda_resources.DEFAULT_OUT
    fresh = tmp_path / committed.name
    cuda_resources.write_csv(kernels, fresh)
    with committed.open() as f:
        old = list(csv.DictReader(f))
    with fresh.open() as f:
        new = list(csv.DictReader(f))
    changed = [row for row in new if row not in old] + [row for row in old if row not in new]
    assert not changed, (
        f"{len(changed)} rows differ from {committed.relative_to(ROOT)} (first: {changed[0]}): "
        "run `python -m benchmarks.cuda_resources` and commit the table"
    )


def test_reader_on_a_known_cubin_layout():
    """The .nv.info parser on a hand-made section: a REGCOUNT and a FRAME_SIZE entry (format 0x04,
    symbol index and value) and a MAXREG_COUNT entry (format 0x03, a u16)."""
    section = (
        bytes([0x04, cuda_resources.EIATTR_REGCOUNT, 8, 0])
        + (7).to_bytes(4, "little")
        + (40).to_bytes(4, "little")
        + bytes([0x04, cuda_resources.EIATTR_FRAME_SIZE, 8, 0])
        + (7).to_bytes(4, "little")
        + (16).to_bytes(4, "little")
        + bytes([0x03, cuda_resources.EIATTR_MAXREG_COUNT])
        + (128).to_bytes(2, "little")
    )
    entries = list(cuda_resources.nv_info(section))
    assert [a for a, _ in entries] == [
        cuda_resources.EIATTR_REGCOUNT,
        cuda_resources.EIATTR_FRAME_SIZE,
        cuda_resources.EIATTR_MAXREG_COUNT,
    ]
    assert int.from_bytes(entries[0][1][4:], "little") == 40 and int.from_bytes(entries[2][1], "little") == 128


def test_short_names():
    demangled = (
        "void kdfast::(anonymous namespace)::forward_kernel<float, c10::Half>(kdfast::(anonymous "
        "namespace)::Args<float, c10::Half>, float*, float*)"
    )
    assert cuda_resources.short_name(demangled) == "forward_kernel<float, c10::Half>"
