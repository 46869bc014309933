"""PseudonymSettings: the pseudonymisation key of both servers (snaplearn_common.pseudonym, D54).

A server's settings nest it (`pseudonym: PseudonymSettings = Field(default_factory=...)`):

  SNAPLEARN_PSEUDONYM_KEY               the key itself (environment only: a process listing
                                        shows every flag)
  --pseudonym-key-file PATH             SNAPLEARN_PSEUDONYM_KEY_FILE: a file holding it
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Self

from pydantic import Field, SecretStr, model_validator

from snaplearn_common.pseudonym import UserIds, load_key
from snaplearn_common.settings import Cli, Settings, SettingsConfigDict, none_for


class PseudonymSettings(Settings):
    """The pseudonymisation key of a server that puts user ids into events (both servers)."""

    model_config = SettingsConfigDict(env_prefix="SNAPLEARN_", env_ignore_empty=True)
    cli_group: ClassVar[str | None] = "privacy"

    pseudonym_key: Annotated[SecretStr | None, Cli(env_only=True)] = None
    pseudonym_key_file: Annotated[Path | None, Cli(metavar="PATH"), none_for("")] = Field(
        default=None,
        description="file holding the key (at least 16 bytes) that pseudonymises user ids before they "
        "enter events, the model, snapshots and checkpoints (keyed HMAC); unset with "
        "SNAPLEARN_PSEUDONYM_KEY unset: ids are kept as sent",
    )

    @model_validator(mode="after")
    def _one_usable_key(self) -> Self:
        if self.pseudonym_key is not None and self.pseudonym_key_file is not None:
            raise ValueError("give the pseudonym key once: SNAPLEARN_PSEUDONYM_KEY or --pseudonym-key-file")
        self.user_ids()  # a missing file or a short key stops the start, in words
        return self

    def user_ids(self) -> UserIds:
        """The ids this key gives (as sent when no key is set); reads the key file."""
        key = self.pseudonym_key.get_secret_value() if self.pseudonym_key is not None else None
        return UserIds(load_key(key, self.pseudonym_key_file))
