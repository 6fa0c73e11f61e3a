"""The model registry: every preset builds and round-trips; sizes and behaviours the paper fixes."""

from __future__ import annotations

import math

import pytest
import torch

from zsclip.core.checkpoints import load_model, save_checkpoint
from zsclip.core.model import QuickGELU, build_model, count_parameters
from zsclip.core.presets import PRESETS, CLIPConfig, get_preset
from zsclip.core.transform import PreprocessConfig
from zsclip.train.bpe import train_bpe

# Presets small enough to run for real on 2 CPU cores; the published ones are checked on the meta device.
SMALL = {"tiny", "tiny-resnet", "small", "small-resnet"}

# Published parameter counts (OpenAI's models, logit_scale included).
PUBLISHED = {"ViT-B/32": 151_277_313, "RN50": 102_007_137}


def _inputs(config: CLIPConfig, batch: int = 2):
    gen = torch.Generator().manual_seed(0)
    size = config.vision.image_size
    images = torch.randn(batch, 3, size, size, generator=gen)
    tokens = torch.zeros(batch, config.text.context_length, dtype=torch.long)
    tokens[:, 0] = config.text.vocab_size - 2  # start
    tokens[:, 1:4] = torch.randint(1, config.text.vocab_size - 2, (batch, 3), generator=gen)
    tokens[0, 4] = tokens[1, 3] = config.text.vocab_size - 1  # end tokens at different positions
    return images, tokens


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_builds_and_round_trips(name, tmp_path):
    config = get_preset(name)
    assert CLIPConfig.from_dict(config.to_dict()) == config
    if name not in SMALL:
        with torch.device("meta"):
            model = build_model(config)
            rebuilt = build_model(CLIPConfig.from_dict(config.to_dict()))
        shapes = {k: v.shape for k, v in model.state_dict().items()}
        assert shapes == {k: v.shape for k, v in rebuilt.state_dict().items()}
        assert config.quick_gelu, "OpenAI's architectures run with QuickGELU"
        if name in PUBLISHED:
            assert count_parameters(model) == PUBLISHED[name]
        return
    tokenizer = train_bpe(["a red circle", "two blue squares"] * 4, vocab_size=540)
    config.text.vocab_size = tokenizer.vocab_size
    model = build_model(config).eval()
    images, tokens = _inputs(config)
    with torch.no_grad():
        logits_per_image, logits_per_text = model(images, tokens)
    assert logits_per_image.shape == (2, 2) and torch.isfinite(logits_per_image).all()
    assert torch.equal(logits_per_text, logits_per_image.t())
    path = tmp_path / "m.safetensors"
    save_checkpoint(
        path,
        model,
        preprocess=PreprocessConfig(image_size=config.vision.image_size),
        tokenizer=tokenizer,
    )
    loaded = load_model(path).model
    with torch.no_grad():
        assert torch.equal(loaded(images, tokens)[0], logits_per_image)


def test_logit_scale_starts_at_paper_temperature_and_is_capped():
    model = build_model(get_preset("tiny")).eval()
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    images, tokens = _inputs(model.config)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) would be 22026
        logits, _ = model(images, tokens)
    assert logits.abs().max() <= 100.0 + 1e-4


def test_text_feature_is_read_at_the_end_token_and_padding_does_not_matter():
    model = build_model(get_preset("tiny")).eval()
    _, tokens = _inputs(model.config)
    with torch.no_grad():
        together = model.encode_text(tokens)
        alone = torch.cat([model.encode_text(tokens[i : i + 1]) for i in range(2)])
        changed = tokens.clone()
        changed[0, 1] += 1  # a token before the end changes the feature
        after = tokens.clone()
        after[1, 10] = 7  # a token after the end does not
        assert not torch.allclose(model.encode_text(changed)[0], together[0])
        torch.testing.assert_close(model.encode_text(after), together)
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-5)


def test_activation_follows_config():
    openai = build_model(get_preset("tiny"))
    assert isinstance(openai.transformer.resblocks[0].mlp.gelu, QuickGELU)
    config = get_preset("tiny")
    config.quick_gelu = False
    assert isinstance(build_model(config).transformer.resblocks[0].mlp.gelu, torch.nn.GELU)


def test_preset_names_accept_both_spellings():
    assert get_preset("ViT-B-32") == get_preset("ViT-B/32") == get_preset("vit-b/32")
    with pytest.raises(KeyError):
        get_preset("ViT-Z/99")
