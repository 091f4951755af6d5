"""Prepared datasets (uint8 memory-mapped arrays) and batched image transforms."""
from s2m2.data.prepared import (PreparedDataError, PreparedSplit, PreparedWriter, check_trainable,
                                load_meta, open_split)
from s2m2.data.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform

__all__ = ["PreparedDataError", "PreparedSplit", "PreparedWriter", "check_trainable", "load_meta", "open_split",
           "EvalTransform", "IMAGENET_MEAN", "IMAGENET_STD"]
