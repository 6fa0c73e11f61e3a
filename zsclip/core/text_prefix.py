"""Text features for many prompts, with the prompts' shared beginnings computed once.

A zero-shot classifier embeds every label in every template: 100 labels x "a photo of the large {}."
repeat the same five opening tokens a hundred times. Under the text tower's causal mask a token's
state, at every layer, depends only on the tokens before it, so the keys and values of a shared
opening are the same in every prompt that starts with it. This module runs each shared opening (a
"prefix") once, keeps its per-layer keys and values, and runs only the rest of each prompt (its
"suffix"), attending to the stored prefix as if it were there. The result equals `CLIP.encode_text`
up to float rounding (the tests hold it to 1e-5). How many tokens this saves for a typical label set is
measured in docs/performance.md.

    features = encode_with_shared_prefixes(model, tokens)   # tokens [N, L] as the tokenizer pads them -> [N, D]

Which prefix a prompt gets: sorted lexicographically, a sequence shares the most tokens with one of
its two neighbours, so each prompt takes the longest prefix it has in common with any other prompt
(never its last, end-of-text token, whose state is the feature). Identical prompts are computed
once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from zsclip.core.model import CLIP

# a prefix of the start token alone saves one token per prompt: not worth a gather per layer
MIN_PREFIX = 2
# suffix tokens per pass: the MLP's [T, 4W] activations stay ~100 MB for ViT-L's text tower
TOKEN_BUDGET = 8192
# prefixes x longest prefix kept at once: ~100 MB of keys and values for ViT-B's text tower
PREFIX_BUDGET = 2048


@dataclass
class _Plan:
    """Distinct prompts split into a shared prefix (index into `prefixes`, or -1) and the suffix to
    compute."""

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


def plan_prefixes(
    sequences: Sequence[tuple[int, ...]], min_prefix: int = MIN_PREFIX, budget: int = PREFIX_BUDGET
) -> _Plan:
    """Split distinct token sequences into shared prefixes and suffixes (see the module docstring)."""
    ordered = sorted(set(sequences))
    shared = [0] * len(ordered)
    for i in range(1, len(ordered)):
        common = _common_length(ordered[i - 1], ordered[i])
        shared[i - 1] = max(shared[i - 1], common)
        shared[i] = max(shared[i], common)
    # the end token is always computed (its state is the feature), and short prefixes are not worth
    # it
    wanted = [
        sequence[: min(common, len(sequence) - 1)] for sequence, common in zip(ordered, shared)
    ]
    wanted = [prefix if len(prefix) >= min_prefix else () for prefix in wanted]
    kept = _within_budget(wanted, budget)
    index = {prefix: i for i, prefix in enumerate(kept)}
    prefix_of = [index.get(prefix, -1) for prefix in wanted]
    prefix_length = [len(prefix) if i >= 0 else 0 for prefix, i in zip(wanted, prefix_of)]
    return _Plan(ordered, prefix_of, prefix_length, kept)


def _within_budget(wanted: list[tuple[int, ...]], budget: int) -> list[tuple[int, ...]]:
    """The prefixes that save the most tokens, as many as fit `budget` (count x longest: their stored
    keys and values take count x longest x width x 2 x layers floats)."""
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


def encode_with_shared_prefixes(
    model: "CLIP",
    tokens: torch.Tensor,
    *,
    token_budget: int = TOKEN_BUDGET,
    prefix_budget: int = PREFIX_BUDGET,
) -> torch.Tensor:
    """[N, L] padded token ids (end token = largest id, as for CLIP.encode_text) -> [N, D] text
    features, not normalised, in input order. Run it under torch.inference_mode() (and autocast, if
    wanted)."""
    device = model.token_embedding.weight.device
    ends = tokens.argmax(
        dim=-1
    ).tolist()  # [N]: the end token's position, as CLIP.encode_text reads it
    rows = [tuple(row[: end + 1]) for row, end in zip(tokens.tolist(), ends)]
    plan = plan_prefixes(rows, budget=prefix_budget)
    prefix_keys, prefix_values = _prefix_states(model, plan.prefixes, device)
    suffix_lengths = [
        len(sequence) - start for sequence, start in zip(plan.sequences, plan.prefix_length)
    ]
    features = torch.empty(len(plan.sequences), model.config.embed_dim, device=device)  # [U, D]
    for pack in suffix_packs(suffix_lengths, token_budget):
        members = [i for segment in pack for i in segment]
        features[members] = _encode_pack(
            model, plan, pack, prefix_keys, prefix_values, device
        ).float()
    where = {sequence: i for i, sequence in enumerate(plan.sequences)}
    return features[[where[row] for row in rows]]  # [N, D]


def suffix_packs(lengths: Sequence[int], token_budget: int) -> list[list[list[int]]]:
    """Sequence indices in packs of segments: a segment's suffixes all have the same length (so nothing
    is padded), and a pack holds at most `token_budget` suffix tokens (a longer suffix gets a pack
    to itself). The linear layers, most of the cost, see a whole pack as one matrix; attention runs
    per segment."""
    by_length: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        by_length.setdefault(length, []).append(index)
    packs: list[list[list[int]]] = []
    current: list[list[int]] = []
    used = 0
    for length in sorted(by_length):
        members = by_length[length]
        while members:
            room = (token_budget - used) // length
            if room == 0 and current:
                packs.append(current)
                current, used = [], 0
                continue
            taken, members = members[: max(room, 1)], members[max(room, 1) :]
            current.append(taken)
            used += len(taken) * length
    if current:
        packs.append(current)
    return packs


def _prefix_states(
    model: "CLIP",
    prefixes: list[tuple[int, ...]],
    device: torch.device,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, the keys and values of every prefix: [G, H, P, W/H] each (P = longest prefix; shorter
    ones are padded at the end, which cannot affect their real positions under the causal mask)."""
    if not prefixes:
        return [], []
    longest = max(map(len, prefixes))
    ids = torch.tensor(
        [prefix + (0,) * (longest - len(prefix)) for prefix in prefixes]
    )  # [G, P], zero-padded
    x = model.token_embedding(ids.to(device)) + model.positional_embedding[:longest].to(
        model.dtype
    )  # [G, P, W]
    keys, values = [], []
    for block in model.transformer.resblocks:
        q, k, v = block.attn.project(block.ln_1(x))  # each [G, H, P, W/H]
        keys.append(k)
        values.append(v)
        x = x + block.attn.out_proj(block.attn.mix(q, k, v, causal=True))
        x = x + block.mlp(block.ln_2(x))
    return keys, values


