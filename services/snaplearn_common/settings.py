"""One settings declaration per process: its command-line flags and environment variables.

A process declares one subclass of `Settings` (a pydantic-settings BaseSettings). Each field
is a flag (`--max-queue-size`, from the field name in kebab case) and an environment variable
(`<env_prefix><FIELD_NAME>`, e.g. SNAPLEARN_VISION_MAX_QUEUE_SIZE); a flag beats its
environment variable, which beats the field's default. Booleans are `--x/--no-x`. `--help`
lists every flag with its environment variable and default; a value that fails validation
exits 2 with the usage and a message naming both the flag and the environment variable.

    class VisionSettings(Settings):
        model_config = SettingsConfigDict(env_prefix="SNAPLEARN_VISION_")
        cli_prog: ClassVar[str] = "snaplearn-vision"

        port: Annotated[int, Field(ge=0, le=65535, description="gRPC port (0 picks one)")] = 50051
        shutdown_grace_s: Annotated[float, Cli(flag="--shutdown-grace")] = 10.0
        bus: BusSettings = Field(default_factory=BusSettings)

    settings = VisionSettings.from_argv()          # main(): sys.argv[1:] and os.environ
    settings = VisionSettings.from_env({}, port=0)  # tests: values, then the given environment

A field whose flag or variable keeps an older name says so: `Cli(flag=...)` for the flag,
pydantic's `validation_alias="FULL_ENV_NAME"` for the variable (pydantic-settings reads an
aliased field from exactly that variable, without the prefix). `Cli(env_only=True)` makes a
field environment-only (secrets: a process listing shows every flag).

A field whose type is another `Settings` class (BusSettings) nests: its fields keep their own
flags and variables (no prefix of the outer class) and appear as one group in `--help`.

pydantic-settings reads the environment; this module generates the argparse flags from the
same fields. Its own CLI source (CliSettingsSource) was not used: it derives a flag from a
field's alias, which here is the environment variable's name, and spells nested fields
`--bus.backend`, so neither today's flags (`--bus`, `--bus-path`) nor today's variables
(SNAPLEARN_BUS) could keep their names.
"""

from __future__ import annotations

import argparse
import inspect
import os
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, Literal, Self

from pydantic import BeforeValidator, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

__all__ = [
    "Cli",
    "InvalidSettings",
    "Settings",
    "SettingsConfigDict",
    "none_for",
]


@dataclass(frozen=True, slots=True)
class Cli:
    """How one field appears on the command line; put it in the field's `Annotated[...]`.

    flag: the flag's name when it is not --<field-name> (names that exist today).
    env_only: no flag at all (secrets: a process listing shows the command line).
    group: the title of the --help group the flag is listed in.
    hidden: accepted but left out of --help (set by a supervisor for its workers).
    metavar: the placeholder shown in --help.
    repeatable: a list field whose flag may be given several times, one value each (its
      environment variable holds a JSON list).
    """

    flag: str | None = None
    env_only: bool = False
    group: str | None = None
    hidden: bool = False
    metavar: str | None = None
    repeatable: bool = False


class InvalidSettings(ValueError):
    """Settings failed validation; the message names each bad value's flag and variable."""


