"""Domain errors raised by the cores (batcher, model, recommender, event bus).

Cores know nothing of gRPC; the error interceptor (grpc_errors.py) maps each class
to a status code at the edge. Messages are written for client developers.
"""

from __future__ import annotations


class SnapLearnError(Exception):
    """Base of every error a client may see."""


class InvalidInput(SnapLearnError):
    """The request itself is wrong (bad image, empty user id, k out of range)."""


class Overloaded(SnapLearnError):
    """The server is at capacity (queue full); retry later with backoff."""


class DeadlineExpired(SnapLearnError):
    """The request's deadline passed before it could be served."""


class NotFound(SnapLearnError):
    """A named thing (model, version, item) does not exist."""


class FailedPrecondition(SnapLearnError):
    """The thing exists but is not in a state to serve (a model that failed to load); fix it first."""


class Unavailable(SnapLearnError):
    """The server cannot serve right now (model loading, shutting down, no snapshot yet)."""


class Cancelled(SnapLearnError):
    """The caller went away before the request was served."""
