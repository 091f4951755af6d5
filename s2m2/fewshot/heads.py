"""Few-shot heads fitted on frozen features, for thousands of episodes at once.

Every head turns the support set of an episode into a linear classifier over the feature space
(``weight`` (E, ways, D), ``bias`` (E, ways) or None); queries are then scored by one batched matmul.

- ``ncm``: nearest class mean with cosine similarity. ``argmax_k cos(x, mu_k) = argmax_k x . mu_k/|mu_k|``,
  so the classifier is the L2-normalised class means.
- ``logreg``: L2-regularised multinomial logistic regression with an unpenalised intercept, the objective of
  scikit-learn's ``LogisticRegression(C=C)`` (lbfgs, multinomial)::

      0.5 * ||W||_F^2 + C * sum_i CE(W x_i + b, y_i)

  By the representer theorem the optimal W lies in the span of the (at most 25) support features, so we
  solve in an orthonormal basis of that span (n coordinates) with batched damped Newton iterations over all
  episodes of a chunk. The objective is unchanged. The intercepts are defined up to a common constant (the
  softmax ignores it); we return the representative with sum_k b_k = 0, which is also what scikit-learn's
  lbfgs returns (its gradient in b always sums to zero, so starting from 0 it keeps sum b = 0).
- ``cosine``: the release's per-episode protocol (spec §8) batched over episodes, see :func:`fit_cosine`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from s2m2.fewshot.episodes import Episodes

HEADS = ("logreg", "cosine", "ncm")


@dataclass
class LinearEpisodeClassifier:
    """Per-episode linear classifiers: ``logits = x @ weight[e].T + bias[e]``.

    weight: (E, ways, D); bias: (E, ways) or None.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass
class HeadResult:
    """Per-episode accuracies of one evaluation plus what the head reports about its fit.

    accuracy: FloatTensor (E,) in [0, 1] (for ``cosine``: after the last epoch).
    extra_accuracies: other checkpoints of the same fit, e.g. {"epoch100": (E,), "epoch200": (E,)}.
    info: head diagnostics, e.g. {"newton_iterations_max": 7}.
    """

    accuracy: torch.Tensor
    extra_accuracies: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Scoring queries
# ------------------------------------------------------------------------------------------------
# Queries are gathered in sub-chunks into one reused buffer: gathering a whole chunk at once touches fresh
# memory (page faults) and leaves the cache; ~32 MiB at a time is measurably faster on CPU.
_GATHER_BYTES = 32 * 2**20


