"""s2m2: S2M2 few-shot learning (Mangla et al., WACV 2020) in current PyTorch."""

__version__ = "0.1.0"
