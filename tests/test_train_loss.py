"""The contrastive loss, the temperature clamp, the lr schedule and AdamW's weight-decay groups."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from zsclip.train.loss import clamp_logit_scale, clip_labels, clip_logits, clip_loss, scale
from zsclip.train.schedule import BETAS, EPS, build_optimizer, decays, lr_at, param_groups


def _lse(*values: float) -> float:
    return math.log(sum(math.exp(v) for v in values))


def test_loss_matches_a_hand_computation_on_3x3():
    # Images are the unit axes; texts are e1, (e1 + e2)/sqrt(2), e3. Scale exp(0) = 1, so the similarity matrix
    # S[i][j] = image i . text j is  [[1, r, 0], [0, r, 0], [0, 0, 1]]  with r = 1/sqrt(2).
    r = 1 / math.sqrt(2)
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 0, 0], [r, r, 0], [0, 0, 1]])
    # image -> text: each row's cross-entropy against its diagonal entry
    rows = (_lse(1, r, 0) - 1) + (_lse(0, r, 0) - r) + (_lse(0, 0, 1) - 1)
    # text -> image: each column's
    cols = (_lse(1, 0, 0) - 1) + (_lse(r, r, 0) - r) + (_lse(0, 0, 1) - 1)
    expected = (rows / 3 + cols / 3) / 2
    loss = clip_loss(images, texts, torch.tensor(0.0))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.6671, abs=1e-4)  # worked out on paper: (0.6621 + 0.6722) / 2


def test_loss_is_symmetric_and_normalises_features():
    torch.manual_seed(0)
    a, b = torch.randn(5, 8), torch.randn(5, 8)
    s = torch.tensor(math.log(10))
    assert clip_loss(a, b, s).item() == pytest.approx(clip_loss(b, a, s).item(), abs=1e-6)
    assert clip_loss(3 * a, b, s).item() == pytest.approx(clip_loss(a, b, s).item(), abs=1e-6)


def test_logits_and_labels():
    img, txt = F.normalize(torch.randn(4, 6), dim=-1), F.normalize(torch.randn(4, 6), dim=-1)
    per_image, per_text = clip_logits(img, txt, torch.tensor(math.log(2.0)))
    assert per_image.shape == (4, 4)
    assert torch.allclose(per_image, 2 * img @ txt.t(), atol=1e-6)
    assert torch.equal(per_text, per_image.t())
    assert clip_labels(3, offset=6).tolist() == [6, 7, 8]


def test_scale_is_capped_at_100_and_parameter_clamped():
    assert scale(torch.tensor(10.0)).item() == pytest.approx(100.0)
    assert scale(torch.tensor(math.log(1 / 0.07))).item() == pytest.approx(1 / 0.07, rel=1e-5)
    p = torch.nn.Parameter(torch.tensor(7.0))
    clamp_logit_scale(p)
    assert p.item() == pytest.approx(math.log(100))
    p = torch.nn.Parameter(torch.tensor(-1.0))
    clamp_logit_scale(p)
    assert p.item() == 0.0


def test_perfect_alignment_gives_low_loss():
    feats = torch.eye(4)
    assert clip_loss(feats, feats, torch.tensor(math.log(100))).item() < 1e-3


def test_lr_warmup_then_cosine():
    base, warm, total = 1e-3, 10, 110
    assert lr_at(0, base, warm, total) == pytest.approx(base / 10)
    assert lr_at(9, base, warm, total) == pytest.approx(base)
    assert lr_at(10, base, warm, total) == pytest.approx(base)
    assert lr_at(60, base, warm, total) == pytest.approx(base / 2)
    assert lr_at(110, base, warm, total) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(500, base, warm, total) == pytest.approx(0.0, abs=1e-12)
    after = [lr_at(s, base, warm, total) for s in range(warm, total)]
    assert all(x >= y for x, y in zip(after, after[1:]))
    assert lr_at(0, base, 0, 10) == pytest.approx(base)


def test_weight_decay_groups_follow_the_paper():
    from zsclip.core.model import build_model
    from zsclip.core.presets import get_preset

    model = build_model(get_preset("tiny"))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, exempt = param_groups(model, 0.2)
    decayed_names = {names[id(p)] for p in decayed["params"]}
    exempt_names = {names[id(p)] for p in exempt["params"]}
    assert decayed["weight_decay"] == 0.2 and exempt["weight_decay"] == 0.0
    assert {
        "logit_scale",
        "positional_embedding",
        "visual.positional_embedding",
        "visual.class_embedding",
        "ln_final.weight",
        "ln_final.bias",
    } <= exempt_names
    assert "token_embedding.weight" in decayed_names and "text_projection" in decayed_names
    assert all("bias" not in n and ".ln_" not in n for n in decayed_names)
    assert len(decayed_names) + len(exempt_names) == len(list(model.parameters()))
    assert not decays("visual.positional_embedding", torch.nn.Parameter(torch.zeros(3, 3)))
    optimizer = build_optimizer(model, 1e-3, 0.1)
    assert optimizer.defaults["betas"] == BETAS == (0.9, 0.98)
    assert optimizer.defaults["eps"] == EPS == 1e-6