def query_accuracy(features: torch.Tensor, episodes: Episodes, clf: LinearEpisodeClassifier) -> torch.Tensor:
    """Accuracy (E,) of ``clf`` on the (masked) queries of ``episodes``; features (N, D) on clf's device."""
    device = clf.weight.device
    e, ways, q = episodes.query.shape
    d = features.shape[1]
    step = max(1, _GATHER_BYTES // (4 * d * ways * q))
    buffer = torch.empty(min(step, e) * ways * q, d, dtype=features.dtype, device=device)
    target = torch.arange(ways, device=device).view(1, ways, 1)
    out = []
    for start in range(0, e, step):
        query = episodes.query[start:start + step].to(device)
        mask = episodes.query_mask[start:start + step].to(device)
        b = query.shape[0]
        x = torch.index_select(features, 0, query.reshape(-1), out=buffer[:b * ways * q]).view(b, ways * q, d)
        # (b, ways, D) @ (b, D, ways*Q): this orientation is ~3x faster on CPU than x @ W^T.
        logits = torch.bmm(clf.weight[start:start + b].to(x.dtype), x.transpose(1, 2))  # (b, ways, ways*Q)
        if clf.bias is not None:
            logits = logits + clf.bias[start:start + b].unsqueeze(2).to(x.dtype)
        pred = logits.transpose(1, 2).contiguous().argmax(-1).view(b, ways, q)  # contiguous: argmax ~5x faster
        correct = ((pred == target) & mask).sum((1, 2))
        out.append(correct.double() / mask.sum((1, 2)).double())
    return torch.cat(out).float().cpu()


@dataclass
class ClassIndex:
    """Rows of each class, for scoring every image of a class at once (``queries="all"``).

    class_ids (C,) sorted labels; sizes (C,); table (C, M) rows, -1 padded; position (N,) the index of each
    row inside its class's table row; label_to_class: dict label -> index into class_ids.
    """

    class_ids: torch.Tensor
    sizes: torch.Tensor
    table: torch.Tensor
    position: torch.Tensor

    @classmethod
    def from_labels(cls, labels: torch.Tensor) -> "ClassIndex":
        from s2m2.fewshot.episodes import _class_table
        class_ids, sizes, table = _class_table(torch.as_tensor(labels).long().cpu())
        position = torch.empty(len(labels), dtype=torch.long)
        valid = table >= 0
        position[table[valid]] = torch.nonzero(valid)[:, 1]
        return cls(class_ids, sizes, table, position)


def all_query_accuracy(features: torch.Tensor, episodes: Episodes, clf: LinearEpisodeClassifier,
                       index: ClassIndex) -> torch.Tensor:
    """Accuracy (E,) when the queries are every non-support image of each episode's classes.

    Instead of gathering ~600 query rows per class per episode, each class's images are scored by one
    matmul against the classifiers of every episode that contains the class (features (n_c, D) @
    (D, E_c * ways)); the support images' hits are then subtracted. Same predictions as gathering, with
    no per-episode copies of the features.
    """
    device = clf.weight.device
    e, ways = episodes.classes.shape
    shots = episodes.support.shape[2]
    class_pos = torch.searchsorted(index.class_ids, episodes.classes)  # (E, ways) indices into class_ids
    correct = torch.zeros(e, dtype=torch.long)
    total = (index.sizes[class_pos] - shots).sum(1)
    for c in range(len(index.class_ids)):
        ep_idx, way = torch.nonzero(class_pos == c, as_tuple=True)
        if len(ep_idx) == 0:
            continue
        rows = index.table[c, :int(index.sizes[c])].to(device)
        feats_c = features[rows]  # (n_c, D)
        weight = clf.weight[ep_idx.to(device)]  # (s, ways, D)
        logits = (feats_c @ weight.reshape(-1, weight.shape[-1]).T.to(feats_c.dtype)).view(len(rows), len(ep_idx), ways)
        if clf.bias is not None:
            logits = logits + clf.bias[ep_idx.to(device)].unsqueeze(0).to(logits.dtype)
        hit = (logits.argmax(-1) == way.to(device)).cpu()  # (n_c, s)
        support_rows = episodes.support[ep_idx, way]  # (s, shots) row indices of class c
        support_hits = hit[index.position[support_rows], torch.arange(len(ep_idx)).unsqueeze(1)].sum(1)
        correct.index_add_(0, ep_idx, hit.sum(0) - support_hits)
    return (correct.double() / total.double()).float()


def _support(features: torch.Tensor, episodes: Episodes) -> torch.Tensor:
    """Support features (E, ways*shots, D), class-major: row j*shots + s is shot s of way j."""
    e, ways, shots = episodes.support.shape
    return features[episodes.support.to(features.device).reshape(e, ways * shots)]


def _support_targets(ways: int, shots: int, device) -> torch.Tensor:
    return torch.arange(ways, device=device).repeat_interleave(shots)  # (ways*shots,)


@dataclass
class SpanBasis:
    """Coordinates of m vectors (E, m, D) in an orthonormal basis of their span, via their Gram matrix.

    With G = U U^T = L L^T (Cholesky), U = L B^T where B^T = L^{-1} U has orthonormal rows: the rows of L
    are the coordinates of the vectors. A Gram matrix + Cholesky is much cheaper than a batched QR of
    (D, m) matrices on CPU, and m <= 30 here. A tiny jitter keeps G positive definite when vectors repeat
    (e.g. duplicate images); it perturbs coordinates by ~1e-6 relative.
    """

    vectors: torch.Tensor  # (E, m, D) float32
    chol: torch.Tensor | None  # (E, m, m) float64, lower triangular; None: the standard basis (m > D)

    @classmethod
    def of(cls, vectors: torch.Tensor) -> "SpanBasis":
        if vectors.shape[-2] > vectors.shape[-1]:
            # More vectors than dimensions (e.g. 20-way 5-shot on 64-d Conv-4 features): the Gram matrix is
            # singular, and the span is the whole feature space, whose standard basis is orthonormal.
            return cls(vectors, None)
        gram = torch.bmm(vectors, vectors.transpose(1, 2)).double()
        m = gram.shape[-1]
        scale = gram.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30).view(-1, 1, 1)
        eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
        chol, info = torch.linalg.cholesky_ex(gram + 1e-9 * scale * eye)
        if (info != 0).any():  # (near-)duplicate vectors beyond float64 reach: a larger jitter
            chol = torch.linalg.cholesky(gram + 1e-6 * scale * eye)
        return cls(vectors, chol)

    @property
    def coords(self) -> torch.Tensor:
        """(E, m, r) float64, r = min(m, D): row i = coordinates of vector i."""
        return self.vectors.double() if self.chol is None else self.chol

    def to_features(self, w: torch.Tensor) -> torch.Tensor:
        """Coordinates (E, K, r) -> feature-space vectors (E, K, D) float32: w L^{-1} U."""
        if self.chol is None:
            return w.float()
        y = torch.linalg.solve_triangular(self.chol, w.double(), upper=False, left=False)
        return torch.bmm(y.float(), self.vectors)


