"""The ground floor of kdfast's numerics: what the eager references (kdfast/reference) and the
fused path (kdfast/ops, kdfast/functional, the distillers) must compute alike: the dtype rule
(:func:`kdfast.numerics.common.compute_dtype`), eps, spatial alignment, the option lists and the
pre-/post-processing around the kernels, one module per op. It imports nothing else of kdfast;
kdfast/reference imports it, never the other way round, and the fused path imports it instead of
the references.
"""
