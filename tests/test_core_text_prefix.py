"""Shared prompt openings are computed once and the features do not change: zsclip.core.text_prefix against
CLIP.encode_text on the same tokens, for the prompt sets classify builds and for awkward ones."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from zsclip.core.model import build_model
from zsclip.core.presets import get_preset
from zsclip.core.text_prefix import encode_with_shared_prefixes, plan_prefixes, suffix_packs
from zsclip.train.bpe import train_bpe

CAPTIONS = [
    "a photo of a corgi",
    "a photo of the large hot dog",
    "a photo of the small hot air balloon",
    "itap of a jazz album",
    "a bad photo of the red circle",
    "art of the blue square in a video game",
    "a origami green triangle",
    "the cat sat on the mat near the window in the evening light",
]
TEMPLATES = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]
LABELS = [
    "corgi",
    "hot dog",
    "hot air balloon",
    "jazz album",
    "red circle",
    "blue square",
    "cat",
    "mat",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(CAPTIONS * 3, vocab_size=600)


def tiny_model(context_length: int = 77):
    torch.manual_seed(0)
    config = get_preset("tiny")
    config = dataclasses.replace(
        config, text=dataclasses.replace(config.text, vocab_size=640, context_length=context_length)
    )
    model = build_model(config).eval()
    with torch.no_grad():  # perturb everything so no layer is an identity at initialisation
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


def reference(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat(
            [model.encode_text(row[None]) for row in tokens]
        )  # one text at a time: [N, D]


def shared(model, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.inference_mode():
        return encode_with_shared_prefixes(model, tokens, **kwargs)


def test_classifier_prompts_match_encode_text(tokenizer) -> None:
    model = tiny_model()
    prompts = [template.format(label) for label in LABELS for template in TEMPLATES]
    tokens = tokenizer(prompts, context_length=77)
    for budget in (8192, 7):  # one pass, and many small ones
        assert (
            shared(model, tokens, token_budget=budget) - reference(model, tokens)
        ).abs().max() < 1e-5


def test_duplicates_prefixes_of_each_other_and_lone_texts_match(tokenizer) -> None:
    model = tiny_model()
    texts = [
        "a photo",
        "a photo of a corgi",
        "a photo of a corgi",
        "a photo of a",
        "cat",
        "a photo of the large",
        "the cat sat on the mat",
        "a photo of the large hot dog",
    ]
    tokens = tokenizer(texts, context_length=77)
    got = shared(model, tokens)
    assert torch.equal(got[1], got[2])  # identical texts, computed once
    assert (got - reference(model, tokens)).abs().max() < 1e-5
    single = tokenizer(["a photo of a corgi"], context_length=77)
    assert (shared(model, single) - reference(model, single)).abs().max() < 1e-5


def test_texts_cut_at_the_context_length_match(tokenizer) -> None:
    """Positions run to the end of a short context, and cut texts keep their end token last."""
    model = tiny_model(context_length=9)
    texts = [
        "the cat sat on the mat near the window in the evening light",
        "the cat sat on the mat near the red circle",
        "the cat sat on a mat",
        "the cat",
    ]
    tokens = tokenizer(texts, context_length=9)
    assert (shared(model, tokens) - reference(model, tokens)).abs().max() < 1e-5


def test_bf16_autocast_stays_close(tokenizer) -> None:
    model = tiny_model()
    tokens = tokenizer(
        [template.format(label) for label in LABELS[:3] for template in TEMPLATES],
        context_length=77,
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = shared(model, tokens)
    assert torch.nn.functional.cosine_similarity(got, reference(model, tokens)).min() > 0.99


def test_each_template_opening_is_computed_once(tokenizer) -> None:
    prompts = [template.format(label) for label in LABELS for template in TEMPLATES]
    rows = [tuple(row) for row in tokenizer.token_lists(prompts, 77)]
    plan = plan_prefixes(rows)
    total = sum(map(len, rows))
    computed = sum(len(seq) - start for seq, start in zip(plan.sequences, plan.prefix_length))
    assert computed < 0.6 * total  # the openings go through the tower once, not once per label
    opening = tuple(
        tokenizer.token_lists(["a photo of the large"], 77)[0][:-1]
    )  # start token + the words
    large = [i for i, seq in enumerate(plan.sequences) if seq[: len(opening)] == opening]
    assert len(large) == len(LABELS)
    assert all(plan.prefix_length[i] >= len(opening) for i in large)
    for seq, start, owner in zip(plan.sequences, plan.prefix_length, plan.prefix_of):
        assert start < len(seq)  # the end token is always in the computed part
        assert (owner < 0) == (start == 0)
        if owner >= 0:
            assert seq[:start] == plan.prefixes[owner]


def test_the_prefix_budget_limits_memory_and_keeps_results(tokenizer) -> None:
    model = tiny_model()
    prompts = [template.format(label) for label in LABELS for template in TEMPLATES]
    tokens = tokenizer(prompts, context_length=77)
    rows = [tuple(row) for row in tokenizer.token_lists(prompts, 77)]
    small = plan_prefixes(rows, budget=12)
    assert small.prefixes and len(small.prefixes) * max(map(len, small.prefixes)) <= 12
    assert len(small.prefixes) < len(plan_prefixes(rows).prefixes)
    assert (shared(model, tokens, prefix_budget=12) - reference(model, tokens)).abs().max() < 1e-5


def test_suffix_packs_cover_everything_once_unpadded_within_the_budget() -> None:
    lengths = [3] * 300 + [4] * 20 + [9] * 3 + [5] + [40]
    packs = suffix_packs(lengths, token_budget=128)
    members = [i for pack in packs for segment in pack for i in segment]
    assert sorted(members) == list(range(len(lengths)))
    for pack in packs:
        assert all(len({lengths[i] for i in segment}) == 1 for segment in pack)  # nothing to pad
        tokens = sum(lengths[i] for segment in pack for i in segment)
        assert tokens <= 128 or (
            len(pack) == 1 and len(pack[0]) == 1
        )  # only a lone long text may exceed it
    assert len(suffix_packs([3] * 300, token_budget=8192)) == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_the_cpu(tokenizer) -> None:
    model = tiny_model()
    tokens = tokenizer(
        [template.format(label) for label in LABELS for template in TEMPLATES], context_length=77
    )
    cpu = shared(model, tokens)
    gpu = shared(model.cuda(), tokens)
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs().max() < 1e-4
    with torch.autocast("cuda", dtype=torch.float16):
        half = shared(model, tokens)
    assert torch.nn.functional.cosine_similarity(half.float().cpu(), cpu).min() > 0.99
