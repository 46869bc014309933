"""Which versions of a model to serve (its version policy) and the states a version goes through.

The policy is Triton's, in the JSON form of its model configuration, read from a model-level
`<repository>/<model>/config.json` (beside the numbered version directories):

    {"version_policy": {"latest": {"num_versions": 2}}}
    {"version_policy": {"specific": {"versions": [1, 3]}}}
    {"version_policy": {"all": {}}}

Without one, the latest version alone is served, as in Triton. Torch-free and gRPC-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from snaplearn_vision.schema import VERSION_PATTERN, InvalidModelConfig

PolicyKind = Literal["latest", "specific", "all"]

# A version's states, as the repository extension (RepositoryIndex) names them.
READY = "READY"
LOADING = "LOADING"
UNLOADING = "UNLOADING"
UNAVAILABLE = "UNAVAILABLE"  # failed to load, or outside the policy, or unloaded on request


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    kind: PolicyKind = "latest"
    num_versions: int = 1
    versions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind == "latest" and self.num_versions < 1:
            raise InvalidModelConfig(
                f"version_policy latest.num_versions must be >= 1, got {self.num_versions}"
            )
        if self.kind == "specific" and not self.versions:
            raise InvalidModelConfig("version_policy specific.versions must list at least one version")

    def select(self, available: Sequence[str]) -> list[str]:
        """The versions to serve out of those on disk, oldest first."""
        ordered = sorted(set(available), key=int)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            wanted = set(self.versions)
            return [v for v in ordered if v in wanted]
        return ordered[-self.num_versions :]

    def describe(self) -> str:
        if self.kind == "all":
            return "all versions"
        if self.kind == "specific":
            return "versions " + ", ".join(self.versions)
        return "the latest version" if self.num_versions == 1 else f"the latest {self.num_versions} versions"

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> VersionPolicy:
        """From a model-level config.json's content; no "version_policy" means the default."""
        policy = data.get("version_policy")
        if policy is None:
            return cls()
        if not isinstance(policy, Mapping) or len(policy) != 1:
            raise InvalidModelConfig(
                f'version_policy must hold exactly one of "latest", "specific" or "all", got {_short(policy)}'
            )
        ((kind, body),) = policy.items()
        if not isinstance(body, Mapping):
            raise InvalidModelConfig(f"version_policy.{kind} must be an object, got {_short(body)}")
        if kind == "all":
            return cls(kind="all")
        if kind == "latest":
            count = body.get("num_versions", 1)
            if not isinstance(count, int) or isinstance(count, bool):
                raise InvalidModelConfig(
                    f"version_policy latest.num_versions must be an integer, got {count!r}"
                )
            return cls(kind="latest", num_versions=count)
        if kind == "specific":
            raw = body.get("versions", [])
            if not isinstance(raw, list):
                raise InvalidModelConfig(
                    f"version_policy specific.versions must be a list, got {_short(raw)}"
                )
            versions = tuple(str(v) for v in raw)
            bad = [v for v in versions if not VERSION_PATTERN.match(v)]
            if bad:
                raise InvalidModelConfig(
                    f"version_policy specific.versions must be positive integers, got {bad}"
                )
            return cls(kind="specific", versions=tuple(sorted(set(versions), key=int)))
        raise InvalidModelConfig(f'version_policy kind {kind!r} is not one of "latest", "specific" or "all"')


@dataclass(frozen=True, slots=True)
class VersionStatus:
    """One row of the repository index: a version and its state (reason: why it is not READY)."""

    name: str
    version: str
    state: str
    reason: str = ""


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
