"""Few-shot heads: a few labelled image embeddings per label, combined with the zero-shot classifier.

    x        [N, D]  L2-normalised image embeddings of the examples
    y        [N]     int64 label index in [0, C) of each example
    w_text   [D, C]  the zero-shot classifier: unit columns, one per label
    scale    float   the model's logit scale: zero-shot logits are scale * x @ w_text

A head is a linear classifier over all C labels, logits = x @ weight + bias, scored with a softmax over
all of them exactly as the zero-shot classifier is. Labels without examples keep their zero-shot column
(scale * w_text[:, c], bias 0), so they stay in the same softmax, on the same scale. The methods are the
paper's linear probe on CLIP features and two ways of combining it with the text:

    "probe"  L2-regularised multinomial logistic regression on the examples alone
    "blend"  alpha * zero-shot logits + (1 - alpha) * probe logits (still one linear head)
    "prior"  logistic regression whose weights are pulled toward the zero-shot weights, not toward 0
    "auto"   prior or blend, whichever has the lower cross-validated loss (the default)

The regularisation strength (and alpha) are chosen by stratified k-fold cross-validation over the
examples, scoring the out-of-fold negative log-likelihood of the full C-label head. Each fit is a small
convex problem solved by full-batch L-BFGS written out here (torch.optim.LBFGS would import
torch._dynamo, seconds of start-up for a command line tool). `choose_thresholds` picks per-label cosine
thresholds for multi-label mode. Why these choices, with the figures: docs/fewshot.md.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F

METHODS = ("auto", "prior", "blend", "probe")
CONTRASTS = ("auto", "seen", "all")


@dataclass(frozen=True)
class FitOptions:
    method: str = "auto"
    # Strengths lambda of mean (class-balanced) loss + lambda/2 * ||W - W0||^2, strongest first: the
    # path is fitted in this order, each fit warm-started from the previous one.
    lambdas: tuple[float, ...] = (10.0, 1.0, 1e-1, 1e-2, 1e-3, 1e-4)
    # Weight of the zero-shot side in the blend, largest first (ties go to the more zero-shot one).
    alphas: tuple[float, ...] = tuple(i / 10 for i in range(10, -1, -1))
    folds: int = 3  # at most; fewer when the largest label has fewer examples
    seed: int = 0  # the fold assignment only; the fits themselves are deterministic
    max_iter: int = 60  # L-BFGS iterations per fit; warm starts need far fewer
    # What an example is contrasted with in training: "seen" = the other labels with examples;
    # "all" = every label, those without examples held at their zero-shot column; "auto" = "all"
    # when zero-shot gives a quarter or more of the examples to labels without any (choose_contrast).
    contrast: str = "auto"
    # When no label has 2 examples there is nothing to cross-validate: these measured defaults.
    default_probe_lambda: float = 1e-3
    default_prior_lambda: float = 1e-4
    default_alpha: float = 0.5

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.contrast not in CONTRASTS:
            raise ValueError(f"contrast must be one of {', '.join(CONTRASTS)}")
        if not self.lambdas or min(self.lambdas) <= 0 or not self.alphas or self.folds < 2:
            raise ValueError("lambdas must be positive, alphas non-empty and folds at least 2")

    def to_dict(self) -> dict:
        """Every field, JSON-ready (a cache key and the head file's metadata)."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in asdict(self).items()
        }


@dataclass
class FitResult:
    """One fitted head over all C labels: logits = x @ weight + bias."""

    method: str  # what was fitted: prior, blend or probe ("auto" resolved), or zeroshot
    weight: torch.Tensor  # [D, C] float32
    bias: torch.Tensor  # [C] float32
    contrast: str  # "seen" or "all", as resolved
    lam: float | None = None  # the chosen regularisation strength
    alpha: float | None = None  # blend: the zero-shot share
    cv_nll: float | None = None  # out-of-fold NLL at the chosen setting; None without CV
    folds: int = 0  # folds used by the cross-validation (0: none was possible)


class Fit(NamedTuple):
    """One solved problem: the fitted labels' columns and biases."""

    weight: torch.Tensor  # [D, K]
    bias: torch.Tensor  # [K]


