"""The few-shot fitting (zsclip.jobs.fewshot) and the head file (zsclip.jobs.heads), on synthetic
embeddings: the solver's optimum, cross-validation folds, labels without examples, thresholds, and a
head file read back whole or refused in one line."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from zsclip.errors import UserError
from zsclip.jobs import fewshot as fs
from zsclip.jobs.heads import Head, read_head, save_head

D, C, SCALE = 16, 6, 20.0
FAST = fs.FitOptions(lambdas=(1.0, 1e-2, 1e-4), alphas=(1.0, 0.5, 0.0))


def world(shots: int, seed: int = 0, text_noise: float = 0.3) -> tuple[torch.Tensor, ...]:
    """Labels as random unit centres, images near their centre, text columns near the centres (or,
    with a large `text_noise`, nowhere near them)."""
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(C, D, generator=gen), dim=-1)  # [C, D]

    def images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(C).repeat_interleave(n)
        noisy = centres[y] + 0.25 * torch.randn(len(y), D, generator=gen)
        return F.normalize(noisy, dim=-1), y  # [N, D], [N]

    w_text = F.normalize(centres.t() + text_noise * torch.randn(D, C, generator=gen), dim=0)
    x, y = images(shots)
    x_test, y_test = images(30)
    return x, y, w_text, x_test, y_test


def top1(head: fs.FitResult, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((x @ head.weight + head.bias).argmax(1) == y).float().mean())


def test_the_solver_reaches_the_optimum() -> None:
    # At the minimum of a convex loss the gradient vanishes; autograd checks the written-out one.
    x, y, w_text, _, _ = world(5)
    prior = SCALE * w_text  # [D, C]
    fit = fs.fit_softmax(x.double(), y, prior.double(), 1e-2, max_iter=500)
    delta = (fit.weight - prior.double()).requires_grad_()
    bias = fit.bias.clone().requires_grad_()
    weights = fs.class_weights(y, C)
    logits = x.double() @ (prior.double() + delta) + bias
    loss = (weights * F.cross_entropy(logits, y, reduction="none")).sum()
    (loss + 0.5e-2 * delta.pow(2).sum()).backward()
    assert float(delta.grad.abs().max()) < 1e-5 and float(bias.grad.abs().max()) < 1e-5


def test_folds_keep_every_label_in_training() -> None:
    y = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    folds = fs.stratified_folds(y, 3)
    assert folds[y == 2].tolist() == [-1]  # a single example is never held out
    for fold in range(3):
        assert set(y[folds != fold].tolist()) == {0, 1, 2}
    assert fs.fold_count(torch.tensor([0, 1, 2]), fs.FitOptions()) == 0


@pytest.mark.parametrize("method", ["probe", "blend", "prior", "auto"])
@pytest.mark.parametrize("contrast", ["seen", "all"])
def test_labels_without_examples_keep_their_zero_shot_column(method: str, contrast: str) -> None:
    x, y, w_text, _, _ = world(3)
    keep = y < 3  # examples for labels 0-2 only
    opts = fs.FitOptions(method=method, lambdas=FAST.lambdas, alphas=FAST.alphas, contrast=contrast)
    head = fs.fit_head(x[keep], y[keep], w_text, SCALE, opts)
    assert head.contrast == contrast
    if head.method == "blend":  # alpha * zero-shot + (1 - alpha) * the zero-shot column itself
        assert torch.allclose(head.weight[:, 3:], SCALE * w_text[:, 3:], atol=1e-5)
    else:
        assert torch.equal(head.weight[:, 3:], SCALE * w_text[:, 3:])
    assert torch.all(head.bias[3:] == 0)


def test_fits_are_deterministic() -> None:
    x, y, w_text, _, _ = world(4)
    a = fs.fit_heads(x, y, w_text, SCALE, ("prior", "blend"), FAST)
    b = fs.fit_heads(x, y, w_text, SCALE, ("prior", "blend"), FAST)
    for method in a:
        assert torch.equal(a[method].weight, b[method].weight) and a[method].lam == b[method].lam


def test_a_small_fit_runs_on_one_thread_and_gives_the_threads_back(monkeypatch) -> None:
    x, y, w_text, _, _ = world(2)
    seen = []
    solve = fs.lbfgs

    def watched(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return solve(*args, **kwargs)

    monkeypatch.setattr(fs, "lbfgs", watched)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fs.fit_head(x, y, w_text, SCALE, FAST)
        assert set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_examples_beat_a_text_classifier_that_is_wrong() -> None:
    x, y, w_text, x_test, y_test = world(8, text_noise=3.0)  # the text columns are nearly random
    zero_shot = float(((x_test @ w_text).argmax(1) == y_test).float().mean())
    auto = fs.fit_head(x, y, w_text, SCALE, FAST)
    assert auto.method == "blend" and auto.alpha is not None and auto.alpha < 1
    assert top1(auto, x_test, y_test) > zero_shot + 0.2


def test_examples_refine_a_text_classifier_that_is_nearly_right() -> None:
    x, y, w_text, x_test, y_test = world(8, text_noise=0.3)
    zero_shot = float(((x_test @ w_text).argmax(1) == y_test).float().mean())
    auto = fs.fit_head(x, y, w_text, SCALE, FAST)
    assert auto.folds == 3 and auto.cv_nll is not None
    assert top1(auto, x_test, y_test) >= zero_shot


def test_the_blend_head_is_the_blend_of_logits() -> None:
    x, y, w_text, x_test, _ = world(4)
    heads = fs.fit_heads(x, y, w_text, SCALE, ("probe", "blend"), FAST)
    probe, blend = heads["probe"], heads["blend"]
    probe_at = fs.fit_head(
        x,
        y,
        w_text,
        SCALE,
        fs.FitOptions(method="probe", lambdas=FAST.lambdas[: 1 + FAST.lambdas.index(blend.lam)]),
    )  # the probe at the blend's lambda, fitted along the same path
    a = blend.alpha
    mixed = a * SCALE * x_test @ w_text + (1 - a) * (x_test @ probe_at.weight + probe_at.bias)
    assert torch.allclose(x_test @ blend.weight + blend.bias, mixed, atol=1e-4)
    assert probe.method == "probe"


def test_one_example_per_label_uses_the_defaults() -> None:
    x, y, w_text, _, _ = world(1)
    head = fs.fit_head(x, y, w_text, SCALE, fs.FitOptions(method="prior"))
    assert head.cv_nll is None and head.folds == 0 and head.lam == FAST.default_prior_lambda


def test_thresholds_split_positives_from_negatives() -> None:
    cos = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.5, 0.6]])  # [N, C]
    y = torch.tensor([0, 0, 1, 1])
    thresholds, f1 = fs.choose_thresholds(cos, y)
    assert thresholds[0] == pytest.approx(0.65) and f1[0] == 1.0  # midpoint of the widest gap
    assert thresholds[1] == pytest.approx(0.4) and f1[1] == 1.0
    alone, _ = fs.choose_thresholds(
        cos[:2], y[:2]
    )  # label 0 has no negatives, label 1 no positives
    assert torch.isnan(alone).all()  # both keep the run's global threshold


def test_a_label_keeps_the_global_threshold_unless_its_own_does_better() -> None:
    cos = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.5, 0.6]])  # [N, C]
    y = torch.tensor([0, 0, 1, 1])
    thresholds, f1 = fs.choose_thresholds(cos, y, default=0.55)
    assert torch.isnan(thresholds).all() and f1.tolist() == [1.0, 1.0]  # 0.55 splits both
    thresholds, f1 = fs.choose_thresholds(cos, y, default=0.65)  # misses label 1's 0.6 (F1 2/3)
    assert torch.isnan(thresholds[0]) and thresholds[1] == pytest.approx(0.4)
    assert f1.tolist() == [1.0, 1.0]


def test_thresholds_maximise_f1_when_no_cut_is_perfect() -> None:
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    positive = torch.tensor([True, False, True, True, False, False])
    cut, f1 = fs.best_cut(scores, positive)
    assert cut == pytest.approx(0.55) and f1 == pytest.approx(6 / 7)  # 3 TP, 1 FP: 2*3/(4+3)


def test_contrast_all_only_when_zero_shot_sends_examples_elsewhere() -> None:
    unseen = torch.tensor([False, False, True, True])
    kept = torch.tensor([[5.0, 1, 0, 0], [1, 5.0, 0, 0], [5.0, 0, 1, 0], [0, 5.0, 0, 1]])
    assert fs.choose_contrast(kept, unseen) == "seen"
    assert fs.choose_contrast(kept[:, [2, 3, 0, 1]], unseen) == "all"
    assert fs.choose_contrast(kept, torch.zeros(4, dtype=torch.bool)) == "seen"


# ------------------------------------------------------------------------------------ head files


def a_head(labels: list[str] | None = None) -> Head:
    labels = labels or ["cat", "dog", "bird"]
    gen = torch.Generator().manual_seed(1)
    text = F.normalize(torch.randn(D, len(labels), generator=gen), dim=0)
    thresholds = torch.tensor([0.3, float("nan"), 0.25])[: len(labels)]
    fit = {"method": "prior", "lambda": 1e-4, "examples": [4, 0, 2], "f1": [1.0, None, 0.8]}
    return Head(
        labels,
        SCALE * text + 0.1,
        torch.zeros(len(labels)),
        thresholds,
        text,
        "tiny",
        ["a photo of a {}."],
        fit,
    )


def test_a_head_file_reads_back_whole(tmp_path: Path) -> None:
    head = a_head()
    save_head(tmp_path / "h.safetensors", head)
    back = read_head(tmp_path / "h.safetensors")
    assert back.labels == head.labels and back.model == "tiny" and back.templates == head.templates
    for name in ("weight", "bias", "text"):
        assert torch.equal(getattr(back, name), getattr(head, name))
    assert torch.equal(back.thresholds.isnan(), head.thresholds.isnan())
    assert back.examples() == [4, 0, 2] and back.fit["f1"] == [1.0, None, 0.8]


def test_reordering_a_head_moves_every_column() -> None:
    head = a_head()
    moved = head.reordered(["Bird", "cat", "dog"])  # case does not make another label
    assert moved.labels == ["Bird", "cat", "dog"] and moved.examples() == [2, 4, 0]
    assert torch.equal(moved.weight[:, 0], head.weight[:, 2])
    with pytest.raises(UserError, match="other labels"):
        head.reordered(["cat", "dog", "fish"])


def _write_raw(path: Path, header: dict, data: bytes = b"") -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def _damaged(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.safetensors"
    save_head(path, a_head())
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    data = raw[8 + header_len :]
    if kind == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "garbage":
        path.write_bytes(b"\x89PNG not a head at all")
    elif kind == "huge header":
        path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    elif kind == "wrong shape":
        header["__metadata__"]["labels"] = json.dumps(["cat", "dog"])
        _write_raw(path, header, data)
    elif kind == "not json labels":
        header["__metadata__"]["labels"] = "[cat"
        _write_raw(path, header, data)
    elif kind == "nan weight":
        start, _ = header["weight"]["data_offsets"]
        data = data[:start] + struct.pack("<f", float("nan")) + data[start + 4 :]
        _write_raw(path, header, data)
    elif kind == "wrong dtype":
        header["bias"]["dtype"] = "I32"
        _write_raw(path, header, data)
    elif kind == "future version":
        header["__metadata__"]["format_version"] = "99"
        _write_raw(path, header, data)
    elif kind == "not a head":
        header["__metadata__"]["format"] = "zsclip"
        _write_raw(path, header, data)
    return path


@pytest.mark.parametrize(
    "kind",
    [
        "truncated",
        "garbage",
        "huge header",
        "wrong shape",
        "not json labels",
        "nan weight",
        "wrong dtype",
        "future version",
        "not a head",
    ],
)
def test_a_damaged_head_file_is_one_line(tmp_path: Path, kind: str) -> None:
    with pytest.raises(UserError) as raised:
        read_head(_damaged(tmp_path, kind))
    message = str(raised.value)
    assert "\n" not in message and "head file" in message


def test_a_missing_head_file_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="zsclip fit"):
        read_head(tmp_path / "nowhere.safetensors")


def test_a_head_scores_extra_labels_zero_shot_beside_its_own() -> None:
    from zsclip.jobs.scores import ClassifyOptions

    head = a_head()
    gen = torch.Generator().manual_seed(2)
    x = F.normalize(torch.randn(4, D, generator=gen), dim=-1)  # [N, D]
    extra = F.normalize(torch.randn(D, 2, generator=gen), dim=0)  # [D, B] background labels
    soft = head.scores(x, SCALE, ClassifyOptions(), extra)  # [N, C + B]
    logits = torch.cat([x @ head.weight + head.bias, SCALE * x @ extra], dim=1)
    assert torch.allclose(soft, torch.softmax(logits, -1), atol=1e-6)
    multi = head.scores(x, SCALE, ClassifyOptions(multi_label=True, threshold=0.2), extra)
    cosine = torch.cat([x @ F.normalize(head.weight, dim=0), x @ extra], dim=1)
    thresholds = torch.tensor([0.3, 0.2, 0.25, 0.2, 0.2])  # NaN and extra labels: the run's 0.2
    assert torch.allclose(multi, torch.sigmoid(SCALE * (cosine - thresholds)), atol=1e-6)
