"""N-way K-shot episodes sampled for thousands of episodes at once, reproducibly.

An episode picks ``ways`` classes, then ``shots`` support and ``queries`` query images per class
without replacement. Everything is drawn from one ``torch.Generator`` seeded from a hash of
(seed, ways, shots, queries, episodes, class set), so the same arguments on the same features always
give the same episodes, on any machine, and changing any of them gives different ones.

Sampling is vectorised: a class choice is the first ``ways`` entries of an argsort of random keys over
the classes; images are ``shots + queries`` distinct uniform draws per class (rejection of the few rows
with a repeat) or, when that many images are a large part of a class or ``queries="all"``, the first
entries of an argsort of random keys over the class's images (padding sorts last). There is no Python
loop over episodes.

The release samples with an unseeded Python loop per episode; ours is seeded (spec §8).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import torch

# Episodes are generated in fixed-size blocks so the random stream, and therefore the episodes, do not
# depend on how much memory the machine has. Changing this constant changes every episode set.
_SAMPLING_BLOCK = 1024


class EpisodeError(ValueError):
    """The requested protocol cannot be sampled from these labels."""


@dataclass
class Episodes:
    """Indices into the feature rows for ``E`` episodes of ``ways`` classes.

    Attributes:
        support: LongTensor (E, ways, shots); ``support[e, j]`` are images of class ``classes[e, j]``.
        query: LongTensor (E, ways, Q); padded entries (``query_mask`` False) hold a valid but unused index.
        query_mask: BoolTensor (E, ways, Q); all True unless ``queries="all"`` with unequal class sizes.
        classes: LongTensor (E, ways) of the original labels; the episode label of ``classes[e, j]`` is j.
        ways, shots: ints; queries: the requested int, or "all".
        seed: the user seed; generator_seed: the derived seed actually used.
    """

    support: torch.Tensor
    query: torch.Tensor
    query_mask: torch.Tensor
    classes: torch.Tensor
    ways: int
    shots: int
    queries: int | Literal["all"]
    seed: int
    generator_seed: int

    def __len__(self) -> int:
        return self.support.shape[0]

    def __getitem__(self, index: slice) -> "Episodes":
        """A chunk of episodes (slice along E), sharing the protocol fields."""
        return Episodes(self.support[index], self.query[index], self.query_mask[index], self.classes[index],
                        self.ways, self.shots, self.queries, self.seed, self.generator_seed)

    def protocol(self) -> dict:
        """JSON-serialisable description of how these episodes were drawn."""
        return {"episodes": len(self), "ways": self.ways, "shots": self.shots, "queries": self.queries,
                "seed": self.seed, "generator_seed": self.generator_seed,
                "max_queries_per_class": int(self.query.shape[-1])}


def episode_seed(seed: int, ways: int, shots: int, queries: int | str, episodes: int,
                 class_ids: torch.Tensor, class_sizes: torch.Tensor) -> int:
    """63-bit generator seed from a SHA-256 of the protocol and the class set (labels and their sizes)."""
    text = (f"s2m2-episodes-v1|seed={seed}|ways={ways}|shots={shots}|queries={queries}|episodes={episodes}"
            f"|classes={class_ids.tolist()}|sizes={class_sizes.tolist()}")
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def _class_table(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group row indices by class.

    Returns:
        class_ids: (C,) sorted distinct labels.
        sizes: (C,) images per class.
        table: (C, M) row indices of each class in ascending order, M = max size; padding is -1.
    """
    order = torch.argsort(labels, stable=True)
    class_ids, sizes = torch.unique_consecutive(labels[order], return_counts=True)
    num_classes, max_size = len(class_ids), int(sizes.max())
    starts = torch.cumsum(sizes, 0) - sizes
    position = torch.arange(len(labels)) - torch.repeat_interleave(starts, sizes)
    table = torch.full((num_classes, max_size), -1, dtype=torch.long)
    table[torch.repeat_interleave(torch.arange(num_classes), sizes), position] = order
    return class_ids, sizes, table