# ------------------------------------------------------------------------------------ the solver


def lbfgs(
    objective: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    start: torch.Tensor,
    *,
    max_iter: int,
    history: int = 10,
    tol_grad: float = 1e-6,
    tol_change: float = 1e-9,
) -> torch.Tensor:
    """Minimise a smooth convex function of a flat tensor: objective(p) -> (loss, gradient).

    Limited-memory BFGS (two-loop recursion, initial scaling s.y / y.y) with a backtracking line
    search on the Armijo condition, quadratic interpolation between tries. Stops after `max_iter`
    iterations, when the largest gradient entry is at most `tol_grad`, or when a step changes the
    loss or the parameters by less than `tol_change`."""
    p = start.clone()
    loss, grad = objective(p)
    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (s, y, 1 / s.y)
    for iteration in range(max_iter):
        if float(grad.abs().max()) <= tol_grad:
            break
        direction = -_inverse_hessian_times(grad, steps)
        slope = float(grad @ direction)
        if slope > -tol_change:
            break
        # The first step has no curvature to scale it: as torch.optim.LBFGS, at most 1 / |g|_1.
        step = min(1.0, 1.0 / float(grad.abs().sum())) if iteration == 0 else 1.0
        for _ in range(30):
            candidate = p + step * direction
            new_loss, new_grad = objective(candidate)
            rise = float(new_loss - loss)
            if rise <= 1e-4 * step * slope:
                break
            # the minimum of the parabola through loss, slope and new_loss, kept in [0.1, 0.5] x step
            shrink = -slope * step / (2 * (rise - slope * step))
            step *= min(max(shrink, 0.1), 0.5)
        else:
            break  # no decrease along a descent direction: round-off, the minimum is reached
        s, y = candidate - p, new_grad - grad
        sy = float(s @ y)
        if sy > 1e-10:  # curvature information only when it is positive (always, if convex)
            steps = (steps + [(s, y, torch.tensor(1.0 / sy, dtype=s.dtype))])[-history:]
        p, grad, change = candidate, new_grad, abs(rise)
        loss = new_loss
        if change < tol_change or float(s.abs().max()) < tol_change:
            break
    return p


