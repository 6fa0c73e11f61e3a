"""Measuring a CLIP: zero-shot classification on a folder of class subfolders, and image-text
retrieval.

Zero-shot: each subfolder's name is its label; the labels (optionally more, from a labels file, as
distractors) go through the prompt templates into a [D, C] classifier (zsclip.jobs.zeroshot), and
every image is scored against all of them. Reports top-1, top-5, mean per-class recall, n (images)
and classes (labels scored among).

Retrieval: pairs (image, caption); image i's own caption is the right answer among all N captions
and vice versa. Reports image_to_text_R@k and text_to_image_R@k for k = 1, 5, 10.

Used by `zsclip eval` and by the training job's validation. No printing here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from zsclip.errors import UserError

RECALL_KS = (1, 5, 10)
Progress = Callable[[int, int], None]


@dataclass
class ZeroShotSet:
    labels: list[str]  # every candidate label (class folders first-seen order, plus distractors)
    items: list[tuple[Path, int]]  # (image, index of its label)
    templates: Any  # zsclip.jobs.labels.TemplateSet

    @classmethod
    def from_folder(cls, root: Path, labels: list[str] | None, templates: Any) -> "ZeroShotSet":
        """Class subfolders of `root` (the folder name is the label). With `labels`, every folder name
        must be among them and the remaining labels are distractors."""
        from zsclip.jobs.inputs import is_hidden, is_image_name

        if not root.is_dir():
            raise UserError(
                f"{root} is not a folder; give a folder with one subfolder of images per class"
            )
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden(p.name))
        if not folders:
            raise UserError(
                f"{root} has no class subfolders; put each class's images in a folder named after it"
            )
        candidates = list(labels) if labels is not None else [p.name for p in folders]
        index = {label.casefold(): i for i, label in enumerate(candidates)}
        missing = [p.name for p in folders if p.name.casefold() not in index]
        if missing:
            raise UserError(
                f"class folder(s) {', '.join(repr(m) for m in missing[:3])} of {root} are not in the "
                "labels file; add them to it"
            )
        items = [
            (path, index[folder.name.casefold()])
            for folder in folders
            for path in sorted(folder.rglob("*"))
            if path.is_file() and is_image_name(path.name) and not is_hidden(path.name)
        ]
        if not items:
            raise UserError(f"no images found in the class folders of {root}")
        return cls(candidates, items, templates)


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path], preprocess: Any) -> None:
        self.paths, self.preprocess = list(paths), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        from zsclip.core.transform import load_image, to_tensor

        return to_tensor(
            load_image(self.paths[index], background=self.preprocess.background), self.preprocess
        )


@dataclass
class EvalRun:
    """What every measurement needs: a model with its tokenizer and preprocessing, and how to run it."""

    model: Any  # zsclip.core.model.CLIP
    tokenizer: Any  # zsclip.core.tokenizer.Tokenizer
    preprocess: Any  # zsclip.core.transform.PreprocessConfig
    device: torch.device
    autocast: Callable | None = None  # a context manager factory (precision), or None for fp32
    batch_size: int = 256
    workers: int = 0  # image-loading processes
    progress: Progress | None = None  # called with (images done, total)


def image_features(run: EvalRun, paths: Sequence[Path]) -> torch.Tensor:
    """L2-normalised fp32 image features [N, D] on the CPU. Unreadable images raise UserError (eval
    data must be clean)."""
    from contextlib import nullcontext

    from zsclip.errors import InputError

    loader = torch.utils.data.DataLoader(
        _ImageFiles(paths, run.preprocess), batch_size=run.batch_size, num_workers=run.workers
    )
    chunks, done = [], 0
    try:
        with torch.inference_mode():
            for images in loader:  # [B, 3, S, S]
                with (run.autocast or nullcontext)():
                    features = run.model.encode_image(images.to(run.device))  # [B, D]
                chunks.append(F.normalize(features.float(), dim=-1).cpu())
                done += images.shape[0]
                if run.progress:
                    run.progress(done, len(paths))
    except InputError as err:
        raise UserError(f"an evaluation image could not be read ({err}); remove or fix it") from err
    return torch.cat(chunks) if chunks else torch.zeros(0, run.model.config.embed_dim)


def zeroshot_scores(
    image_feats: torch.Tensor, classifier: torch.Tensor, targets: torch.Tensor, n_labels: int
) -> dict[str, Any]:
    """top1/top5/mean per-class recall from features [N, D], a classifier [D, C] and targets [N]."""
    return logit_scores(image_feats @ classifier, targets, n_labels)


def logit_scores(logits: torch.Tensor, targets: torch.Tensor, n_labels: int) -> dict[str, Any]:
    """top1/top5/mean per-class recall from logits [N, C] and targets [N]."""
    k = min(5, n_labels)
    top = logits.topk(k, dim=1).indices  # [N, k]
    hit1 = top[:, 0] == targets
    hit5 = (top == targets[:, None]).any(dim=1)
    per_class = [hit1[targets == c].float().mean().item() for c in targets.unique().tolist()]
    return {
        "top1": hit1.float().mean().item(),
        "top5": hit5.float().mean().item(),
        "mean_per_class_recall": sum(per_class) / len(per_class),
        "n": int(targets.numel()),
        "classes": n_labels,
    }


def evaluate_zeroshot(run: EvalRun, zs: ZeroShotSet, head: Any = None) -> dict[str, Any]:
    """top1, top5, mean_per_class_recall, n and classes for a folder of class subfolders. With a
    few-shot `head` (zsclip.jobs.heads.Head, for zs.labels in order) the scores are the head's, plus
    zeroshot_top1 (its zero-shot classifier's) and examples (how many it was fitted on)."""
    from zsclip.jobs.zeroshot import build_classifier

    if head is not None:
        classifier = head.text  # [D, C] the zero-shot classifier it was fitted against
    else:
        classifier = build_classifier(
            run.model, run.tokenizer, zs.labels, zs.templates, device=run.device
        )  # [D, C]
    feats = image_features(run, [p for p, _ in zs.items])  # [N, D]
    targets = torch.tensor([t for _, t in zs.items])
    result = zeroshot_scores(feats, classifier, targets, len(zs.labels))
    if head is None:
        return result
    few_shot = logit_scores(feats @ head.weight + head.bias, targets, len(zs.labels))
    return {**few_shot, "zeroshot_top1": result["top1"], "examples": sum(head.examples())}


def retrieval_recall(
    image_feats: torch.Tensor, text_feats: torch.Tensor, ks: Sequence[int] = RECALL_KS
) -> dict[str, float]:
    """Recall@k both ways for matched pairs: features [N, D] each, L2-normalised; row i matches row i."""
    sims = image_feats @ text_feats.t()  # [N, N]
    correct = sims.diagonal()  # [N]
    # rank of the right answer = how many candidates score strictly higher (ties favour the right
    # answer)
    rank_i2t = (sims > correct[:, None]).sum(dim=1)  # [N]
    rank_t2i = (sims > correct[None, :]).sum(dim=0)  # [N]
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = (rank_i2t < k).float().mean().item()
    for k in ks:
        out[f"text_to_image_R@{k}"] = (rank_t2i < k).float().mean().item()
    return out


def evaluate_pairs(run: EvalRun, pairs: Sequence[Any]) -> dict[str, Any]:
    """Retrieval recall over pairs (zsclip.train.data.Pair); returns the R@k keys and n."""
    from zsclip.jobs.zeroshot import encode_texts

    images = image_features(run, [p.image for p in pairs])  # [N, D]
    texts = encode_texts(run.model, run.tokenizer, [p.caption for p in pairs], device=run.device)
    return {**retrieval_recall(images, texts), "n": len(pairs)}


def validation_metrics(
    run: EvalRun, val_pairs: Any, zeroshot: ZeroShotSet | None
) -> dict[str, float]:
    """What training logs at each checkpoint: retrieval recall on --val, zero-shot top-1 on
    --zeroshot-dir."""
    out: dict[str, float] = {}
    if val_pairs:
        result = evaluate_pairs(run, val_pairs)
        out.update({k: round(v, 4) for k, v in result.items() if "R@" in k})
    if zeroshot is not None:
        out["zeroshot_top1"] = round(evaluate_zeroshot(run, zeroshot)["top1"], 4)
    return out