def none_for(*texts: str) -> BeforeValidator:
    """A validator that reads any of `texts` (case-insensitive, stripped) as None.

    For optional fields whose flag accepts a word for "not set", e.g.
    `Annotated[int | None, none_for("", "model")]`.
    """
    words = {text.strip().lower() for text in texts}

    def convert(value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() in words else value

    return BeforeValidator(convert)


# The environment a settings object is being built from (None: os.environ). A context variable
# so that from_env({...}) in one thread or task never leaks into another.
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("snaplearn_settings_environ", default=None)


class _Environment(EnvSettingsSource):
    """pydantic-settings' environment source, reading each field from exactly the one variable
    --help names for it (see _env_name), by name, in `_ENVIRON` when set, else os.environ.
    A nested Settings field is skipped: it reads its own variables when it is built."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {}  # read per field in get_field_value

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if _nested_class(field) is not None:
            return None, field_name, False
        environ = _ENVIRON.get()
        value = (os.environ if environ is None else environ).get(
            _env_name(self.settings_cls, field_name, field)
        )
        if value == "" and self.env_ignore_empty:
            value = None
        return value, field_name, self.field_is_complex(field)


class Settings(BaseSettings):
    """Base of every process's settings (and of the groups they nest, such as BusSettings).

    Frozen, and unknown names are errors. A subclass sets `model_config =
    SettingsConfigDict(env_prefix="SNAPLEARN_<PROCESS>_")`; `cli_prog` names the program in
    the usage line, `cli_group` titles a nested class's group in --help, and the class
    docstring's first paragraph is --help's description.
    """

    model_config = SettingsConfigDict(frozen=True, extra="forbid", validate_by_name=True)

    cli_prog: ClassVar[str | None] = None
    cli_group: ClassVar[str | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Values given in code (flags are passed this way), then the environment; no .env files.
        return init_settings, _Environment(settings_cls)

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, /, **values: Any) -> Self:
        """Settings from `values`, then `environ` (os.environ when None), then the defaults.

        Raises InvalidSettings, whose message names the flag and variable of each bad value.
        """
        token = _ENVIRON.set(environ)
        try:
            return cls._build(values, given=set(), path=())
        finally:
            _ENVIRON.reset(token)

    @classmethod
    def from_argv(
        cls, argv: Sequence[str] | None = None, *, environ: Mapping[str, str] | None = None
    ) -> Self:
        """Settings from command-line flags (sys.argv[1:] when None), then the environment,
        then the defaults; like argparse, exits 2 with the usage and a message on a bad value."""
        parser = cls.argument_parser()
        namespace = parser.parse_args(argv)
        given = set(vars(namespace))
        values: dict[str, Any] = {}
        for dest, value in vars(namespace).items():
            *outer, name = dest.split(".")
            node = values
            for part in outer:
                node = node.setdefault(part, {})
            node[name] = value
        token = _ENVIRON.set(environ)
        try:
            return cls._build(values, given=given, path=())
        except InvalidSettings as error:
            parser.error(str(error))
        finally:
            _ENVIRON.reset(token)

    @classmethod
    def _build(cls, values: Mapping[str, Any], *, given: set[str], path: tuple[str, ...]) -> Self:
        values = dict(values)
        problems: list[str] = []
        # Nested groups are built here rather than by their default_factory, so that their
        # errors are reported under their own flags and variables.
        for name, field in cls.model_fields.items():
            nested = _nested_class(field)
            if nested is None or isinstance(values.get(name), nested):
                continue
            inner = values.get(name, {})
            try:
                values[name] = nested._build(inner, given=given, path=(*path, name))
            except InvalidSettings as error:
                problems.append(str(error))
                values[name] = nested.model_construct()  # so that this class's errors are found too
        try:
            settings = cls(**values)
        except ValidationError as error:
            problems.append(cls._explain(error, given, path))
        except SettingsError as error:
            problems.append(str(error))
        if problems:
            raise InvalidSettings("; ".join(problems))
        return settings

    @classmethod
    def _explain(cls, error: ValidationError, given: set[str], path: tuple[str, ...]) -> str:
        by_key: dict[str, _Option] = {}
        for option in _options(cls, path):
            if len(option.path) == len(path) + 1:
                by_key[option.name] = option
                alias = option.field.validation_alias
                if isinstance(alias, str):
                    by_key[alias] = option
                    by_key[alias.lower()] = option
        sentences = []
        for item in error.errors(include_url=False):
            message = str(item["msg"]).removeprefix("Value error, ")
            key = str(item["loc"][0]) if item["loc"] else None
            found = by_key.get(key) if key is not None else None
            if found is None:
                if item["type"] == "extra_forbidden":
                    message = f"unknown setting {key!r}"
                elif key is not None:
                    message = f"{key}: {message}"
                sentences.append(message)
                continue
            message = message[:1].lower() + message[1:]
            if found.secret:
                sentences.append(f"{found.names()}: {message}")
                continue
            source = found.flag if found.dest in given else found.env
            sentences.append(f"{found.names()}: {message}, got {item['input']!r} from {source}")
        return "; ".join(sentences)

    # -- the command line -------------------------------------------------------------------

    @classmethod
    def argument_parser(cls) -> argparse.ArgumentParser:
        """The parser of this class's flags; parse results are only the flags given."""
        doc = inspect.cleandoc(cls.__dict__.get("__doc__") or "")
        parser = argparse.ArgumentParser(
            prog=cls.cli_prog,
            description=doc.split("\n\n")[0] or None,
            epilog=_epilog(cls),
            argument_default=argparse.SUPPRESS,
        )
        add_arguments(parser, cls)
        return parser

    @classmethod
    def flag_of(cls, name: str) -> str | None:
        """The flag of field `name` (None for an environment-only field)."""
        return _option(cls, name).flag

    @classmethod
    def env_of(cls, name: str) -> str:
        """The environment variable of field `name`."""
        return _option(cls, name).env

    @classmethod
    def env_names(cls) -> list[str]:
        """Every environment variable this class reads (nested classes' too), in field order."""
        return [option.env for option in _options(cls)]


def add_arguments(
    parser: argparse.ArgumentParser, settings_cls: type[Settings], prefix: tuple[str, ...] = ()
) -> None:
    """Add `settings_cls`'s flags to `parser` (nested classes each in their own group).

    Every flag's default is argparse.SUPPRESS, so a parse result holds only the flags given,
    under dests "<field>" or "<outer field>.<field>"; `Settings.from_argv` does the rest.
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for option in _options(settings_cls, prefix):
        if option.flag is None:
            continue
        title = option.group
        target: argparse.ArgumentParser | argparse._ArgumentGroup = parser
        if title is not None:
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            target = groups[title]
        kwargs: dict[str, Any] = {"dest": option.dest, "default": argparse.SUPPRESS}
        kwargs["help"] = argparse.SUPPRESS if option.hidden else option.help()
        if option.boolean:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = option.metavar
        if option.repeatable:
            kwargs["action"] = "append"
        target.add_argument(option.flag, **kwargs)


# -- fields as options ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Option:
    owner: type[Settings]
    name: str
    field: FieldInfo
    path: tuple[str, ...]
    flag: str | None
    env: str
    group: str | None
    hidden: bool
    metavar: str | None
    boolean: bool
    secret: bool
    repeatable: bool = False

    @property
    def dest(self) -> str:
        return ".".join(self.path)

    def names(self) -> str:
        return self.env if self.flag is None else f"{self.flag} (env {self.env})"

    def help(self) -> str:
        description = (self.field.description or "").replace("%", "%%")
        facts = [f"repeatable; env {self.env}, a JSON list" if self.repeatable else f"env {self.env}"]
        default = self.default_text()
        if default is not None:
            facts.append(f"default {default}")
        joined = "; ".join(facts)
        return f"{description} ({joined})" if description else f"({joined})"

    def default_text(self) -> str | None:
        if self.field.default_factory is not None or self.field.is_required():
            return None
        value = self.field.default
        if self.secret:
            return None
        if self.boolean:
            return self.flag if value else f"--no-{self.flag.removeprefix('--') if self.flag else ''}"
        if value is None:
            return "unset"
        if isinstance(value, Enum):
            value = value.value
        text = str(value)
        return repr(text) if text == "" else text.replace("%", "%%")


def _options(settings_cls: type[Settings], prefix: tuple[str, ...] = ()) -> Iterator[_Option]:
    """Every leaf field of `settings_cls` (nested classes' fields inline), in declaration order."""
    for name, field in settings_cls.model_fields.items():
        nested = _nested_class(field)
        if nested is not None:
            yield from _options(nested, (*prefix, name))
            continue
        cli = next((item for item in field.metadata if isinstance(item, Cli)), Cli())
        env = _env_name(settings_cls, name, field)
        annotation = _strip_optional(field.annotation)
        boolean = annotation is bool
        secret = annotation is SecretStr
        if not cli.env_only and not cli.repeatable and _is_complex(annotation):
            raise TypeError(f"{settings_cls.__name__}.{name}: a flag takes one value; use Cli(env_only=True)")
        flag = None if cli.env_only else (cli.flag or "--" + name.replace("_", "-"))
        yield _Option(
            owner=settings_cls,
            name=name,
            field=field,
            path=(*prefix, name),
            flag=flag,
            env=env,
            group=cli.group or settings_cls.cli_group,
            hidden=cli.hidden,
            metavar=cli.metavar or _metavar(annotation, (flag or name).lstrip("-")),
            boolean=boolean,
            secret=secret,
            repeatable=cli.repeatable,
        )


def _env_name(settings_cls: type[BaseSettings], name: str, field: FieldInfo) -> str:
    """The one environment variable of a field: its validation_alias, else <env_prefix><NAME>."""
    alias = field.validation_alias
    if alias is not None and not isinstance(alias, str):
        raise TypeError(f"{settings_cls.__name__}.{name}: validation_alias must be one env var name")
    return (alias or str(settings_cls.model_config.get("env_prefix", "")) + name).upper()


def _option(settings_cls: type[Settings], name: str) -> _Option:
    for option in _options(settings_cls):
        if option.dest == name or (option.name == name and len(option.path) == 1):
            return option
    raise KeyError(f"{settings_cls.__name__} has no field {name!r}")


def _nested_class(field: FieldInfo) -> type[Settings] | None:
    annotation = field.annotation
    if isinstance(annotation, type) and issubclass(annotation, Settings):
        return annotation
    return None


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _is_complex(annotation: Any) -> bool:
    origin = typing.get_origin(annotation) or annotation
    return isinstance(origin, type) and issubclass(origin, (list, tuple, set, frozenset, dict, BaseSettings))


def _metavar(annotation: Any, name: str) -> str:
    if typing.get_origin(annotation) is Literal:
        return "{" + ",".join(str(arg) for arg in typing.get_args(annotation)) + "}"
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return "{" + ",".join(str(member.value) for member in annotation) + "}"
    return name.replace("-", "_").upper()


def _epilog(settings_cls: type[Settings]) -> str:
    lines = [
        "Every flag also reads the environment variable named after it; a flag beats its "
        "variable, which beats the default."
    ]
    env_only = [option.env for option in _options(settings_cls) if option.flag is None]
    if env_only:
        lines.append("Read from the environment only: " + ", ".join(env_only) + ".")
    return " ".join(lines)