def _inverse_hessian_times(
    grad: torch.Tensor, steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """The L-BFGS estimate of H^-1 @ grad from the stored (s, y, 1 / s.y), newest last."""
    q = grad.clone()
    alphas = []
    for s, y, rho in reversed(steps):
        alpha = rho * (s @ q)
        q -= alpha * y
        alphas.append(alpha)
    if steps:
        s, y, _ = steps[-1]
        q *= (s @ y) / (y @ y)
    for (s, y, rho), alpha in zip(steps, reversed(alphas)):
        q += (alpha - rho * (y @ q)) * s
    return q


def class_weights(y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """[N] weights summing to 1, every label weighing the same: a folder of 16 images must not
    outvote one of 2 (example counts are the user's choice, not the world's label frequencies)."""
    counts = torch.bincount(y, minlength=n_classes).to(torch.float64)
    present = (counts > 0).sum()
    return 1.0 / (counts[y] * present)


def fit_softmax(
    x: torch.Tensor,
    y: torch.Tensor,
    prior: torch.Tensor,
    lam: float,
    *,
    fixed: torch.Tensor | None = None,
    bias: bool = True,
    init: Fit | None = None,
    max_iter: int = 60,
) -> Fit:
    """Minimise sum_i w_i * CE(logits_i, y_i) + lam/2 * ||W - prior||^2.

    x [N, D], y [N] in [0, K), prior [D, K] (zeros for the plain probe). logits = [x @ W + b, x @ fixed]:
    `fixed` [D, C - K] are columns that compete in the softmax but are not trained (labels without
    examples under "all" contrast). The gradient is written out: these problems are small, so
    autograd's overhead would dominate."""
    d, k = prior.shape
    target = F.one_hot(y, k + (fixed.shape[1] if fixed is not None else 0)).to(x.dtype)  # [N, C']
    weights = class_weights(y, k).to(x.dtype).unsqueeze(1)  # [N, 1]
    rest = x @ fixed if fixed is not None else x.new_zeros(len(x), 0)  # [N, C - K], never changes

    def objective(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        delta, b = p[: d * k].view(d, k), p[d * k :]  # W - prior [D, K], bias [K]
        logits = torch.cat([x @ (prior + delta) + b, rest], dim=1)  # [N, C']
        log_p = torch.log_softmax(logits, dim=1)
        loss = -(weights * target * log_p).sum() + 0.5 * lam * delta.pow(2).sum()
        d_logits = (weights * (log_p.exp() - target))[:, :k]  # [N, K] d loss / d fitted logits
        grad_b = d_logits.sum(0) if bias else torch.zeros(k, dtype=x.dtype)  # [K]
        return loss, torch.cat([(x.t() @ d_logits + lam * delta).flatten(), grad_b])

    start = torch.cat(
        [
            (init.weight - prior).flatten() if init is not None else prior.new_zeros(d * k),
            init.bias if init is not None else prior.new_zeros(k),
        ]
    )
    p = lbfgs(objective, start, max_iter=max_iter)
    return Fit(prior + p[: d * k].view(d, k), p[d * k :])


def fit_path(
    x: torch.Tensor,
    y: torch.Tensor,
    prior: torch.Tensor,
    lambdas: tuple[float, ...],
    opts: FitOptions,
    fixed: torch.Tensor | None = None,
) -> list[Fit]:
    """One fit per lambda, strongest first, each warm-started from the last (fast, deterministic)."""
    fits: list[Fit] = []
    use_bias = fixed is None  # a free bias against fixed columns would grow without bound
    for lam in lambdas:
        init = fits[-1] if fits else None
        fits.append(
            fit_softmax(
                x, y, prior, lam, fixed=fixed, bias=use_bias, init=init, max_iter=opts.max_iter
            )
        )
    return fits


# ------------------------------------------------------------------------------ cross-validation


def stratified_folds(y: torch.Tensor, folds: int, seed: int = 0) -> torch.Tensor:
    """[N] fold id per example, or -1 for examples never held out.

    Each label's examples are shuffled and dealt round-robin over the folds, starting where the
    previous label stopped (folds stay equal in size). A label with n < folds examples is held out in
    only n folds, so every fold keeps at least one example of every label in training; a label with
    a single example is never held out (it would be a label without examples in that fold)."""
    gen = torch.Generator().manual_seed(seed)
    fold = torch.full_like(y, -1)
    start = 0
    for label in torch.unique(y).tolist():
        members = torch.nonzero(y == label).flatten()
        if len(members) < 2:
            continue
        members = members[torch.randperm(len(members), generator=gen)]
        fold[members] = (start + torch.arange(len(members))) % folds
        start = (start + len(members)) % folds
    return fold


def fold_count(y: torch.Tensor, opts: FitOptions) -> int:
    """How many folds CV can use: 0 when no label has two examples."""
    largest = int(torch.bincount(y).max()) if len(y) else 0
    return 0 if largest < 2 else min(opts.folds, largest)


def oof_logits(
    x: torch.Tensor,
    y: torch.Tensor,
    prior: torch.Tensor,
    folds: torch.Tensor,
    opts: FitOptions,
    fixed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Out-of-fold logits of the fitted labels for every lambda: [L, N, K] (NaN: never held out)."""
    out = torch.full((len(opts.lambdas), len(y), prior.shape[1]), float("nan"), dtype=x.dtype)
    for f in range(int(folds.max()) + 1):
        train, held = folds != f, folds == f
        for i, fit in enumerate(fit_path(x[train], y[train], prior, opts.lambdas, opts, fixed)):
            out[i, held] = x[held] @ fit.weight + fit.bias
    return out


def mean_nll(log_probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[..., N, C] log-probabilities, y [N] -> [...] mean negative log-likelihood of the truth."""
    index = y.expand(log_probs.shape[:-1]).unsqueeze(-1)
    return -log_probs.gather(-1, index).squeeze(-1).mean(-1)


def grid_nll(
    logits: torch.Tensor, zs: torch.Tensor, y: torch.Tensor, blend: bool, opts: FitOptions
) -> torch.Tensor:
    """Out-of-fold NLL of the full head per grid point: [L], or [L, A] for the blend.
    logits [L, M, C] (fitted columns out of fold, the rest zero-shot), zs [M, C] zero-shot logits."""
    if not blend:
        return mean_nll(torch.log_softmax(logits, -1), y)
    a = torch.tensor(opts.alphas, dtype=zs.dtype).view(1, -1, 1, 1)  # [1, A, 1, 1]
    mixed = torch.log_softmax(a * zs + (1 - a) * logits.unsqueeze(1), -1)  # [L, A, M, C]
    return mean_nll(mixed, y)


def first_min(scores: torch.Tensor) -> tuple[int, ...]:
    """Index of the smallest score, the first on ties (grids run most-regularised first)."""
    flat = int(torch.argmin(torch.nan_to_num(scores, nan=float("inf")).flatten()))
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), scores.shape))


# ----------------------------------------------------------------------------------- the methods


@dataclass
class _Problem:
    """The examples, prepared once for every method."""

    x: torch.Tensor  # [N, D] float32
    y: torch.Tensor  # [N] label in [0, C)
    y_fit: torch.Tensor  # [N] position of the label among `seen`, in [0, K)
    seen: torch.Tensor  # [K] labels with examples, sorted
    zs_weight: torch.Tensor  # [D, C] scale * w_text
    contrast: str  # "seen" or "all"
    fixed: torch.Tensor | None  # [D, C - K] zero-shot columns of labels without examples ("all")

    def prior(self, method: str) -> torch.Tensor:
        """[D, K] what the fitted columns are pulled toward: the zero-shot weights, or zero."""
        prior = self.zs_weight[:, self.seen]
        return prior if method == "prior" else torch.zeros_like(prior)


def fit_heads(
    x: torch.Tensor,
    y: torch.Tensor,
    w_text: torch.Tensor,
    scale: float,
    methods: tuple[str, ...],
    opts: FitOptions = FitOptions(),
) -> dict[str, FitResult]:
    """Fit each of `methods` on the examples x [N, D], y [N]; they share their CV fits."""
    with _threads_for(x.shape[0] * x.shape[1] * w_text.shape[1]):
        return _fit_heads(x, y, w_text, scale, methods, opts)


# Below this many multiply-adds per product x @ W, one thread fits faster than several: each of the
# thousands of small products would otherwise pay the threads' start and wait (docs/fewshot.md).
ONE_THREAD_WORK = 2**26


@contextmanager
def _threads_for(work: int) -> Iterator[None]:
    """One torch thread for the solver while the problem is small; the caller's setting after."""
    threads = torch.get_num_threads()
    if work > ONE_THREAD_WORK or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit_heads(
    x: torch.Tensor,
    y: torch.Tensor,
    w_text: torch.Tensor,
    scale: float,
    methods: tuple[str, ...],
    opts: FitOptions,
) -> dict[str, FitResult]:
    p = _prepare(x, y, w_text, scale, opts)
    n_folds = fold_count(y, opts)
    folds = stratified_folds(y, n_folds, opts.seed) if n_folds >= 2 else None
    cv_cache: dict[str, torch.Tensor] = {}
    heads: dict[str, FitResult] = {}

    def one(method: str) -> FitResult:
        if method not in heads:
            heads[method] = _fit_one(p, method, folds, cv_cache, opts)
        return heads[method]

    for method in methods:
        heads[method] = _auto(p, one, folds is not None) if method == "auto" else one(method)
    return {method: heads[method] for method in methods}


def fit_head(
    x: torch.Tensor, y: torch.Tensor, w_text: torch.Tensor, scale: float, opts: FitOptions
) -> FitResult:
    """The head `opts.method` asks for, over all C labels; see `fit_heads`."""
    return fit_heads(x, y, w_text, scale, (opts.method,), opts)[opts.method]


def _fit_one(
    p: _Problem,
    method: str,
    folds: torch.Tensor | None,
    cv_cache: dict[str, torch.Tensor],
    opts: FitOptions,
) -> FitResult:
    if len(p.y) == 0:
        zeros = p.zs_weight.new_zeros(p.zs_weight.shape[1])
        return FitResult("zeroshot", p.zs_weight.float(), zeros.float(), p.contrast)
    lam, alpha, nll = _select(p, method, folds, cv_cache, opts)
    fit = fit_path(p.x, p.y_fit, p.prior(method), _path_to(opts.lambdas, lam), opts, p.fixed)[-1]
    weight = (
        p.zs_weight.clone()
    )  # [D, C]: fitted columns where there are examples, zero-shot elsewhere
    weight[:, p.seen] = fit.weight
    bias = p.zs_weight.new_zeros(p.zs_weight.shape[1])
    bias[p.seen] = fit.bias
    if method == "blend":  # a logit blend is itself linear: mix the weights
        weight, bias = alpha * p.zs_weight + (1 - alpha) * weight, (1 - alpha) * bias
    folds_used = int(folds.max()) + 1 if folds is not None else 0
    return FitResult(method, weight.float(), bias.float(), p.contrast, lam, alpha, nll, folds_used)


def _auto(p: _Problem, one: Callable[[str], FitResult], cross_validated: bool) -> FitResult:
    """The prior head or the blend (which spans probe .. zero-shot), whichever CV scores better.

    Without CV (one example per label) zero-shot's top-1 on the examples decides, an honest estimate
    since zero-shot never saw them: half or more right, the prior head; else the probe (the blend's
    default alpha would keep too much of a wrong prior)."""
    if len(p.y) == 0:
        return one("probe")  # zero-shot: there is nothing to fit
    if cross_validated:
        prior, blend = one("prior"), one("blend")
        return prior if prior.cv_nll <= blend.cv_nll else blend
    zero_shot_right = float(((p.x @ p.zs_weight).argmax(1) == p.y).float().mean())
    return one("prior") if zero_shot_right >= 0.5 else one("probe")


def _prepare(
    x: torch.Tensor, y: torch.Tensor, w_text: torch.Tensor, scale: float, opts: FitOptions
) -> _Problem:
    x, zs_weight = x.float(), scale * w_text.float()  # [N, D], [D, C]
    seen = torch.unique(y)
    unseen = torch.ones(zs_weight.shape[1], dtype=torch.bool)
    unseen[seen] = False
    contrast = opts.contrast
    if contrast == "auto":
        contrast = choose_contrast(x @ zs_weight, unseen)
    fixed = zs_weight[:, unseen] if contrast == "all" and unseen.any() else None
    return _Problem(x, y, torch.searchsorted(seen, y), seen, zs_weight, contrast, fixed)


def choose_contrast(zs_logits: torch.Tensor, unseen: torch.Tensor, share: float = 0.25) -> str:
    """ "all" when zero-shot gives at least `share` of the examples [N, C] to labels without examples,
    else "seen".

    Only "all" lets labels with examples climb above those without, which examples of a label the
    text cannot describe need (zero-shot sends their images elsewhere); but it also lets them take
    images from the labels without examples, which no example can check. When zero-shot already keeps
    the examples among their own labels, "seen" leaves the other labels as they were."""
    if not unseen.any():
        return "seen"  # the same problem either way
    to_unlabelled = unseen[zs_logits.argmax(1)].float().mean()
    return "all" if float(to_unlabelled) >= share else "seen"


def _select(
    p: _Problem,
    method: str,
    folds: torch.Tensor | None,
    cv_cache: dict[str, torch.Tensor],
    opts: FitOptions,
) -> tuple[float, float | None, float | None]:
    """(lambda, alpha, out-of-fold NLL) for `method`: by CV, or the defaults when CV is impossible."""
    blend = method == "blend"
    if folds is None:
        lam = opts.default_prior_lambda if method == "prior" else opts.default_probe_lambda
        return lam, (opts.default_alpha if blend else None), None
    held = folds >= 0
    zs = p.x[held] @ p.zs_weight  # [M, C] zero-shot logits of the held-out examples
    key = "prior" if method == "prior" else "probe"  # probe and blend share their fold fits
    if key not in cv_cache:
        seen_oof = oof_logits(p.x, p.y_fit, p.prior(method), folds, opts, p.fixed)[:, held]
        cv_cache[key] = zs.expand(seen_oof.shape[:1] + zs.shape).clone()  # [L, M, C]
        cv_cache[key][..., p.seen] = seen_oof
    nll = grid_nll(cv_cache[key], zs, p.y[held], blend, opts)  # [L] or [L, A]
    best = first_min(nll)
    return opts.lambdas[best[0]], (opts.alphas[best[1]] if blend else None), float(nll[best])


def _path_to(lambdas: tuple[float, ...], lam: float) -> tuple[float, ...]:
    """The grid from its strongest value down to `lam`: the final fit follows the CV's path."""
    return lambdas[: lambdas.index(lam) + 1] if lam in lambdas else (lam,)


# -------------------------------------------------------------------------- multi-label thresholds


def choose_thresholds(
    cos: torch.Tensor, y: torch.Tensor, default: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-label cosine thresholds for multi-label mode, chosen on the examples.

    cos [N, C]: the cosine between each example and each label's column, the score multi-label mode
    thresholds (sigmoid(scale * (cos - t)) >= 0.5 iff cos >= t). For each label with examples, its
    own images are positives and every other example a negative; the threshold is the midpoint of
    the gap between two neighbouring scores that maximises F1 (ties: the widest gap, a 1-D maximum
    margin). With a `default` (the global threshold), a label keeps it unless its own threshold has
    a higher F1 on the examples: a cut set by a few positives is noisier than a threshold tuned on
    many images, so it must earn its place. Returns thresholds [C] (NaN: the global threshold) and
    the F1 on the examples at the threshold kept [C] (NaN for labels without examples or without
    negatives), both float32."""
    n_labels = cos.shape[1]
    thresholds = torch.full((n_labels,), float("nan"), dtype=torch.float64)
    f1s = torch.full((n_labels,), float("nan"), dtype=torch.float64)
    for c in range(n_labels):
        positive = y == c
        if not positive.any() or positive.all():
            continue
        scores = cos[:, c].to(torch.float64)
        found = best_cut(scores, positive)
        kept = f1_at(scores, positive, default) if default is not None else -1.0
        if found is not None and found[1] > kept + 1e-9:
            thresholds[c], f1s[c] = found
        elif default is not None:
            f1s[c] = kept
    return thresholds.float(), f1s.float()


def f1_at(scores: torch.Tensor, positive: torch.Tensor, threshold: float) -> float:
    """F1 of "score at or above `threshold`: positive" over scores [N]."""
    predicted = scores >= threshold
    tp = float((predicted & positive).sum())
    return 2 * tp / (float(predicted.sum()) + float(positive.sum()))


def best_cut(scores: torch.Tensor, positive: torch.Tensor) -> tuple[float, float] | None:
    """(threshold, F1) of the best cut of scores [N] into "at or above: positive", or None when all
    scores are equal."""
    order = torch.argsort(scores, descending=True, stable=True)
    s, pos = scores[order], positive[order].to(torch.float64)
    tp = torch.cumsum(pos, 0)  # predicting the first j + 1 as positive
    predicted = torch.arange(1, len(s) + 1, dtype=torch.float64)
    f1 = 2 * tp / (predicted + pos.sum())  # 2TP / (2TP + FP + FN) = 2TP / (predicted + actual)
    gap = s[:-1] - s[1:]  # [N - 1] the cut between j and j + 1
    valid = gap > 0  # only between distinct scores
    if not valid.any():
        return None
    f1, best_f1 = f1[:-1], f1[:-1][valid].max()
    candidates = valid & (f1 >= best_f1 - 1e-12)
    j = int(torch.argmax(torch.where(candidates, gap, torch.tensor(-1.0, dtype=gap.dtype))))
    return float((s[j] + s[j + 1]) / 2), float(best_f1)
