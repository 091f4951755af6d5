"""Few-shot heads: logreg == scikit-learn per episode, cosine == the release's per-episode loop, ncm,
the "all" queries scorer, chunking invariance, determinism and clear errors."""

from __future__ import annotations

import pickle
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import shared_path
from s2m2.fewshot import evaluate_episodes, evaluate_episodes_detailed, mean_ci95, sample_episodes
from s2m2.fewshot.heads import (ClassIndex, CosineDraws, CosineOptions, all_query_accuracy, fit_logreg,
                                fit_ncm, query_accuracy)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small per-episode fits (sklearn's BLAS, the reference loops) crawl when 2 threads share 2 busy cores."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


def synthetic_features(classes=12, per_class=40, dim=64, spread=0.35, seed=0):
    """Post-ReLU features of Gaussian clusters, hard enough that heads make mistakes."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=gen)
    labels = torch.arange(classes).repeat_interleave(per_class)
    feats = (spread * centers[labels] + torch.randn(len(labels), dim, generator=gen)).relu()
    return feats, labels


# ------------------------------------------------------------------------------------------------
# logreg vs scikit-learn
# ------------------------------------------------------------------------------------------------
def sklearn_reference(features, labels, eps, C):
    """Per-episode LogisticRegression (lbfgs, multinomial, unpenalised intercept): accuracies (E,)."""
    from sklearn.linear_model import LogisticRegression

    accs = []
    e, ways, shots = eps.support.shape
    for i in range(e):
        xs = features[eps.support[i].reshape(-1)].double().numpy()
        ys = np.repeat(np.arange(ways), shots)
        xq = features[eps.query[i].reshape(-1)].double().numpy()
        yq = np.repeat(np.arange(ways), eps.query.shape[2])
        clf = LogisticRegression(C=C, max_iter=1000, tol=1e-8).fit(xs, ys)
        accs.append((clf.predict(xq) == yq).mean())
    return torch.tensor(accs)


def check_logreg_matches_sklearn(features, labels, shots, C, episodes=200):
    eps = sample_episodes(labels, ways=5, shots=shots, queries=15, episodes=episodes, seed=11)
    ours = evaluate_episodes(features, labels, eps, "logreg", C=C)
    ref = sklearn_reference(features, labels, eps, C)
    gap = abs(mean_ci95(ours)[0] - mean_ci95(ref)[0])
    assert gap <= 0.2, f"{shots}-shot C={C}: batched {mean_ci95(ours)[0]:.2f} vs sklearn {mean_ci95(ref)[0]:.2f}"
    # Not only the mean: episode by episode the two fits predict (almost) the same.
    assert (ours - ref).abs().max() <= 2 / 75 + 1e-6
    return ours, ref


@pytest.mark.parametrize("shots,C", [(1, 1.0), (5, 0.1), pytest.param(5, 1.0, marks=pytest.mark.slow)])
def test_logreg_matches_sklearn_on_synthetic_features(shots, C):
    feats, labels = synthetic_features()
    ours, _ = check_logreg_matches_sklearn(feats, labels, shots, C, episodes=120)
    assert 0.3 < float(ours.mean()) < 0.99  # a regime where mistakes happen, so agreement means something


def test_logreg_with_more_support_points_than_dimensions_matches_sklearn():
    # 20-way 5-shot on 64-d features (Conv-4 on Omniglot): 100 support points span at most 64 dimensions,
    # so the support Gram matrix is singular; the fit must fall back to the feature space's own basis.
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(40, 64, generator=g)
    labels = torch.arange(40).repeat_interleave(20)
    feats = centers[labels] + 1.5 * torch.randn(len(labels), 64, generator=g)
    eps = sample_episodes(labels, ways=20, shots=5, queries=5, episodes=10, seed=2)
    ours = evaluate_episodes(feats, labels, eps, "logreg", C=1.0, max_iter=100)
    ref = sklearn_reference(feats, labels, eps, 1.0)
    assert (ours - ref).abs().max() <= 2 / 100 + 1e-6
    assert 0.3 < float(ours.mean()) < 0.99


@pytest.fixture(scope="module")
def cifar_features(tmp_path_factory):
    """Features of 1,200 real CIFAR-100 test images (20 classes x 60) through a randomly initialised Conv-4.

    Written as a prepared split and extracted with :func:`s2m2.features.extract_features` (eval transform
    36 -> 32), so this is the same path real evaluation takes.
    """
    from s2m2.data import PreparedWriter, open_split
    from s2m2.data.transforms import EvalTransform
    from s2m2.features import extract_features
    from s2m2.models import create_backbone

    archive = shared_path("data", "cifar100", "cifar-100-python.tar.gz")
    with tarfile.open(archive) as tar:
        test = pickle.load(tar.extractfile("cifar-100-python/test"), encoding="bytes")
    images = np.asarray(test[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    fine = np.asarray(test[b"fine_labels"])
    keep = np.concatenate([np.nonzero(fine == c)[0][:60] for c in range(20)])
    out = tmp_path_factory.mktemp("cifar") / "cifar20"
    with PreparedWriter(out, dataset="cifar100-test-sample", source=archive, source_layout="cifar-python",
                        resolution=32) as writer:
        split = writer.begin_split("novel", num_images=len(keep), height=32, width=32, channels=3,
                                   class_names=[str(c) for c in range(20)])
        split.images[:] = images[keep]
        split.labels[:] = fine[keep]
        writer.end_split("novel")
    torch.manual_seed(0)
    backbone = create_backbone("conv4")
    feats, labels = extract_features(backbone, open_split(out, "novel"), EvalTransform(36, 32), batch_size=200,
                                     progress=False)
    return feats, labels


@pytest.mark.parametrize("shots", [1, 5])
def test_logreg_matches_sklearn_on_real_cifar_features(cifar_features, shots):
    feats, labels = cifar_features
    ours, _ = check_logreg_matches_sklearn(feats, labels, shots, C=1.0, episodes=200)
    assert float(ours.mean()) > 0.25  # above chance: the features carry class information


def test_logreg_solution_is_optimal_and_reports_iterations():
    feats, labels = synthetic_features(dim=48)
    eps = sample_episodes(labels, ways=5, shots=5, queries=15, episodes=20, seed=0)
    support = feats[eps.support.reshape(20, -1)]
    clf, info = fit_logreg(support, ways=5, C=0.7)
    assert 1 <= info["iterations"] < 50 and info["max_grad"] < 1e-5
    # Gradient of 0.5||W||^2 + C * sum CE(W x + b) in the full feature space is ~0 at the returned solution.
    w = clf.weight.double().requires_grad_()
    b = clf.bias.double().requires_grad_()
    y = torch.arange(5).repeat_interleave(5).repeat(20, 1)
    logits = torch.bmm(support.double(), w.transpose(1, 2)) + b.unsqueeze(1)
    loss = 0.5 * w.pow(2).sum() + 0.7 * F.cross_entropy(logits.reshape(-1, 5), y.reshape(-1), reduction="sum")
    loss.backward()
    assert w.grad.abs().max() < 1e-3 and b.grad.abs().max() < 1e-3
    assert clf.bias.sum(1).abs().max() < 1e-4  # sum b = 0, like sklearn's lbfgs from zero


# ------------------------------------------------------------------------------------------------
# cosine vs the release's per-episode loop
# ------------------------------------------------------------------------------------------------
class ReleaseDistLinear(nn.Module):
    """The release's distLinear as the spec describes it (§3), written plainly for the reference loop."""

    def __init__(self, in_dim: int, out_dim: int, init: torch.Tensor | None = None):
        super().__init__()
        linear = nn.Linear(in_dim, out_dim, bias=False)
        if init is not None:
            with torch.no_grad():
                linear.weight.copy_(init)
        self.L = nn.utils.parametrizations.weight_norm(linear, "weight", dim=0)  # g starts at |v|
        self.scale = 2.0

    def forward(self, x):
        x = x / (x.norm(dim=1, keepdim=True) + 1e-5)
        return self.scale * self.L(x)


def release_episode(support, ways, queries_x, draws_init=None, orders=None, epochs=301):
    """One episode of the release's protocol; accuracies after epochs 100/200/300 (if reached)."""
    n, dim = support.shape
    y = torch.arange(ways).repeat_interleave(n // ways)
    yq = torch.arange(ways).repeat_interleave(len(queries_x) // ways)
    clf = ReleaseDistLinear(dim, ways, draws_init)
    opt = torch.optim.SGD(clf.parameters(), lr=0.01, momentum=0.9, dampening=0.9, weight_decay=0.001)
    loss_fn = nn.CrossEntropyLoss()
    accs = {}
    for epoch in range(epochs):
        perm = orders[epoch] if orders is not None else torch.from_numpy(np.random.permutation(n))
        for i in range(0, n, 4):
            idx = perm[i:i + 4]
            opt.zero_grad()
            loss_fn(clf(support[idx]), y[idx]).backward()
            opt.step()
        if epoch in (100, 200, 300):
            with torch.no_grad():
                accs[epoch] = float((clf(queries_x).argmax(1) == yq).float().mean())
    with torch.no_grad():
        final_weight = clf.L.weight.detach().clone()
    return accs, final_weight


@pytest.mark.parametrize("shots,episodes", [(1, 6), (5, 2)])
def test_cosine_replays_the_release_loop_exactly(shots, episodes):
    """Same initial weights and shuffles -> the batched head reproduces the per-episode loop step for step."""
    feats, labels = synthetic_features(dim=32, spread=0.25)
    eps = sample_episodes(labels, ways=5, shots=shots, queries=15, episodes=episodes, seed=2)
    out = evaluate_episodes_detailed(feats, labels, eps, "cosine", seed=7)
    draws = CosineDraws(eps.generator_seed, 7, 0, episodes)
    init = draws.initial(5, feats.shape[1])
    orders = [draws.order(5 * shots) for _ in range(301)]
    for e in range(episodes):
        support = feats[eps.support[e].reshape(-1)]
        queries = feats[eps.query[e].reshape(-1)]
        accs, _ = release_episode(support, 5, queries, init[e], [o[e] for o in orders])
        assert out.extra_accuracies["epoch100"][e] == pytest.approx(accs[100], abs=1 / 75 + 1e-6)
        assert out.extra_accuracies["epoch200"][e] == pytest.approx(accs[200], abs=1 / 75 + 1e-6)
        assert out.accuracy[e] == pytest.approx(accs[300], abs=1 / 75 + 1e-6)


def test_cosine_weights_equal_the_release_loop():
    from s2m2.fewshot.heads import fit_cosine

    feats, labels = synthetic_features(dim=24, spread=0.25)
    eps = sample_episodes(labels, ways=5, shots=2, queries=3, episodes=3, seed=1)
    support = feats[eps.support.reshape(3, -1)]
    opts = CosineOptions(epochs=40, report_epochs=(39,))
    (_, clf), = fit_cosine(support, 5, CosineDraws(99, 0, 0, 3), opts)
    draws = CosineDraws(99, 0, 0, 3)
    init = draws.initial(5, 24)
    orders = [draws.order(10) for _ in range(40)]
    for e in range(3):
        _, weight = release_episode(support[e], 5, support[e], init[e], [o[e] for o in orders], epochs=40)
        torch.testing.assert_close(clf.weight[e], weight, rtol=1e-4, atol=1e-5)


def test_cosine_agrees_with_independent_release_loop_within_ci():
    feats, labels = synthetic_features(dim=32, spread=0.25, seed=3)
    eps = sample_episodes(labels, ways=5, shots=1, queries=15, episodes=40, seed=4)
    ours = evaluate_episodes(feats, labels, eps, "cosine", seed=0)
    torch.manual_seed(123)
    np.random.seed(123)
    ref = torch.tensor([release_episode(feats[eps.support[e].reshape(-1)], 5,
                                        feats[eps.query[e].reshape(-1)])[0][300] for e in range(40)])
    (m_ours, ci_ours), (m_ref, ci_ref) = mean_ci95(ours), mean_ci95(ref)
    assert abs(m_ours - m_ref) <= max(ci_ours, ci_ref), (m_ours, ci_ours, m_ref, ci_ref)


# ------------------------------------------------------------------------------------------------
# ncm, scorers, chunking, determinism, errors
# ------------------------------------------------------------------------------------------------
def test_ncm_is_nearest_normalised_class_mean():
    feats, labels = synthetic_features()
    eps = sample_episodes(labels, ways=5, shots=3, queries=10, episodes=30, seed=0)
    acc = evaluate_episodes(feats, labels, eps, "ncm")
    for e in range(30):
        means = feats[eps.support[e]].mean(1)  # (ways, D)
        q = feats[eps.query[e].reshape(-1)]
        pred = F.cosine_similarity(q.unsqueeze(1), means.unsqueeze(0), dim=-1).argmax(1)
        expected = (pred == torch.arange(5).repeat_interleave(10)).float().mean()
        assert acc[e] == pytest.approx(float(expected))


@pytest.mark.parametrize("head", ["ncm", "logreg"])
def test_all_queries_scorer_equals_gathering(head):
    feats, labels = synthetic_features(classes=8, per_class=30)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[torch.arange(0, 30, 3)] = False  # class 0 smaller: unequal sizes, masks in play
    feats, labels = feats[keep], labels[keep]
    eps = sample_episodes(labels, ways=5, shots=2, queries="all", episodes=50, seed=0)
    support = feats[eps.support.reshape(50, -1)]
    clf = fit_ncm(support, 5) if head == "ncm" else fit_logreg(support, 5)[0]
    gathered = query_accuracy(feats, eps, clf)
    per_class = all_query_accuracy(feats, eps, clf, ClassIndex.from_labels(labels))
    torch.testing.assert_close(per_class, gathered)
    torch.testing.assert_close(evaluate_episodes(feats, labels, eps, head), gathered)


@pytest.mark.parametrize("head,options", [("logreg", {}), ("cosine", {"epochs": 21, "report_epochs": (20,)})])
def test_results_do_not_depend_on_chunking(head, options):
    feats, labels = synthetic_features(dim=32)
    eps = sample_episodes(labels, ways=5, shots=2, queries=5, episodes=300, seed=0)
    whole = evaluate_episodes_detailed(feats, labels, eps, head, **options)
    small = evaluate_episodes_detailed(feats, labels, eps, head, max_chunk_bytes=40_000, **options)
    assert small.info["chunks"] > 5
    torch.testing.assert_close(small.accuracy, whole.accuracy)


@pytest.mark.parametrize("head", ["ncm", "logreg", "cosine"])
def test_same_seed_same_accuracies_different_seed_different(head):
    feats, labels = synthetic_features(dim=32)
    opts = {"epochs": 21, "report_epochs": (20,)} if head == "cosine" else {}

    def run(seed):
        return evaluate_episodes(feats, labels, sample_episodes(labels, 5, 1, 15, 100, seed), head, **opts)

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_evaluate_errors_are_clear():
    feats, labels = synthetic_features()
    eps = sample_episodes(labels, 5, 1, 5, 10, 0)
    with pytest.raises(ValueError, match="unknown head 'svm'"):
        evaluate_episodes(feats, labels, eps, "svm")
    with pytest.raises(ValueError, match=r"unknown options for head 'logreg': \['lr'\]"):
        evaluate_episodes(feats, labels, eps, "logreg", lr=0.1)
    with pytest.raises(ValueError, match="episodes index rows beyond the features"):
        evaluate_episodes(feats[:100], labels[:100], eps, "ncm")


def test_logreg_reports_episodes_stopped_at_the_iteration_cap():
    """Issue 9: stopping at max_iter must not be silent. One Newton step never reaches tol=1e-6 here."""
    feats, labels = synthetic_features(dim=48)
    eps = sample_episodes(labels, ways=5, shots=5, queries=15, episodes=20, seed=0)
    support = feats[eps.support.reshape(20, -1)]
    _, capped = fit_logreg(support, ways=5, C=0.7, max_iter=1)
    assert capped["iterations"] == 1 and capped["not_converged"] == 20 and capped["max_grad"] > 1e-3
    _, full = fit_logreg(support, ways=5, C=0.7)
    assert full["not_converged"] == 0
    # Summed over chunks by the driver (chunks of ~4 episodes here).
    out = evaluate_episodes_detailed(feats, labels, eps, "logreg", max_iter=1, max_chunk_bytes=3 * 2**20)
    assert out.info["chunks"] > 1 and out.info["not_converged"] == 20


def test_heads_refuse_meaningless_options():
    """C=0 and max_iter=0 gave exactly chance and cosine epochs=0 a traceback (issue 10): clear errors."""
    feats, labels = synthetic_features()
    eps = sample_episodes(labels, 5, 1, 5, 10, 0)
    with pytest.raises(ValueError, match="C must be a finite number > 0, got 0"):
        evaluate_episodes(feats, labels, eps, "logreg", C=0.0)
    with pytest.raises(ValueError, match="max_iter must be >= 1, got 0"):
        evaluate_episodes(feats, labels, eps, "logreg", max_iter=0)
    with pytest.raises(ValueError, match="epochs must be >= 1, got 0"):
        evaluate_episodes(feats, labels, eps, "cosine", epochs=0)
