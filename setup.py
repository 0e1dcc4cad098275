"""Build of kdfast and its extension kdfast._C (torch cpp_extension + ninja).

* C++ CPU kernels (csrc/kdfast.cpp, csrc/cpu/*.cpp) are always built.
* CUDA kernels (csrc/cuda/*.cu) are built whenever torch is a CUDA build and nvcc is found, with or
  without a GPU; KDFAST_SKIP_CUDA=1 skips them. Without a visible GPU, TORCH_CUDA_ARCH_LIST
  defaults to "8.0;9.0" (A100, H100/H200).
* The Triton kernels (kernels/) are installed as the subpackage kdfast.kernels.
"""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path

import torch
from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def find_cuda_home() -> str | None:
    """The first CUDA toolkit (bin/nvcc and include/cuda_runtime.h) among $CUDA_HOME, $CUDA_PATH,
    /usr/local/cuda and the one that holds the nvcc on PATH."""
    nvcc = shutil.which("nvcc")
    candidates = [
        os.environ.get("CUDA_HOME"),
        os.environ.get("CUDA_PATH"),
        "/usr/local/cuda",
        str(Path(nvcc).resolve().parent.parent) if nvcc else None,
    ]
    for home in filter(None, candidates):
        if (Path(home) / "bin" / "nvcc").exists() and (Path(home) / "include" / "cuda_runtime.h").exists():
            return home
    return None


def wheel_cuda_includes() -> list[str]:
    """Headers shipped by torch's CUDA wheels (nvidia/cu*/include): cuBLAS & co. that the toolkit may lack."""
    site = Path(torch.__file__).resolve().parent.parent
    return sorted(str(p) for p in site.glob("nvidia/cu*/include") if p.is_dir())


def build_cuda() -> bool:
    if os.environ.get("KDFAST_SKIP_CUDA") == "1":
        print("kdfast: KDFAST_SKIP_CUDA=1, building the C++ CPU kernels only")
        return False
    if torch.version.cuda is None:
        print("kdfast: torch is a CPU build, building the C++ CPU kernels only")
        return False
    cuda_home = find_cuda_home()
    if cuda_home is None:
        print("kdfast: nvcc not found (set CUDA_HOME), building the C++ CPU kernels only")
        return False
    os.environ["CUDA_HOME"] = cuda_home
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    return True


WITH_CUDA = build_cuda()
# Imported after build_cuda(): torch.utils.cpp_extension reads CUDA_HOME when first imported.
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def extension():
    sources = ["csrc/kdfast.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # -fno-trapping-math: lets the loops with selects (clamps, smooth-L1) vectorise; no result changes
    cxx_flags = ["-O3", "-g0", "-fno-trapping-math"]
    if not WITH_CUDA:
        return CppExtension("kdfast._C", sources, extra_compile_args={"cxx": cxx_flags})
    return CUDAExtension(
        "kdfast._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=wheel_cuda_includes(),
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
    )


setup(
    packages=[*find_packages(include=["kdfast", "kdfast.*"]), "kdfast.kernels"],
    package_dir={"kdfast": "kdfast", "kdfast.kernels": "kernels"},
    package_data={"kdfast": ["configs/**/*.yaml"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
