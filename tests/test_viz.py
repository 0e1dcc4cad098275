"""The viewer (kdfast.engine.viz) and the training curves (kdfast.engine.metrics.plot_curves)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from kdfast.distillers import Distiller, Params
from kdfast.engine.metrics import loss_keys, plot_curves
from kdfast.engine.viz import draw_maps, inspect_grid
from kdfast.models import Features

PNG = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.usefixtures("one_thread")


class MatrixDistiller(Distiller):
    """A method whose inspect returns AFD-like (N, T, S) attention weights next to a spatial map."""

    @torch.no_grad()
    def inspect(self, images: Tensor, labels: Tensor, teacher: Features | None) -> dict[str, Tensor]:
        n = len(images)
        weights = torch.softmax(torch.randn(n, 3, 4), dim=2)
        return {"attention weights (t x s)": weights, "student stage 3": self.student.features(images).stages[3].pow(2).mean(1)}


def test_draw_maps_spatial_and_matrices(tmp_path):
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    maps = {"map 8x8": torch.rand(2, 8, 8), "blocks 4x4": torch.rand(2, 4, 4), "matrix 27x9": torch.rand(2, 27, 9)}
    out = draw_maps(images, labels, maps, tmp_path / "sub" / "maps.png")
    assert out.read_bytes()[:8] == PNG


@pytest.mark.parametrize("shape", [(2, 4), (3, 4, 4), (2, 1, 4, 4)])
def test_draw_maps_rejects_bad_shapes(tmp_path, shape):
    with pytest.raises(ValueError, match=r"must have shape \(N, h, w\) with N = 2"):
        draw_maps(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), {"bad": torch.rand(*shape)}, tmp_path / "x.png")


def test_inspect_grid_draws_matrix_maps(pair, tmp_path):
    teacher, student, x, y, _ = pair
    out = inspect_grid(MatrixDistiller(student, teacher, Params()), teacher, x[:3], y[:3], tmp_path / "m.png")
    assert out.read_bytes()[:8] == PNG


def test_inspect_grid_default_is_attention_of_both(pair, tmp_path):
    teacher, student, x, y, feats = pair
    d = Distiller(student, teacher, Params())
    maps = d.inspect(x, y, feats)
    assert list(maps) == [f"{net} stage {s}" for net in ("teacher", "student") for s in (1, 2, 3)]
    assert inspect_grid(d, teacher, x[:2], y[:2], tmp_path / "a.png").read_bytes()[:8] == PNG


def test_plot_curves_draws_every_logged_loss(tmp_path):
    rows = [
        {
            "epoch": e,
            "lr": 0.1,
            "loss": 3.0 / e,
            "loss.ce": 1.0 / e,
            "loss.aft_stage1": 0.5 / e,
            "loss.aft_stage2": 0.7 / e,
            "train.top1": 10.0 * e,
            "test.top1": 9.0 * e,
        }
        for e in (1, 2, 3)
    ]
    rows[2]["loss.module3"] = 0.2  # a loss logged from a later epoch only
    assert loss_keys(rows) == ["loss", "loss.aft_stage1", "loss.aft_stage2", "loss.ce", "loss.module3"]
    plot_curves(rows, tmp_path / "curves.png", "aft: resnet8")
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG
