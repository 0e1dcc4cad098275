"""Backend "torch": the eager PyTorch implementation of every op (autograd through torch's ops).

Each ``kdfast/eager/<op>.py`` computes what ``kdfast/ops/<op>.py``'s "torch" branch returns, in the
op's compute dtype (float64 stays float64, everything else float32: :mod:`kdfast.numerics.common`).
It is production code, written apart from the tests' oracle (``kdfast/reference``), which it never
imports: the tests check this backend against that oracle like every other one.
"""