@dataclass
class _Segment:
    """Rows [low, high) of a pack's token matrix: `count` suffixes of `length` tokens each."""

    low: int
    high: int
    count: int
    length: int
    span: int  # prefix keys attended to (the longest prefix among these rows; 0 = none)
    owner: torch.Tensor  # [count]: each row's prefix (0 where it has none: masked out)
    mask: (
        torch.Tensor | None
    )  # [count, 1, length, span + length], True = may attend; None = plain causal


def _segments(plan: _Plan, pack: list[list[int]], device: torch.device) -> list[_Segment]:
    segments, low = [], 0
    for members in pack:
        count, length = (
            len(members),
            len(plan.sequences[members[0]]) - plan.prefix_length[members[0]],
        )
        starts = torch.tensor([plan.prefix_length[i] for i in members])  # [n]
        span = int(starts.max())
        owner = torch.tensor([max(plan.prefix_of[i], 0) for i in members], device=device)
        mask = None
        if span:
            # [n, P]: the real tokens of each prefix
            visible = torch.arange(span)[None, :] < starts[:, None]
            causal = torch.ones(length, length, dtype=torch.bool).tril()  # [S, S]
            mask = torch.cat(
                [visible[:, None, :].expand(count, length, span), causal.expand(count, -1, -1)],
                dim=2,
            )
            mask = mask[:, None].to(device)  # [n, 1, S, P + S]
        segments.append(_Segment(low, low + count * length, count, length, span, owner, mask))
        low += count * length
    return segments


def _encode_pack(
    model: "CLIP",
    plan: _Plan,
    pack: list[list[int]],
    prefix_keys: list[torch.Tensor],
    prefix_values: list[torch.Tensor],
    device: torch.device,
) -> torch.Tensor:
    """Features [R, D] of a pack's sequences (segment by segment), computing only their suffixes."""
    ids, positions = [], []
    for members in pack:
        for i in members:
            start, sequence = plan.prefix_length[i], plan.sequences[i]
            ids.extend(sequence[start:])
            positions.extend(range(start, len(sequence)))
    x = model.token_embedding(
        torch.tensor(ids, device=device)
    )  # [T, W]: every suffix token, unpadded
    x = x + model.positional_embedding[torch.tensor(positions, device=device)].to(model.dtype)
    segments = _segments(plan, pack, device)
    ends = torch.cat(
        [torch.arange(s.count) * s.length + s.low + s.length - 1 for s in segments]
    ).to(device)  # [R]
    blocks = model.transformer.resblocks
    for layer, block in enumerate(blocks):
        # only the end tokens are read after the last layer: compute just those
        final = layer == len(blocks) - 1
        qkv = F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias)  # [T, 3W]
        mixed = []
        for s in segments:
            q, k, v = block.attn.split_heads(
                qkv[s.low : s.high].view(s.count, s.length, -1)
            )  # [n, H, S, W/H]
            if s.span:
                k = torch.cat(
                    [prefix_keys[layer][s.owner, :, : s.span], k], dim=2
                )  # [n, H, P + S, W/H]
                v = torch.cat([prefix_values[layer][s.owner, :, : s.span], v], dim=2)
            mask = s.mask
            if final:  # the end token is each suffix's last: it may attend to everything visible
                q, mask = q[:, :, -1:], None if mask is None else mask[:, :, -1:]
            out = block.attn.mix(
                q, k, v, causal=mask is None and not final, mask=mask
            )  # [n, S or 1, W]
            mixed.append(out.reshape(-1, out.shape[-1]))
        if final:
            x = x[ends]  # [R, W]
        x = x + block.attn.out_proj(torch.cat(mixed))
        x = x + block.mlp(block.ln_2(x))
    return model.ln_final(x) @ model.text_projection  # [R, D]
