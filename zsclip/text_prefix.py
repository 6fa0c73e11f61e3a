"""Text features for many prompts, with the prompts' shared beginnings computed once.

A zero-shot classifier embeds every label in every template: 100 labels x "a photo of the large {}." repeat the
same five opening tokens a hundred times. Under the text tower's causal mask a token's state, at every layer,
depends only on the tokens before it, so the keys and values of a shared opening are the same in every prompt
that starts with it. This module runs each shared opening (a "prefix") once, keeps its per-layer keys and
values, and runs only the rest of each prompt (its "suffix"), attending to the stored prefix as if it were
there. The result equals `CLIP.encode_text` up to float rounding (the tests hold it to 1e-5); typically a
third of the tokens go through the tower.

    features = encode_with_shared_prefixes(model, tokens)   # tokens [N, L] as the tokenizer pads them -> [N, D]

Which prefix a prompt gets: sorted lexicographically, a sequence shares the most tokens with one of its two
neighbours, so each prompt takes the longest prefix it has in common with any other prompt (never its last,
end-of-text token, whose state is the feature). Identical prompts are computed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from zsclip.model import CLIP

MIN_PREFIX = 2  # a prefix of the start token alone saves one token per prompt: not worth a gather per layer
PREFIX_BUDGET = 2048  # prefixes x longest prefix kept at once: ~100 MB of keys and values for ViT-B's text tower


@dataclass
class _Plan:
    """Distinct prompts split into a shared prefix (index into `prefixes`, or -1) and the suffix to compute."""

    sequences: list[tuple[int, ...]]  # distinct prompts, each up to and including its end token
    prefix_of: list[int]  # per sequence: index into prefixes, -1 = none
    prefix_length: list[int]  # per sequence: tokens taken from the prefix (0 when none)
    prefixes: list[tuple[int, ...]]


def _common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def plan_prefixes(sequences: Sequence[tuple[int, ...]], min_prefix: int = MIN_PREFIX,
                  budget: int = PREFIX_BUDGET) -> _Plan:
    """Split distinct token sequences into shared prefixes and suffixes (see the module docstring)."""
    ordered = sorted(set(sequences))
    shared = [0] * len(ordered)
    for i in range(1, len(ordered)):
        common = _common_length(ordered[i - 1], ordered[i])
        shared[i - 1] = max(shared[i - 1], common)
        shared[i] = max(shared[i], common)
    # the end token is always computed (its state is the feature), and short prefixes are not worth it
    wanted = [sequence[: min(common, len(sequence) - 1)] for sequence, common in zip(ordered, shared)]
    wanted = [prefix if len(prefix) >= min_prefix else () for prefix in wanted]
    kept = _within_budget(wanted, budget)
    index = {prefix: i for i, prefix in enumerate(kept)}
    prefix_of = [index.get(prefix, -1) for prefix in wanted]
    prefix_length = [len(prefix) if i >= 0 else 0 for prefix, i in zip(wanted, prefix_of)]
    return _Plan(ordered, prefix_of, prefix_length, kept)


def _within_budget(wanted: list[tuple[int, ...]], budget: int) -> list[tuple[int, ...]]:
    """The prefixes that save the most tokens, as many as fit `budget` (count x longest: their stored keys and
    values take count x longest x width x 2 x layers floats)."""
    users: dict[tuple[int, ...], int] = {}
    for prefix in wanted:
        if prefix:
            users[prefix] = users.get(prefix, 0) + 1
    kept: list[tuple[int, ...]] = []
    longest = 0
    for prefix in sorted(users, key=lambda p: (users[p] - 1) * len(p), reverse=True):
        if (len(kept) + 1) * max(longest, len(prefix)) <= budget:
            kept.append(prefix)
            longest = max(longest, len(prefix))
    return kept


def encode_with_shared_prefixes(model: "CLIP", tokens: torch.Tensor, *, batch_size: int = 256,
                                prefix_budget: int = PREFIX_BUDGET) -> torch.Tensor:
    """[N, L] padded token ids (end token = largest id, as for CLIP.encode_text) -> [N, D] text features, not
    normalised, in input order. Run it under torch.inference_mode() (and autocast, if wanted)."""
    device = model.token_embedding.weight.device
    ends = tokens.argmax(dim=-1).tolist()  # [N]: the end token's position, as CLIP.encode_text reads it
    rows = [tuple(row[: end + 1]) for row, end in zip(tokens.tolist(), ends)]
    plan = plan_prefixes(rows, budget=prefix_budget)
    where = {sequence: i for i, sequence in enumerate(plan.sequences)}
    prefix_keys, prefix_values = _prefix_states(model, plan.prefixes, device)
    suffix_lengths = [len(sequence) - start for sequence, start in zip(plan.sequences, plan.prefix_length)]
    features = torch.empty(len(plan.sequences), model.config.embed_dim, device=device)  # [U, D]
    for chosen in suffix_batches(suffix_lengths, batch_size):
        features[chosen] = _encode_suffixes(model, plan, chosen, prefix_keys, prefix_values, device).float()
    return features[[where[row] for row in rows]]  # [N, D]


def suffix_batches(lengths: Sequence[int], batch_size: int, slack: float = 1.1) -> list[list[int]]:
    """Indices grouped into batches of similar length: sorted by length, a batch closes when it is full or when
    padding it to the next length would cost more than `slack` x its real tokens (the tower's cost is linear
    in tokens, so padding is wasted work; many tiny batches cost Python overhead instead)."""
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        length = lengths[index]
        if current and (len(current) == batch_size or (len(current) + 1) * length > slack * (real + length)):
            batches.append(current)
            current, real = [], 0
        current.append(index)
        real += length
    if current:
        batches.append(current)
    return batches


def _prefix_states(model: "CLIP", prefixes: list[tuple[int, ...]], device: torch.device,
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the keys and values of every prefix: [G, H, P, W/H] each (P = longest prefix; shorter ones
    are padded at the end, which cannot affect their real positions under the causal mask)."""
    if not prefixes:
        return [], []
    longest = max(map(len, prefixes))
    ids = torch.zeros(len(prefixes), longest, dtype=torch.long)  # [G, P]
    for i, prefix in enumerate(prefixes):
        ids[i, : len(prefix)] = torch.tensor(prefix)
    x = model.token_embedding(ids.to(device)) + model.positional_embedding[:longest].to(model.dtype)  # [G, P, W]
    keys, values = [], []
    for block in model.transformer.resblocks:
        q, k, v = block.attn.project(block.ln_1(x))  # each [G, H, P, W/H]
        keys.append(k)
        values.append(v)
        x = x + block.attn.attend(q, k, v, causal=True)
        x = x + block.mlp(block.ln_2(x))
    return keys, values


