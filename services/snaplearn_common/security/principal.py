"""Who is calling (a Principal) and what it may do: scopes per method and the tenant rule.

No gRPC here: the interceptor (interceptor.py) asks these questions and answers with a status.

Scopes: classify (vision inference and model metadata), recommend (Recommend, SimilarItems),
feedback (RecordFeedback), admin (model repository and student management). A method not in
the table needs admin: a new RPC is closed until someone decides who may call it.

Tenant rule (docs/DECISIONS.md, D46): a principal acts for a student when its tenants include
"*" (a trusted service, e.g. the gateway or a back office), or the user id is the principal's
own subject (a student's own app), or the user id starts with "<tenant>/" for one of its
tenants (a school's app: its students are "<school>/<id>").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum


class Scope(StrEnum):
    CLASSIFY = "classify"
    RECOMMEND = "recommend"
    FEEDBACK = "feedback"
    ADMIN = "admin"


ALL_SCOPES = frozenset(Scope)
ANY_TENANT = "*"
TENANT_SEPARATOR = "/"

_VISION = "/snaplearn.vision.v1.VisionService/"
_RECOMMENDER = "/snaplearn.recommender.v1.RecommenderService/"
_OIP = "/inference.GRPCInferenceService/"

# Methods anyone may call without a token: probes.
OPEN_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        _OIP + "ServerLive",
        _OIP + "ServerReady",
        _OIP + "ModelReady",
    }
)
# Methods any authenticated caller may call (when they are served at all).
AUTHENTICATED_METHODS = frozenset(
    {
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)
SCOPE_BY_METHOD: dict[str, Scope] = {
    _VISION + "Classify": Scope.CLASSIFY,
    _VISION + "ClassifyStream": Scope.CLASSIFY,
    _OIP + "ModelInfer": Scope.CLASSIFY,
    _OIP + "ServerMetadata": Scope.CLASSIFY,
    _OIP + "ModelMetadata": Scope.CLASSIFY,
    _OIP + "ModelConfig": Scope.CLASSIFY,
    _OIP + "ModelStatistics": Scope.CLASSIFY,
    _RECOMMENDER + "Recommend": Scope.RECOMMEND,
    _RECOMMENDER + "SimilarItems": Scope.RECOMMEND,
    # A teacher's dashboard reads one student's state: the tenant rule applies to its user_id.
    _RECOMMENDER + "GetStudentState": Scope.RECOMMEND,
    _RECOMMENDER + "RecordFeedback": Scope.FEEDBACK,
    # Erases a student (issue 20): an operator's call, never a student's or a teacher's.
    _RECOMMENDER + "ForgetStudent": Scope.ADMIN,
}


def scope_for(method: str) -> Scope | None:
    """The scope `method` needs; None for a method any authenticated caller may call."""
    if method in AUTHENTICATED_METHODS:
        return None
    return SCOPE_BY_METHOD.get(method, Scope.ADMIN)


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: its subject, scopes and the tenants it acts for."""

    subject: str
    scopes: frozenset[str] = field(default_factory=frozenset)
    tenants: frozenset[str] = field(default_factory=frozenset)
    expires_at: float | None = None  # Unix time; None: never (static tokens)

    def allows(self, scope: Scope | None) -> bool:
        return scope is None or scope.value in self.scopes or Scope.ADMIN.value in self.scopes

    def acts_for(self, user_id: str) -> bool:
        """The tenant rule (module docstring)."""
        if ANY_TENANT in self.tenants or user_id == self.subject:
            return True
        tenant, separator, rest = user_id.partition(TENANT_SEPARATOR)
        return bool(separator and rest and tenant in self.tenants)

    def refusal_for(self, user_ids: Iterable[str]) -> str | None:
        """Why this principal may not act for one of `user_ids`, or None when it may for all."""
        for user_id in user_ids:
            if user_id and not self.acts_for(user_id):
                return (
                    f"caller {self.subject!r} may not act for user {user_id[:64]!r}: user ids of a "
                    f"tenant are '<tenant>{TENANT_SEPARATOR}<id>' and the token's tenants do not cover it"
                )
        return None
