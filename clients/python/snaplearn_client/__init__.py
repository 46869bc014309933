"""Thin Python clients for SnapLearn's gRPC APIs (deadlines, retries on UNAVAILABLE)."""

from snaplearn_client.client import (
    ChannelSecurity,
    ClassifyOutcome,
    RecommenderClient,
    VisionClient,
    feature_filter,
)

__all__ = ["ChannelSecurity", "ClassifyOutcome", "RecommenderClient", "VisionClient", "feature_filter"]