# ------------------------------------------------------------------------------------------------
# NCM
# ------------------------------------------------------------------------------------------------
def fit_ncm(support: torch.Tensor, ways: int) -> LinearEpisodeClassifier:
    """support (E, ways*shots, D) class-major -> normalised class means as weights (E, ways, D)."""
    e, n, d = support.shape
    means = support.view(e, ways, n // ways, d).mean(2)
    return LinearEpisodeClassifier(F.normalize(means, dim=-1))


# ------------------------------------------------------------------------------------------------
# Logistic regression (batched Newton in the span of the support)
# ------------------------------------------------------------------------------------------------
def _logreg_objective(theta: torch.Tensor, z: torch.Tensor, onehot: torch.Tensor, C: float) -> torch.Tensor:
    """theta (E, K, P) with the intercept last; z (E, n, P) with a trailing 1; onehot (n, K) -> (E,)."""
    logits = torch.bmm(z, theta.transpose(1, 2))  # (E, n, K)
    ce = torch.logsumexp(logits, -1) - (logits * onehot).sum(-1)
    return 0.5 * theta[..., :-1].pow(2).sum((1, 2)) + C * ce.sum(1)


def fit_logreg(support: torch.Tensor, ways: int, C: float = 1.0, max_iter: int = 50, tol: float = 1e-6,
               ) -> tuple[LinearEpisodeClassifier, dict]:
    """Batched multinomial logistic regression = scikit-learn ``LogisticRegression(C=C)`` per episode.

    Newton's method in the span of the support, on the subspace sum_k theta_k = 0: the optimum lies there
    (the gradient of the objective always sums to zero over classes, and for the weights the L2 term pins
    it), so the last class is parametrised as minus the sum of the others. That removes the softmax's
    null direction in the intercepts and shrinks each Newton system from K*P to (K-1)*P unknowns.

    Args:
        support: (E, n, D) class-major support features (n = ways * shots).
        C: inverse regularisation strength, as in scikit-learn.
        tol: stop when every episode's gradient max-norm is below ``tol * max(1, C * n)``.

    Returns the classifier (weight (E, ways, D) in the support's dtype, bias (E, ways)) and
    {"iterations": Newton iterations until every episode converged (or ``max_iter``), "max_grad": the
    largest final gradient max-norm, "not_converged": how many episodes stopped at ``max_iter`` with their
    gradient still above the tolerance — their classifiers are unfinished fits, and the caller says so}.
    """
    if not C > 0 or not math.isfinite(C):
        raise ValueError(f"logreg: C must be a finite number > 0, got {C} (C=0 ignores the data)")
    if max_iter < 1:
        raise ValueError(f"logreg: max_iter must be >= 1, got {max_iter}")
    e, n, d = support.shape
    k, km = ways, ways - 1
    device = support.device
    # Orthonormal basis of the support span: r = min(n, D) coordinates per point.
    basis = SpanBasis.of(support.float())
    z = torch.cat([basis.coords, torch.ones(e, n, 1, dtype=torch.float64, device=device)], -1)  # (E, n, P)
    p_dim = z.shape[-1]
    onehot = F.one_hot(_support_targets(ways, n // ways, device), k).double()  # (n, K)
    reg = torch.ones(p_dim, dtype=torch.float64, device=device)
    reg[-1] = 0.0  # intercept not penalised
    # theta_full = M theta_reduced with M = [I; -1^T] (K, K-1); the L2 term's Hessian is (M^T M) (x) diag(reg).
    lift = torch.cat([torch.eye(km, device=device), -torch.ones(1, km, device=device)])  # (K, K-1) float32
    h_const = torch.kron(lift.T @ lift, torch.diag(reg).float())
    # The Hessian is built and factorised in float32 (the costly part); gradient, objective and line search
    # stay in float64, so the inexact Newton steps still converge to the float64 optimum.
    z32 = z.float()

    theta = torch.zeros(e, k, p_dim, dtype=torch.float64, device=device)
    active = torch.arange(e, device=device)
    threshold = tol * max(1.0, C * n)
    iterations, max_grad, not_converged = 0, 0.0, 0
    for iterations in range(1, max_iter + 1):
        th, za = theta[active], z[active]
        prob = torch.softmax(torch.bmm(za, th.transpose(1, 2)), -1)  # (A, n, K)
        grad = reg * th + C * torch.bmm((prob - onehot).transpose(1, 2), za)  # (A, K, P), full gradient
        gmax = grad.abs().amax((1, 2))
        done = gmax < threshold
        max_grad = float(gmax.max())
        if done.all():
            break
        keep = ~done
        active, th, za, prob, grad = active[keep], th[keep], za[keep], prob[keep], grad[keep]
        a = len(active)
        if iterations == 1:
            # At theta = 0 every p_i is uniform, so H = (M^T M) (x) (C/K Z^T Z + diag(reg)): a Kronecker
            # product whose inverse needs only one P x P factorisation per episode.
            z_a = z32[active]
            small = (C / k) * torch.bmm(z_a.transpose(1, 2), z_a) + torch.diag(reg).float()
            grad_reduced = (grad[:, :km] - grad[:, km:]).float()  # M^T grad, (A, K-1, P)
            y = torch.cholesky_solve(grad_reduced.transpose(1, 2), torch.linalg.cholesky(small))  # (A, P, K-1)
            step = -(y @ torch.linalg.inv(lift.T @ lift)).transpose(1, 2).double()
            step = torch.cat([step, -step.sum(1, keepdim=True)], 1)
            theta[active] = th + step  # exact Newton step from 0; the line search starts next iteration
            continue
        # Per point softmax Hessian diag(p) - p p^T, reduced: M^T (.) M, (A, n, K-1, K-1).
        p32, z_a = prob.float(), z32[active]
        w_point = torch.diag_embed(p32) - p32.unsqueeze(-1) * p32.unsqueeze(-2)
        w_point = lift.T @ w_point @ lift
        # H = C * sum_i W_i (x) z_i z_i^T + const: one bmm over the support points.
        zz = (z_a.unsqueeze(-1) * z_a.unsqueeze(-2)).reshape(a, n, p_dim * p_dim)
        h = torch.bmm(w_point.reshape(a, n, km * km).transpose(1, 2), zz)  # (A, (K-1)^2, P*P)
        h = h.view(a, km, km, p_dim, p_dim).permute(0, 1, 3, 2, 4).reshape(a, km * p_dim, km * p_dim)
        h = (C * h).add_(h_const)
        chol, info = torch.linalg.cholesky_ex(h)
        if (info != 0).any():  # numerically singular in float32: damp (Levenberg) and retry
            damp = 1e-5 * h.diagonal(dim1=1, dim2=2).amax(-1).view(a, 1, 1)
            chol = torch.linalg.cholesky(h + damp * torch.eye(km * p_dim, device=device))
        grad_reduced = (grad[:, :km] - grad[:, km:]).float()  # M^T grad
        step = -torch.cholesky_solve(grad_reduced.reshape(a, km * p_dim, 1), chol).view(a, km, p_dim).double()
        step = torch.cat([step, -step.sum(1, keepdim=True)], 1)  # back to K classes
        # Backtracking (Armijo) line search, vectorised: each episode keeps halving until it decreases.
        f0 = _logreg_objective(th, za, onehot, C)
        slope = (grad * step).sum((1, 2))
        t = torch.ones(a, dtype=torch.float64, device=device)
        pending = torch.ones(a, dtype=torch.bool, device=device)
        for _ in range(30):
            trial = th + t.view(a, 1, 1) * step
            ok = _logreg_objective(trial, za, onehot, C) <= f0 + 1e-4 * t * slope
            pending &= ~ok
            if not pending.any():
                break
            t = torch.where(pending, t * 0.5, t)
        theta[active] = th + t.view(a, 1, 1) * step
    else:
        # The cap was reached (no break): the last step was taken without a convergence test after it.
        # One more gradient tells which episodes are still unfinished, so they can be reported, not hidden.
        th, za = theta[active], z[active]
        prob = torch.softmax(torch.bmm(za, th.transpose(1, 2)), -1)
        gmax = (reg * th + C * torch.bmm((prob - onehot).transpose(1, 2), za)).abs().amax((1, 2))
        not_converged = int((gmax >= threshold).sum())
        max_grad = float(gmax.max()) if len(gmax) else 0.0
    weight = basis.to_features(theta[..., :-1])  # (E, K, D)
    return (LinearEpisodeClassifier(weight.to(support.dtype), theta[..., -1].to(support.dtype)),
            {"iterations": iterations, "max_grad": max_grad, "not_converged": not_converged})


# ------------------------------------------------------------------------------------------------
# Cosine classifier, the release's protocol, batched
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CosineOptions:
    """The release's per-episode fine-tuning hyperparameters (spec §8)."""

    epochs: int = 301
    batch_size: int = 4
    lr: float = 0.01
    momentum: float = 0.9
    dampening: float = 0.9
    weight_decay: float = 1e-3
    scale: float = 2.0
    report_epochs: tuple[int, ...] = (100, 200, 300)


# The cosine head's random draws (initial weights, per-epoch shuffles) come in fixed blocks of episodes,
# each with its own generator, so the draws do not depend on how episodes are chunked in memory.
_COSINE_RNG_BLOCK = 256


class CosineDraws:
    """The cosine head's random numbers for episodes [first, first + count), independent of chunking.

    Episodes are grouped in fixed blocks of _COSINE_RNG_BLOCK, each with its own generator seeded from
    (episode generator seed, head seed, block); a chunk takes its rows out of every block it overlaps. The
    calls must come in the same order for every chunk: ``initial`` once, then ``order`` once per epoch.
    """

    def __init__(self, generator_seed: int, head_seed: int, first: int, count: int):
        self.first, self.count = first, count
        self.blocks = []
        for block in range(first // _COSINE_RNG_BLOCK, (first + count - 1) // _COSINE_RNG_BLOCK + 1):
            digest = hashlib.sha256(f"s2m2-cosine|{generator_seed}|{head_seed}|{block}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
            self.blocks.append((block * _COSINE_RNG_BLOCK, gen))

    def _uniform(self, *tail: int) -> torch.Tensor:
        parts = []
        for start, gen in self.blocks:
            full = torch.rand(_COSINE_RNG_BLOCK, *tail, generator=gen)
            lo = max(self.first, start) - start
            hi = min(self.first + self.count, start + _COSINE_RNG_BLOCK) - start
            parts.append(full[lo:hi])
        return torch.cat(parts)

    def initial(self, ways: int, dim: int) -> torch.Tensor:
        """(count, ways, dim) initial weights, nn.Linear's default init: U(-1/sqrt(dim), 1/sqrt(dim))."""
        bound = 1.0 / math.sqrt(dim)
        return self._uniform(ways, dim) * (2 * bound) - bound

    def order(self, n: int) -> torch.Tensor:
        """(count, n) a fresh random permutation of the support set per episode."""
        return torch.argsort(self._uniform(n), dim=1)


def fit_cosine(support: torch.Tensor, ways: int, draws: CosineDraws,
               options: CosineOptions = CosineOptions()) -> list[tuple[int, LinearEpisodeClassifier]]:
    """The release's per-episode cosine classifier (distLinear) fine-tuning, for E episodes at once.

    Per episode, exactly as the release: a fresh distLinear(D, ways) — weights v (ways, D) drawn as
    ``nn.Linear``'s default init, U(-1/sqrt(D), 1/sqrt(D)), weight norm with a learnable per-class gain
    g = |v| at init, logits ``scale * g_k * cos(x, v_k)`` with x normalised by |x| + 1e-5; SGD with
    lr, momentum, dampening and weight decay on g and v (PyTorch's SGD: the first step's momentum buffer
    is the gradient); ``epochs`` epochs, each a fresh shuffle of the support cut into mini-batches of
    ``batch_size`` with the mean cross-entropy of the batch.

    Batched, and exact: v only ever moves inside span(support features, initial v) — its gradient is a
    combination of the batch's normalised features and v itself, and weight decay and momentum are linear —
    so the SGD runs on coordinates in an orthonormal basis of that span (m = n + ways <= 30 numbers per
    class instead of D = 640). Norms and dot products are the same in those coordinates, so each step
    equals the D-dimensional one up to float rounding; gradients are written out by hand (checked against
    autograd in the tests).

    Args:
        support: (E, n, D) class-major support features.
        draws: the random numbers of these E episodes (initial weights, shuffles).
    Returns:
        [(epoch, classifier)] after each of ``options.report_epochs`` and after the last epoch (epochs
        counted from 0).
    """
    e, n, d = support.shape
    device, dtype = support.device, torch.float32
    v0 = draws.initial(ways, d).to(device=device, dtype=dtype)  # (E, K, D)
    x = support.to(dtype)
    x_hat = x / (x.norm(dim=-1, keepdim=True) + 1e-5)
    basis = SpanBasis.of(torch.cat([x_hat, v0], 1))
    coords = basis.coords.to(dtype)  # (E, n + K, m): rows are x_hat then v0, in the basis
    xs, v = coords[:, :n].contiguous(), coords[:, n:].clone()
    g = v.norm(dim=-1, keepdim=True)  # (E, K, 1): weight norm's gain starts at |v|
    targets = _support_targets(ways, n // ways, device)
    buf_v = buf_g = None
    opt = options
    report = {epoch for epoch in opt.report_epochs if epoch < opt.epochs} | {opt.epochs - 1}  # always the last
    outputs = []
    for epoch in range(opt.epochs):
        order = draws.order(n).to(device)  # (E, n)
        for start in range(0, n, opt.batch_size):
            idx = order[:, start:start + opt.batch_size]  # (E, b)
            b = idx.shape[1]
            xb = torch.gather(xs, 1, idx.unsqueeze(-1).expand(e, b, xs.shape[-1]))  # (E, b, m)
            yb = targets[idx]  # (E, b)
            v_norm = v.norm(dim=-1, keepdim=True)
            u = v / v_norm
            logits = opt.scale * torch.bmm(xb, (g * u).transpose(1, 2))  # (E, b, K)
            resid = (torch.softmax(logits, -1) - F.one_hot(yb, ways).to(dtype)) / b  # dCE_mean/dlogits
            grad_w = opt.scale * torch.bmm(resid.transpose(1, 2), xb)  # (E, K, m) = dL/d(g*u)
            grad_g = (grad_w * u).sum(-1, keepdim=True)
            grad_v = g / v_norm * (grad_w - grad_g * u)
            grad_g = grad_g + opt.weight_decay * g
            grad_v = grad_v + opt.weight_decay * v
            if buf_v is None:
                buf_v, buf_g = grad_v.clone(), grad_g.clone()
            else:
                buf_v.mul_(opt.momentum).add_(grad_v, alpha=1 - opt.dampening)
                buf_g.mul_(opt.momentum).add_(grad_g, alpha=1 - opt.dampening)
            v = v - opt.lr * buf_v
            g = g - opt.lr * buf_g
        if epoch in report:
            w = g * v / v.norm(dim=-1, keepdim=True)
            outputs.append((epoch, LinearEpisodeClassifier(basis.to_features(w))))
    return outputs


# ------------------------------------------------------------------------------------------------
# Driver: chunks of episodes
# ------------------------------------------------------------------------------------------------
def bytes_per_episode(episodes: Episodes, dim: int, head: str) -> int:
    """Rough peak working memory of one episode (bytes), used to size chunks."""
    ways, shots, q = episodes.support.shape[1], episodes.support.shape[2], episodes.query.shape[2]
    n = ways * shots
    # Queries are scored in small sub-chunks (fixed Q) or per class ("all"), so they add little per episode.
    gathered = 4 * dim * ways * (shots + 4) + 8 * ways * q * 3
    if head == "logreg":
        p = min(n, dim) + 1
        fit = 8 * (dim * n * 3 + n * p * p + 3 * (ways * p) ** 2 + ways * ways * p * p)
    elif head == "cosine":
        fit = 4 * dim * (n + ways) * 4
    else:
        fit = 4 * dim * n * 2
    return gathered + fit


def default_chunk_bytes(device: torch.device) -> int:
    """Working-memory budget for one chunk: 256 MiB on CPU, a quarter of the free memory on CUDA."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 4)
    return 256 * 2**20


def evaluate_episodes_detailed(features: torch.Tensor, labels: torch.Tensor, episodes: Episodes,
                               head: str = "logreg", *, device: str | torch.device | None = None,
                               max_chunk_bytes: int | None = None, progress: bool = False,
                               **head_options) -> HeadResult:
    """Fit ``head`` on every episode's support set and score its queries, in memory-bounded chunks.

    Args:
        features: float (N, D) — already transformed (see :mod:`s2m2.fewshot.feature_transforms`).
        labels: (N,); only used to check that ``episodes`` index these features.
        head: "logreg" (options ``C``=1.0, ``max_iter``, ``tol``), "ncm", or "cosine" (options: the fields
            of :class:`CosineOptions` and ``seed``=0 for its initial weights and shuffles).
        device: where to compute (default: the features' device).
        max_chunk_bytes: cap on the working memory of one chunk (default :func:`default_chunk_bytes`).
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {HEADS}")
    device = torch.device(device) if device is not None else features.device
    labels = torch.as_tensor(labels)
    if features.dim() != 2 or len(features) != len(labels):
        raise ValueError(f"features must be (N, D) with N = len(labels) = {len(labels)}, got {tuple(features.shape)}")
    if int(episodes.support.max()) >= len(features) or int(episodes.query.max()) >= len(features):
        raise ValueError("episodes index rows beyond the features; were they sampled from other labels?")
    feats = features.to(device=device, dtype=torch.float32)
    budget = max_chunk_bytes or default_chunk_bytes(device)
    per_episode = bytes_per_episode(episodes, feats.shape[1], head)
    chunk = max(1, budget // per_episode)
    ways = episodes.ways
    total = len(episodes)
    all_queries = episodes.queries == "all"
    index = ClassIndex.from_labels(labels) if all_queries else None

    def score(part: Episodes, clf: LinearEpisodeClassifier) -> torch.Tensor:
        return all_query_accuracy(feats, part, clf, index) if all_queries else query_accuracy(feats, part, clf)

    accs: dict[str, list[torch.Tensor]] = {}
    info: dict = {"chunk_episodes": int(min(chunk, total)), "chunks": math.ceil(total / chunk)}
    if head == "cosine":
        cos_opts = CosineOptions(**{k: tuple(v) if k == "report_epochs" else v
                                    for k, v in head_options.items() if k != "seed"})
        if cos_opts.epochs < 1:
            raise ValueError(f"cosine: epochs must be >= 1, got {cos_opts.epochs}")
        head_seed = int(head_options.get("seed", 0))
        # Keep the RNG-block/chunk overlap small: round chunks to whole RNG blocks when they are large.
        if chunk >= _COSINE_RNG_BLOCK:
            chunk -= chunk % _COSINE_RNG_BLOCK
    else:
        unknown = set(head_options) - ({"C", "max_iter", "tol"} if head == "logreg" else set())
        if unknown:
            raise ValueError(f"unknown options for head {head!r}: {sorted(unknown)}")
    iterator = range(0, total, chunk)
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc=f"{head} {ways}w{episodes.shots}s", unit="chunk")
    for start in iterator:
        part = episodes[start:start + chunk]
        support = _support(feats, part)
        if head == "ncm":
            accs.setdefault("final", []).append(score(part, fit_ncm(support, ways)))
        elif head == "logreg":
            clf, fit_info = fit_logreg(support, ways, **head_options)
            info["newton_iterations_max"] = max(info.get("newton_iterations_max", 0), fit_info["iterations"])
            info["max_grad"] = max(info.get("max_grad", 0.0), fit_info["max_grad"])
            info["not_converged"] = info.get("not_converged", 0) + fit_info["not_converged"]
            accs.setdefault("final", []).append(score(part, clf))
        else:
            draws = CosineDraws(episodes.generator_seed, head_seed, start, len(part))
            fits = fit_cosine(support, ways, draws, cos_opts)
            for i, (epoch, clf) in enumerate(fits):
                name = "final" if i == len(fits) - 1 else f"epoch{epoch}"
                accs.setdefault(name, []).append(score(part, clf))
            info["final_epoch"] = fits[-1][0]
    result = {name: torch.cat(parts) for name, parts in accs.items()}
    final = result.pop("final")
    return HeadResult(final, result, info)


def evaluate_episodes(features: torch.Tensor, labels: torch.Tensor, episodes: Episodes, head: str = "logreg",
                      **head_options) -> torch.Tensor:
    """Per-episode query accuracies (E,) in [0, 1]; see :func:`evaluate_episodes_detailed` for options."""
    return evaluate_episodes_detailed(features, labels, episodes, head, **head_options).accuracy
