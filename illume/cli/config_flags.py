"""Flags of a config-backed verb, taken from the fields of its pydantic config model.

Contract:

- A verb lists its ``Flag`` bindings: the dotted path of a field in its config model (``train.lora_r``),
  optionally another spelling (``lr`` for ``train.learning_rate``, kept from earlier releases),
  further paths that take the same value (``--seed`` seeds the loop, the snapshot and the training),
  or another flag whose value it takes when it is not given itself (``--lora-alpha``: 2 x
  ``--lora-r``).
- ``ConfigFlags(model, flags, defaults).add_to(parser)`` adds one option per binding, in its own
  argument group: kebab-case name, the field's type and constraints, the field's description as the
  help and, as the default shown, the value in ``defaults`` (the config that applies when no flag
  is given, e.g. ``illume serve``'s embedded default rather than the field's own default). Booleans
  get ``--x``/``--no-x``; tuples take the flag repeated or comma-separated values; ``None`` is
  None.
- ``given(args)`` is the flags on the command line (validated against the field's constraints, an
  error exits through the parser like any other usage error); ``apply(config, args)`` returns a
  copy of ``config`` with them set and validated as a whole; ``build(args)`` applies them to
  ``defaults``.
- A flag that is not given leaves the field alone, so a config read from a file keeps its values.

Mechanism: pydantic-settings' ``CliSettingsSource`` connected to the verb's own argparse parser
(``root_parser``). It was chosen over typer because the rest of the CLI is argparse (the request
verbs, nested ``illume client`` verbs, the lazy verb loading and the tests that parse argv), and
``CliSettingsSource`` adds a model's fields to an existing argparse parser and turns the parsed
strings back into field values, while typer would replace argparse everywhere and has no binding
to a model's fields (each field would again be a function parameter). The source sees a flat model
built here from the bound fields (``pydantic.create_model``), so a verb exposes a chosen subset of a
deep config (``AppConfig``) under short names instead of every nested field as a dotted flag.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Generic, NoReturn, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.fields import FieldInfo

M = TypeVar("M", bound=BaseModel)
_SEQUENCE_METAVAR = re.compile(r"^(?:tuple|list)\[(.*),\.\.\.\]$")


@dataclass(frozen=True)
class Flag:
    """One flag bound to a field (``path``, dotted) of a verb's config model."""

    path: str
    name: str | None = None  # the flag's spelling in snake_case (default: the field's name)
    also: tuple[str, ...] = ()  # more fields that take the same value
    follows: str | None = None  # when not given, take factor x this flag's value if that is given
    factor: int = 1

    @property
    def flag(self) -> str:
        return self.name or self.path.rsplit(".", 1)[-1]

    @property
    def paths(self) -> tuple[str, ...]:
        return (self.path, *self.also)

    @property
    def option(self) -> str:
        return "--" + self.flag.replace("_", "-")


def train_flags(at: str) -> list[Flag]:
    """The ``TrainConfig`` flags at ``at`` (``train`` in ``LoopConfig``, ``tuning.train`` in
    ``AppConfig``), spelled as ``illume loop`` always did (``--lr``, ``--train-batch-size``, ``--init``)."""
    return [
        Flag(f"{at}.learning_rate", "lr"),
        Flag(f"{at}.lr_schedule"),
        Flag(f"{at}.epochs"),
        Flag(f"{at}.batch_size", "train_batch_size"),
        Flag(f"{at}.max_steps"),
        Flag(f"{at}.weight_decay"),
        Flag(f"{at}.max_grad_norm"),
        Flag(f"{at}.lora_r"),
        Flag(f"{at}.lora_alpha", follows="lora_r", factor=2),
        Flag(f"{at}.lora_dropout"),
        Flag(f"{at}.lora_projections"),
        Flag(f"{at}.init_from", "init"),
    ]