def _encode_suffixes(model: "CLIP", plan: _Plan, chosen: list[int], prefix_keys: list[torch.Tensor],
                     prefix_values: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Features [B, D] of the chosen sequences, computing only their suffixes."""
    starts = [plan.prefix_length[i] for i in chosen]
    suffixes = [plan.sequences[i][start:] for i, start in zip(chosen, starts)]
    batch, length = len(chosen), max(map(len, suffixes))
    ids = torch.zeros(batch, length, dtype=torch.long)  # [B, S], zero-padded at the end
    for row, suffix in enumerate(suffixes):
        ids[row, : len(suffix)] = torch.tensor(suffix)
    offset = torch.tensor(starts)  # [B]: absolute position of each suffix's first token
    positions = (offset[:, None] + torch.arange(length)).clamp(max=model.positional_embedding.shape[0] - 1)
    x = model.token_embedding(ids.to(device)) + model.positional_embedding[positions.to(device)].to(model.dtype)

    span = max(starts)  # prefix keys to attend to in this batch
    visible = torch.arange(span)[None, :] < offset[:, None]  # [B, P]: the real tokens of each one's prefix
    causal = torch.ones(length, length, dtype=torch.bool).tril()  # [S, S]
    mask = torch.cat([visible[:, None, :].expand(batch, length, span), causal.expand(batch, -1, -1)], dim=2)
    mask = mask[:, None].to(device)  # [B, 1, S, P + S], True = may attend
    owner = torch.tensor([max(plan.prefix_of[i], 0) for i in chosen], device=device)  # [B]
    rows = torch.arange(batch, device=device)
    last = torch.tensor([len(suffix) - 1 for suffix in suffixes], device=device)  # [B]: the end token
    blocks = model.transformer.resblocks
    for layer, block in enumerate(blocks):
        q, k, v = block.attn.project(block.ln_1(x))  # each [B, H, S, W/H]
        if span:
            k = torch.cat([prefix_keys[layer][owner, :, :span], k], dim=2)  # [B, H, P + S, W/H]
            v = torch.cat([prefix_values[layer][owner, :, :span], v], dim=2)
        if layer == len(blocks) - 1:  # only the end tokens are read after the last layer: compute just those
            q, mask, x = q[rows, :, last][:, :, None], mask[rows, :, last][:, :, None], x[rows, last][:, None]
        x = x + block.attn.attend(q, k, v, mask=mask)  # [B, S, W] ([B, 1, W] in the last layer)
        x = x + block.mlp(block.ln_2(x))
    x = model.ln_final(x[:, -1])  # [B, W]
    return x @ model.text_projection  # [B, D]
