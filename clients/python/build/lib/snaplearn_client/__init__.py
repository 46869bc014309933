"""Thin Python clients for SnapLearn's gRPC APIs (deadlines, retries on UNAVAILABLE)."""

from snaplearn_client.client import ClassifyOutcome, RecommenderClient, VisionClient

__all__ = ["ClassifyOutcome", "RecommenderClient", "VisionClient"]
