"""The ``illume`` command line: one module per verb group.

Contract:

- ``main(argv)`` parses ``argv`` and runs the chosen verb; its return value is the exit status.
  An ``IllumeError`` prints ``error: <reason>`` and exits 2; usage errors exit 2 through argparse.
- A verb is a ``configure(parser)`` function (adds the verb's flags and sets ``func``) named
  ``"module:function"``; the first line of its docstring is the verb's help. The core's verbs are
  modules of this package: ``generate`` (in-process sampling), ``client`` (the gRPC calls),
  ``eval`` (``evaluate``), ``loop`` (the in-process loop), ``simulate`` (a simulated critic against
  a server), ``study`` (the ILLUME study of docs/STUDY.md). Other packages add verbs as entry
  points of the group ``illume.cli``; ``services`` adds ``serve`` and ``tune`` this way
  (``pyproject.toml``), so the core never imports
  ``services`` or Ray, and an install without ``services`` has no such verbs.
- A verb's module is imported and its flags added only when that verb is chosen (or
  ``verb_parser`` asks for it); the listing reads each help line from the source, so
  ``illume --help`` imports no verb module.
- The config-backed verbs (``loop``, ``eval``, ``serve``, ``tune``) take their settings flags from
  their pydantic config models through ``illume.cli.config_flags``, and set ``config_flags`` (the
  bindings) and ``build_config`` (parsed args -> the config the verb runs with) as parser
  defaults. The binding is pydantic-settings' CLI source rather than typer: it adds a model's
  fields (names, types, constraints, descriptions) to the argparse parsers every other verb and
  test already uses, while typer would replace argparse throughout and still need one function
  parameter per field. Request-style and operational flags (``--model``, ``--image``, ``--data``,
  ``--out``, ``--json``, ...) stay plain argparse options.
- ``offline()`` is the one place that keeps Hugging Face libraries off the network; every verb that
  loads a model calls it first.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from importlib.machinery import PathFinder
from pathlib import Path

Configure = Callable[[argparse.ArgumentParser], None]

ENTRY_POINT_GROUP = "illume.cli"
# The core's verbs, in the order ``illume --help`` lists them (then the entry points' verbs).
CORE_VERBS = {
    "generate": "illume.cli.generate:configure",
    "client": "illume.cli.client:configure",
    "eval": "illume.cli.evaluate:configure",
    "loop": "illume.cli.loop:configure",
    "simulate": "illume.cli.simulate:configure",
    "study": "illume.cli.study:configure",
}


def offline() -> None:
    """Models load from local directories only: nothing is ever fetched from a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def resolve_model(model: str | None) -> Path:
    """The ``--model`` directory, or the packaged default model when none is given."""
    if model:
        return Path(model)
    from illume.models.default import packaged_model_dir

    packaged = packaged_model_dir()
    if packaged is None:
        raise SystemExit("error: --model is required (this checkout has no packaged default model)")
    return packaged


class _Verbs(argparse._SubParsersAction):
    """Sub-parsers whose flags are added when their verb is chosen."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pending: dict[str, Configure] = {}

    def add_verb(self, name: str, help_text: str, configure: Configure) -> None:
        self.add_parser(name, help=help_text, description=help_text)
        self.pending[name] = configure

    def configure(self, name: str) -> argparse.ArgumentParser:
        parser = self._name_parser_map[name]
        configure = self.pending.pop(name, None)
        if configure is not None:
            configure(parser)
        return parser

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if values and values[0] in self._name_parser_map:
            self.configure(values[0])
        super().__call__(parser, namespace, values, option_string)


def _load(value: str) -> Configure:
    module, _, function = value.partition(":")
    return getattr(importlib.import_module(module), function)


def _source(module: str) -> Path:
    """The source file of ``module``, found without importing it or its packages."""
    top, *subs = module.split(".")
    spec = importlib.util.find_spec(top)  # a top-level name is found, not imported
    for i in range(len(subs)):
        spec = PathFinder.find_spec(".".join([top, *subs[: i + 1]]), spec.submodule_search_locations)
    return Path(spec.origin)


def _help(value: str) -> str:
    """The first docstring line of ``module:function``, read from the source without importing it."""
    module, _, function = value.partition(":")
    try:
        tree = ast.parse(_source(module).read_text())
    except (ImportError, AttributeError, TypeError, ValueError, OSError, SyntaxError):
        return f"(from {value})"
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == function:
            doc = ast.get_docstring(node)
            if doc:
                return doc.strip().splitlines()[0]
    return f"(from {value})"


def verb_targets() -> dict[str, str]:
    """Every verb ``illume`` knows here and its ``"module:function"``: the core's, then those of
    installed entry points (by name; a core verb's name is not taken over)."""
    from importlib.metadata import entry_points

    targets = dict(CORE_VERBS)
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name):
        targets.setdefault(ep.name, ep.value)
    return targets


def build_parser() -> argparse.ArgumentParser:
    """The whole parser; each verb's flags are added when the verb is parsed (see ``verb_parser``)."""
    parser = argparse.ArgumentParser(prog="illume", description="ILLUME model server and tools")
    verbs = parser.add_subparsers(dest="verb", required=True, action=_Verbs)
    for name, target in verb_targets().items():
        verbs.add_verb(name, _help(target), lambda parser, target=target: _load(target)(parser))
    return parser


def _verbs(parser: argparse.ArgumentParser) -> _Verbs:
    return next(a for a in parser._actions if isinstance(a, _Verbs))


def verb_parser(name: str, parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The sub-parser of verb ``name`` with its flags added."""
    return _verbs(parser or build_parser()).configure(name)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from illume.errors import IllumeError

    try:
        return int(args.func(args) or 0)
    except IllumeError as exc:
        print(f"error: {exc.reason}", file=sys.stderr)
        return 2
