"""Thin Python clients for SnapLearn's gRPC APIs (deadlines, retries on UNAVAILABLE)."""

from snaplearn_client.client import RecommenderClient, VisionClient

__all__ = ["RecommenderClient", "VisionClient"]
