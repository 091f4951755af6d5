"""Few-shot evaluation on frozen features: episodes, heads, feature transforms, confidence intervals."""

from s2m2.fewshot.episodes import EpisodeError, Episodes, sample_episodes
from s2m2.fewshot.heads import HEADS, evaluate_episodes, evaluate_episodes_detailed
from s2m2.fewshot.stats import mean_ci95

__all__ = ["EpisodeError", "Episodes", "sample_episodes", "HEADS", "evaluate_episodes",
           "evaluate_episodes_detailed", "mean_ci95"]
