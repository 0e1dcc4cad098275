"""Distillers: registry, parameters, each method's losses against the eager references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdfast import distillers, models
from kdfast.reference import at as ref_at, dkd as ref_dkd, kd as ref_kd


pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_names_and_errors():
    assert {"vanilla", "kd", "dkd", "at", "fitnet"} <= set(distillers.names())
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        distillers.get("nope")
    with pytest.raises(ValueError, match="unknown key.*tau.*valid keys: ce_weight, kd_weight, temperature"):
        distillers.make_params("kd", {"tau": 2})
    assert distillers.make_params("dkd", {}).beta == 8.0


def test_needs_teacher():
    with pytest.raises(ValueError, match="needs a teacher"):
        distillers.create("kd", models.create("resnet8", 10), None)


@pytest.mark.parametrize("method", ["vanilla", "kd", "dkd", "at", "fitnet"])
def test_losses_and_gradients(pair, method):
    teacher, student, x, y, feats = pair
    d = distillers.create(method, student, teacher if method != "vanilla" else None)
    logits, losses = d(x, y, feats if method != "vanilla" else None, 5)
    assert logits.shape == (x.shape[0], 10)
    assert "ce" in losses and all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    assert len(losses) == (1 if method == "vanilla" else 2)
    d.zero_grad()
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in d.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_kd_matches_reference(pair):
    teacher, student, x, y, feats = pair
    _, losses = distillers.create("kd", student, teacher)(x, y, feats, 1)
    s = student.features(x)
    torch.testing.assert_close(losses["ce"], 0.1 * F.cross_entropy(s.logits, y))
    torch.testing.assert_close(losses["kd"], 0.9 * ref_kd.kd_loss(s.logits, feats.logits.clone(), 4.0), rtol=1e-4, atol=1e-6)


def test_dkd_warmup_ramp(pair):
    teacher, student, x, y, feats = pair
    d = distillers.create("dkd", student, teacher, {"warmup": 20})
    full = ref_dkd.dkd_loss(student(x), feats.logits.clone(), y, 1.0, 8.0, 4.0)
    torch.testing.assert_close(d(x, y, feats, 5)[1]["dkd"], 0.25 * full, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(d(x, y, feats, 40)[1]["dkd"], full, rtol=1e-4, atol=1e-6)


def test_at_uses_stages_after_stem(pair):
    teacher, student, x, y, feats = pair
    _, losses = distillers.create("at", student, teacher)(x, y, feats, 1)
    expected = 1000 * ref_at.at_stage_losses(student.features(x).stages[1:], [f.clone() for f in feats.stages[1:]]).sum()
    torch.testing.assert_close(losses["at"], expected, rtol=1e-4, atol=1e-6)


def test_fitnet_connector_maps_to_teacher_channels():
    teacher = models.create("resnet8x4", 10).eval()
    student = models.create("resnet8", 10)
    d = distillers.create("fitnet", student, teacher)
    conv = d.connector[0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (32, 128, (1, 1))
    assert any(name.startswith("connector.") for name, _ in d.named_parameters())
