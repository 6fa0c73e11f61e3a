"""--accum-steps: K micro-batches of B give the loss and gradients of one K * B batch (feature caching)."""

from __future__ import annotations

import copy

import pytest
import torch

from zsclip.core.model import build_model
from zsclip.core.presets import get_preset
from zsclip.train.accumulate import contrastive_backward
from zsclip.train.distributed import Towers, World
from zsclip.train.loss import clip_loss


def make_batch(n: int, config, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n random images and token rows (start, words, end = the largest id, zero padding)."""
    gen = torch.Generator().manual_seed(seed)
    size = config.vision.image_size
    images = torch.randn(n, 3, size, size, generator=gen)
    tokens = torch.zeros(n, config.text.context_length, dtype=torch.long)
    eot = config.text.vocab_size - 1
    for i in range(n):
        length = int(torch.randint(2, 12, (1,), generator=gen))
        tokens[i, 0] = eot - 1
        tokens[i, 1:length] = torch.randint(1, 500, (length - 1,), generator=gen)
        tokens[i, length] = eot
    return images, tokens


def tiny_model(preset: str = "tiny", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(get_preset(preset)).train()


def reference(model, images, tokens) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of one plain batch."""
    model.zero_grad(set_to_none=True)
    loss = clip_loss(model.encode_image(images), model.encode_text(tokens), model.logit_scale)
    loss.backward()
    return loss.item(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


def accumulated(model, images, tokens, k: int) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    micro = list(zip(images.chunk(k), tokens.chunk(k)))
    loss = contrastive_backward(Towers(model), micro, model.logit_scale, World())
    return loss.item(), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


def assert_same_grads(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(
            got[name], want[name], atol=atol, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_accum_4_of_8_equals_batch_32() -> None:
    model = tiny_model()
    images, tokens = make_batch(32, model.config)
    want_loss, want = reference(model, images, tokens)
    got_loss, got = accumulated(model, images, tokens, k=4)
    assert got_loss == pytest.approx(want_loss, abs=1e-5)
    assert "logit_scale" in got  # counted once, not four times
    assert_same_grads(got, want)


def test_one_micro_batch_is_the_plain_loss() -> None:
    model = tiny_model()
    images, tokens = make_batch(8, model.config, seed=1)
    want_loss, want = reference(model, images, tokens)
    got_loss, got = accumulated(model, images, tokens, k=1)
    assert got_loss == pytest.approx(want_loss, abs=1e-6)
    assert_same_grads(got, want)


def test_batchnorm_running_stats_updated_once_per_micro_batch() -> None:
    model = tiny_model("tiny-resnet")
    images, tokens = make_batch(8, model.config, seed=2)
    expected = copy.deepcopy(model)
    with torch.no_grad():
        for chunk in images.chunk(2):
            expected.encode_image(chunk)  # what one forward per micro-batch does to the statistics
    accumulated(model, images, tokens, k=2)
    for (name, got), (_, want) in zip(model.named_buffers(), expected.named_buffers()):
        torch.testing.assert_close(got, want, msg=lambda m, n=name: f"{n}: {m}")


def test_non_finite_loss_skips_backward() -> None:
    model = tiny_model()
    images, tokens = make_batch(8, model.config, seed=3)
    images[0, 0, 0, 0] = float("nan")
    model.zero_grad(set_to_none=True)
    loss = contrastive_backward(
        Towers(model), list(zip(images.chunk(2), tokens.chunk(2))), model.logit_scale, World()
    )
    assert not torch.isfinite(loss)
    assert all(p.grad is None for p in model.parameters())


def test_unequal_micro_batches_refused() -> None:
    model = tiny_model()
    images, tokens = make_batch(6, model.config)
    with pytest.raises(ValueError, match="same size"):
        contrastive_backward(
            Towers(model),
            [(images[:4], tokens[:4]), (images[4:], tokens[4:])],
            model.logit_scale,
            World(),
        )