def _distinct_draws(sizes: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct positions in [0, size) per entry of ``sizes`` (any shape S), in random order: (*S, k).

    Rejection sampling: draw k uniform positions, redraw the rows that contain a repeat. Accepted rows are
    uniform over ordered k-tuples without repetition. Used when k*k <= size (a repeat in under ~half the
    rows), where it touches k numbers per class instead of one random key per image.
    """
    flat_sizes = sizes.reshape(-1, 1)
    picks = (torch.rand(len(flat_sizes), k, generator=gen) * flat_sizes).long()
    while True:
        ordered = picks.sort(-1).values
        repeat = (ordered[:, 1:] == ordered[:, :-1]).any(-1)
        if not repeat.any():
            return picks.view(*sizes.shape, k)
        redo = torch.nonzero(repeat).squeeze(1)
        picks[redo] = (torch.rand(len(redo), k, generator=gen) * flat_sizes[redo]).long()


def sample_episodes(labels: torch.Tensor, ways: int, shots: int, queries: int | Literal["all"],
                    episodes: int, seed: int) -> Episodes:
    """Sample ``episodes`` N-way K-shot episodes from ``labels`` (LongTensor (N,)).

    ``queries="all"`` takes every image of each chosen class that is not in the support set (the release's
    protocol for mini-ImageNet / tiered / CIFAR-FS); Q is then the largest class size minus ``shots``, and
    ``query_mask`` marks the real entries of smaller classes.

    Raises:
        EpisodeError: fewer classes than ``ways``, or a class with fewer than ``shots + queries`` images.
    """
    labels = torch.as_tensor(labels).long().cpu().reshape(-1)
    if ways < 1 or shots < 1 or episodes < 1:
        raise EpisodeError(f"ways, shots and episodes must be >= 1 (got {ways}, {shots}, {episodes})")
    if queries != "all" and (not isinstance(queries, int) or queries < 1):
        raise EpisodeError(f"queries must be a positive int or 'all', got {queries!r}")
    class_ids, sizes, table = _class_table(labels)
    if len(class_ids) < ways:
        raise EpisodeError(f"{ways}-way episodes need at least {ways} classes; the labels have {len(class_ids)}")
    needed = shots + (1 if queries == "all" else queries)
    too_small = sizes < needed
    if too_small.any():
        bad = class_ids[too_small].tolist()
        raise EpisodeError(
            f"{shots} shots + {queries} queries need {needed} images per class, but {len(bad)} class(es) have "
            f"fewer (labels {bad[:10]}{'...' if len(bad) > 10 else ''}, smallest has {int(sizes.min())})")

    generator_seed = episode_seed(seed, ways, shots, queries, episodes, class_ids, sizes)
    gen = torch.Generator().manual_seed(generator_seed)
    num_classes, max_size = table.shape
    # Only the classes of an episode matter, so "all" pads to the largest class size in the whole set.
    per_class = max_size if queries == "all" else shots + queries
    # Filled block by block in place: with queries="all" these are the largest tensors (E x ways x ~600).
    support = torch.empty(episodes, ways, shots, dtype=torch.long)
    query = torch.empty(episodes, ways, per_class - shots, dtype=torch.long)
    query_mask = torch.empty(episodes, ways, per_class - shots, dtype=torch.bool)
    classes = torch.empty(episodes, ways, dtype=torch.long)
    for start in range(0, episodes, _SAMPLING_BLOCK):
        block = min(_SAMPLING_BLOCK, episodes - start)
        rows_slice = slice(start, start + block)
        chosen = torch.argsort(torch.rand(block, num_classes, generator=gen), dim=1)[:, :ways]  # (B, ways)
        chosen_sizes = sizes[chosen]  # (B, ways)
        if per_class * per_class <= int(sizes.min()):
            picks = _distinct_draws(chosen_sizes, per_class, gen)
        else:
            keys = torch.rand(block, ways, max_size, generator=gen)
            valid = torch.arange(max_size) < chosen_sizes.unsqueeze(-1)  # (B, ways, M)
            keys.masked_fill_(~valid, 2.0)  # padding sorts after every real image
            if per_class < max_size:
                picks = torch.topk(keys, per_class, dim=-1, largest=False, sorted=True).indices
            else:
                picks = torch.argsort(keys, dim=-1)
        rows = torch.gather(table[chosen], 2, picks)  # (B, ways, per_class); -1 where padding
        support[rows_slice] = rows[..., :shots]
        query_rows = rows[..., shots:]
        mask = query_rows >= 0
        # Padding points at the class's first support image: a valid row, ignored through the mask.
        query[rows_slice] = torch.where(mask, query_rows, rows[..., :1])
        query_mask[rows_slice] = mask
        classes[rows_slice] = class_ids[chosen]
    return Episodes(support=support, query=query, query_mask=query_mask, classes=classes, ways=ways, shots=shots,
                    queries=queries, seed=seed, generator_seed=generator_seed)
