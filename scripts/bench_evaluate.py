#!/usr/bin/env python
"""Speed benchmark of the batched few-shot heads against per-episode reference fits, side by side.

    python scripts/bench_evaluate.py [--episodes 10000] [--ref-episodes 200] [--device cpu] [--threads 1]
                                     [--sections logreg,ncm,cosine,logreg_all] [--out-md FILE]

Features: 20 classes x 600 images x 640-d (the size of mini-ImageNet's novel split under WRN-28-10),
synthetic post-ReLU Gaussian clusters (seeded) whose few-shot accuracies are in the range of real ones.
Each section runs in its own subprocess so its peak memory (ru_maxrss) is its own. For every head the
per-episode reference (scikit-learn LogisticRegression(C=1, tol=1e-8) per episode for logreg, a Python loop per episode
for ncm, the release's distLinear + SGD loop for cosine) runs on the first ``--ref-episodes`` episodes of
the same episode set; its time is extrapolated linearly to all episodes, and accuracy is compared with the
batched head on exactly those episodes.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from torch import nn

from s2m2.fewshot import evaluate_episodes_detailed, mean_ci95, sample_episodes

CLASSES, PER_CLASS, DIM = 20, 600, 640


def make_features(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(CLASSES, DIM, generator=gen)
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    return (0.3 * centers[labels] + torch.randn(len(labels), DIM, generator=gen)).relu(), labels


# ---- per-episode references -------------------------------------------------------------------------
def ref_logreg(feats, eps, n, C=1.0):
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    e, ways, shots = eps.support.shape
    accs = []
    with threadpool_limits(1):  # tiny per-episode problems: one BLAS thread is fastest
        for i in range(n):
            xs = feats[eps.support[i].reshape(-1)].numpy()
            xq = feats[eps.query[i][eps.query_mask[i]]].numpy()
            yq = np.repeat(np.arange(ways), eps.query_mask[i].sum(1).numpy())
            # Tight tolerance: the reference must be the optimum, not lbfgs' early stop (default tol 1e-4
            # leaves ~0.2 points of prediction noise on 1-shot).
            clf = LogisticRegression(C=C, max_iter=1000, tol=1e-8).fit(xs, np.repeat(np.arange(ways), shots))
            accs.append((clf.predict(xq) == yq).mean())
    return torch.tensor(accs)


def ref_ncm(feats, eps, n):
    accs = []
    for i in range(n):
        means = feats[eps.support[i]].mean(1)
        xq = feats[eps.query[i][eps.query_mask[i]]]
        yq = torch.arange(eps.ways).repeat_interleave(eps.query_mask[i].sum(1))
        pred = torch.nn.functional.cosine_similarity(xq.unsqueeze(1), means.unsqueeze(0), dim=-1).argmax(1)
        accs.append(float((pred == yq).float().mean()))
    return torch.tensor(accs)


def ref_cosine(feats, eps, n):
    """The release's per-episode protocol: fresh distLinear, SGD, 301 epochs of batches of 4."""
    accs = []
    for i in range(n):
        support = feats[eps.support[i].reshape(-1)]
        nsup = len(support)
        y = torch.arange(eps.ways).repeat_interleave(eps.shots)
        xq = feats[eps.query[i].reshape(-1)]
        yq = torch.arange(eps.ways).repeat_interleave(eps.query.shape[2])
        linear = nn.utils.parametrizations.weight_norm(nn.Linear(DIM, eps.ways, bias=False), "weight", dim=0)
        opt = torch.optim.SGD(linear.parameters(), lr=0.01, momentum=0.9, dampening=0.9, weight_decay=0.001)
        for _ in range(301):
            perm = np.random.permutation(nsup)
            for j in range(0, nsup, 4):
                idx = torch.from_numpy(perm[j:j + 4])
                x = support[idx]
                opt.zero_grad()
                nn.functional.cross_entropy(2.0 * linear(x / (x.norm(dim=1, keepdim=True) + 1e-5)), y[idx]).backward()
                opt.step()
        with torch.no_grad():
            accs.append(float((linear(xq / (xq.norm(dim=1, keepdim=True) + 1e-5)).argmax(1) == yq).float().mean()))
    return torch.tensor(accs)


