"""SoKD, student-oriented KD, as a wrapper around FitNet, AT or LCC (see :mod:`.distiller`):
DAFA, the teacher's learnable feature augmentation (:mod:`.dafa`), DAM, the area of mutual
interest (:mod:`.dam`), and the per-base feature losses (:mod:`.bases`)."""

from kdfast.distillers.sokd.distiller import SoKD, SoKDParams

__all__ = ["SoKD", "SoKDParams"]
