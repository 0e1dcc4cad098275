"""Distillers: registry, parameters, each method's losses against the eager references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _distill import assert_gradients_reach_student_only
from torch import nn

from kdfast import distillers, models
from kdfast.distillers.dkd import DKDParams
from kdfast.distillers.fitnet import ConvReg, FitNet
from kdfast.reference import at as ref_at
from kdfast.reference import dkd as ref_dkd
from kdfast.reference import kd as ref_kd

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_names_and_errors():
    assert {"vanilla", "kd", "dkd", "at", "fitnet"} <= set(distillers.names())
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        distillers.get("nope")
    with pytest.raises(ValueError, match="unknown key.*tau.*valid keys: ce_weight, kd_weight, temperature"):
        distillers.make_params("kd", {"tau": 2})
    params = distillers.make_params("dkd", {})
    assert isinstance(params, DKDParams) and params.beta == 8.0


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
    assert_gradients_reach_student_only(d, losses, teacher)


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
    assert isinstance(d, FitNet)
    conv = d.connector.conv
    assert isinstance(conv, nn.Conv2d)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (32, 128, (1, 1))
    assert any(name.startswith("connector.") for name, _ in d.named_parameters())


# The peers' ConvReg cases (student map (Cs, Hs, Ws) -> teacher map (Ct, Ht, Wt)): conv type, kernel, stride, padding.
CONVREG_CASES = [
    ((16, 32, 32), (32, 16, 16), nn.Conv2d, (3, 3), (2, 2), (1, 1)),  # student twice the teacher's size
    ((480, 8, 8), (128, 16, 16), nn.ConvTranspose2d, (4, 4), (2, 2), (1, 1)),  # half: resnet32x4 -> ShuffleV1, hint 2
    ((32, 8, 8), (128, 8, 8), nn.Conv2d, (1, 1), (1, 1), (0, 0)),  # same size: resnet32x4 -> resnet8x4
    ((16, 10, 9), (64, 8, 8), nn.Conv2d, (3, 2), (1, 1), (0, 0)),  # larger: (1 + Hs - Ht) x (1 + Ws - Wt)
]


@pytest.mark.parametrize("s_shape, t_shape, conv_type, kernel, stride, padding", CONVREG_CASES)
def test_convreg_branches_match_the_peers(s_shape, t_shape, conv_type, kernel, stride, padding):
    reg = ConvReg(s_shape, t_shape)
    assert type(reg.conv) is conv_type and reg.conv.bias is not None
    assert (reg.conv.in_channels, reg.conv.out_channels) == (s_shape[0], t_shape[0])
    assert (reg.conv.kernel_size, reg.conv.stride, reg.conv.padding) == (kernel, stride, padding)
    x = torch.randn(2, *s_shape)
    out = reg(x)
    assert out.shape == (2, *t_shape) and (out >= 0).all()
    # the peers' key layout (their ConvReg: conv, bn, relu) loads strictly and gives relu(bn(conv(x)))
    gen = torch.Generator().manual_seed(0)
    peer = {
        k: torch.rand(v.shape, generator=gen) + 0.5 if v.is_floating_point() else v.clone() for k, v in reg.state_dict().items()
    }
    assert set(peer) == {
        "conv.weight",
        "conv.bias",
        *(f"bn.{b}" for b in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")),
    }
    reg.load_state_dict(peer, strict=True)
    reg.eval()
    conv = F.conv_transpose2d if conv_type is nn.ConvTranspose2d else F.conv2d
    expected = F.relu(
        F.batch_norm(
            conv(x, peer["conv.weight"], peer["conv.bias"], stride, padding),
            peer["bn.running_mean"],
            peer["bn.running_var"],
            peer["bn.weight"],
            peer["bn.bias"],
        )
    )
    torch.testing.assert_close(reg(x), expected)


def test_convreg_refuses_a_smaller_student_map_of_no_peer_case():
    with pytest.raises(ValueError, match=r"no ConvReg from a student map \(16, 6, 6\) to a teacher map \(32, 8, 8\)"):
        ConvReg((16, 6, 6), (32, 8, 8))


@pytest.mark.parametrize(
    "teacher, student", [("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"), ("wrn_40_2", "ShuffleV1")]
)
def test_fitnet_builds_for_the_cross_architecture_pairs(teacher, student):
    t = models.create(teacher).eval()
    d = distillers.create("fitnet", models.create(student), t)
    assert isinstance(d, FitNet) and type(d.connector.conv) is nn.ConvTranspose2d
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, losses = d(x, torch.tensor([1, 2]), t.features(x), 1)
    assert torch.isfinite(losses["fitnet"])