SECTIONS = {  # name: (head, queries, reference, reference episodes divisor)
    "logreg": ("logreg", 15, ref_logreg, 1),
    "ncm": ("ncm", 15, ref_ncm, 1),
    "cosine": ("cosine", 15, ref_cosine, 10),
    "logreg_all": ("logreg", "all", ref_logreg, 4),
}


def run_section(name: str, args) -> dict:
    head, queries, reference, divisor = SECTIONS[name]
    feats, labels = make_features()
    rows = []
    total = {"batched_s": 0.0, "reference_s_extrapolated": 0.0}
    for shots in (1, 5):
        t0 = time.perf_counter()
        eps = sample_episodes(labels, 5, shots, queries, args.episodes, seed=0)
        t1 = time.perf_counter()
        out = evaluate_episodes_detailed(feats, labels, eps, head, device=args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        n_ref = max(1, args.ref_episodes // divisor)
        r0 = time.perf_counter()
        ref = reference(feats, eps, n_ref)
        r1 = time.perf_counter()
        ref_total = (r1 - r0) * args.episodes / n_ref
        ours_sub, ref_sub = mean_ci95(out.accuracy[:n_ref])[0], mean_ci95(ref)[0]
        rows.append({"shots": shots, "queries": queries, "episodes": args.episodes, "sampling_s": t1 - t0,
                     "head_s": t2 - t1, "accuracy": mean_ci95(out.accuracy), "info": out.info,
                     "reference_episodes": n_ref, "reference_s": r1 - r0, "reference_s_extrapolated": ref_total,
                     "accuracy_on_reference_episodes": {"batched": ours_sub, "reference": ref_sub,
                                                        "gap_points": ours_sub - ref_sub}})
        total["batched_s"] += t2 - t0
        total["reference_s_extrapolated"] += ref_total
    total["speedup"] = total["reference_s_extrapolated"] / total["batched_s"]
    return {"section": name, "head": head, "rows": rows, "total": total,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def markdown(results: list[dict], args) -> str:
    lines = ["| section | shots | batched (sample + fit + score) | accuracy (%) | reference episodes | reference time "
             "(extrapolated to all) | speed-up | acc. gap on ref. episodes (points) | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            lines.append(f"| {res['section']} | {r['shots']} | {r['sampling_s'] + r['head_s']:.2f} s | "
                         f"{r['accuracy'][0]:.2f} ± {r['accuracy'][1]:.2f} | {r['reference_episodes']} | "
                         f"{r['reference_s']:.1f} s ({r['reference_s_extrapolated']:.0f} s) | "
                         f"{r['reference_s_extrapolated'] / (r['sampling_s'] + r['head_s']):.0f}x | "
                         f"{r['accuracy_on_reference_episodes']['gap_points']:+.2f} | "
                         f"{res['peak_rss_mb']:.0f} MB |")
        t = res["total"]
        lines.append(f"| **{res['section']} total** | 1+5 | **{t['batched_s']:.2f} s** | | | "
                     f"({t['reference_s_extrapolated']:.0f} s) | {t['speedup']:.0f}x | | |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=10000)
    p.add_argument("--ref-episodes", type=int, default=200)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (default 0 = torch's; 1 is faster when other jobs oversubscribe the cores)")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--only", help=argparse.SUPPRESS)  # internal: run one section, print JSON
    p.add_argument("--out-md")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only:
        np.random.seed(0)
        torch.manual_seed(0)
        print(json.dumps(run_section(args.only, args)))
        return 0
    results = []
    for name in args.sections.split(","):
        cmd = [sys.executable, __file__, "--only", name, "--episodes", str(args.episodes),
               "--ref-episodes", str(args.ref_episodes), "--device", args.device]
        cmd += ["--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]["total"]), f"peak {results[-1]['peak_rss_mb']:.0f} MB", name, file=sys.stderr)
    header = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
              f"episodes {args.episodes}")
    table = markdown(results, args)
    print(header)
    print(table)
    if args.out_md:
        with open(args.out_md, "w") as f:
            f.write(header + "\n\n" + table + "\n\n```json\n" + json.dumps(results, indent=1) + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
