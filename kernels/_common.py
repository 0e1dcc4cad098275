"""Host helpers shared by every Triton op module: dtype tables and the launch device context."""

import contextlib
import functools

import torch
import triton.language as tl

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


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
