"""The ground floor of kdfast's numerics: what the eager references (kdfast/reference, the
tests' oracle) and the production path (kdfast/eager, kdfast/ops, kdfast/functional, the
distillers) must compute alike: the dtype rule (:func:`kdfast.numerics.common.compute_dtype`), eps,
spatial alignment, the option lists and the pre-/post-processing around the kernels, one module per
op. It imports nothing else of kdfast; both sides import it, and the production path imports it
instead of the references.
"""