class _Shown:
    """A default shown in the help that is not a value (e.g. ``2 x --lora-r``)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text


def model_field(model: type[BaseModel], path: str) -> FieldInfo:
    """The field at dotted ``path`` of ``model`` (each step but the last a nested model)."""
    *parents, leaf = path.split(".")
    for name in parents:
        annotation = model.model_fields[name].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise TypeError(f"{path}: {name} is not a nested model")
        model = annotation
    if leaf not in model.model_fields:
        raise KeyError(f"{model.__name__} has no field {leaf!r} ({path})")
    return model.model_fields[leaf]


def get_path(config: Any, path: str) -> Any:
    """The value at dotted ``path`` of a model instance (or a nested dict)."""
    for name in path.split("."):
        config = config[name] if isinstance(config, Mapping) else getattr(config, name)
    return config


def _set_path(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for name in parents:
        data = data[name]
    data[leaf] = value


class ConfigFlags(Generic[M]):
    """The bound flags of one verb (see the module docstring)."""

    def __init__(self, model: type[M], flags: Sequence[Flag], defaults: M | None = None) -> None:
        self.model = model
        self.defaults = defaults if defaults is not None else model()
        self.flags: dict[str, Flag] = {}
        for flag in flags:
            if flag.flag in self.flags:
                raise ValueError(f"flag {flag.option} is bound twice")
            self.flags[flag.flag] = flag
        for flag in self.flags.values():
            if flag.follows is not None and flag.follows not in self.flags:
                raise ValueError(f"{flag.option} follows an unknown flag {flag.follows!r}")
        self.settings = self._settings_model()
        self._parser: argparse.ArgumentParser | None = None
        self._source: Any = None

    def field(self, name: str) -> FieldInfo:
        """The config field flag ``name`` takes its type, constraints and help from."""
        return model_field(self.model, self.flags[name].path)

    def _settings_model(self) -> type[BaseModel]:
        fields: dict[str, Any] = {}
        for name, flag in self.flags.items():
            info = self.field(name)
            for path in flag.also:
                model_field(self.model, path)  # fails early on a wrong path
            annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
            if flag.follows is not None:
                factor = f"{flag.factor} x " if flag.factor != 1 else ""
                shown: Any = _Shown(factor + self.flags[flag.follows].option)
            else:
                shown = get_path(self.defaults, flag.path)
            fields[name] = (annotation, Field(shown, description=info.description))
        return create_model(f"{self.model.__name__}Flags", __config__=ConfigDict(extra="forbid"), **fields)

    def add_to(
        self, parser: argparse.ArgumentParser, title: str | None = None, description: str | None = None
    ) -> None:
        """Add the flags to ``parser`` (in an argument group) and remember it for usage errors."""
        from pydantic_settings import CliSettingsSource

        clash = sorted(set(self.flags) & {a.dest for a in parser._actions})
        if clash:
            raise ValueError(f"{parser.prog}: {clash} are both explicit and config flags")
        group = parser.add_argument_group(title or f"{self.model.__name__} fields", description)

        def add_argument(_parser: Any, *names: str, **kwargs: Any) -> argparse.Action:
            # Every config flag is a long option, one-letter ones too (--n, not -n).
            names = tuple("-" + n if len(n) == 2 and n[0] == "-" != n[1] else n for n in names)
            if kwargs.get("action") == "append":
                kwargs["metavar"] = _SEQUENCE_METAVAR.sub(r"\1", kwargs.get("metavar") or "")
                repeatable = " Repeatable or comma-separated. (default:"
                kwargs["help"] = (kwargs.get("help") or "").replace(" (default:", repeatable, 1)
            return group.add_argument(*names, **kwargs)

        self._source = CliSettingsSource(
            self.settings,  # type: ignore[arg-type]  # a plain model: nothing is read from the environment
            root_parser=parser,
            cli_kebab_case=True,
            cli_implicit_flags=True,  # --x and --no-x
            cli_parse_none_str="None",  # as the field descriptions say
            add_argument_method=add_argument,
        )
        self._parser = parser

    def given(self, args: argparse.Namespace) -> dict[str, Any]:
        """The flags on the command line (by flag name), as validated field values."""
        if self._source is None:
            raise RuntimeError("add_to(parser) first")
        raw = self._source(parsed_args=args)()
        try:
            values = self.settings.model_validate(raw)
        except ValidationError as error:
            self._error(error, by_flag=True)
        given = {name: getattr(values, name) for name in raw}
        for name, flag in self.flags.items():
            if name not in given and flag.follows in given:
                given[name] = given[flag.follows] * flag.factor
        return given

    def apply(self, config: M, args: argparse.Namespace) -> M:
        """``config`` with the given flags set (every bound field), validated as a whole."""
        data = config.model_dump()
        for name, value in self.given(args).items():
            for path in self.flags[name].paths:
                _set_path(data, path, value)
        try:
            return type(config).model_validate(data)
        except ValidationError as error:
            self._error(error, by_flag=False)

    def build(self, args: argparse.Namespace) -> M:
        """The defaults with the given flags set."""
        return self.apply(self.defaults, args)

    def _error(self, error: ValidationError, by_flag: bool) -> NoReturn:
        lines = []
        for e in error.errors():
            where = ".".join(str(part) for part in e["loc"])
            if by_flag and e["loc"] and e["loc"][0] in self.flags:
                where = self.flags[str(e["loc"][0])].option
            lines.append(f"{where}: {e['msg']}")
        assert self._parser is not None
        self._parser.error("; ".join(lines))  # exits (status 2)
