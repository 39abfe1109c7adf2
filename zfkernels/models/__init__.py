"""Networks built on zfkernels' ops: the paper's ZFNet."""

from .zfnet import RecordedPool, ZFNet, feature_sizes

__all__ = ["RecordedPool", "ZFNet", "feature_sizes"]
