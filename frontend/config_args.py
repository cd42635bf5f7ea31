"""Command-line flags generated from the settings tables (``EngineConfig``, ``ServerOptions``), so a setting is
defined in one place and reaches ``pagedserve serve|generate`` without being copied by hand.

A field ``max_num_seqs`` becomes ``--max-num-seqs`` (vLLM's spelling) with the field's type, default, help,
choices and aliases; a bool field becomes ``--x/--no-x`` as in vLLM. vLLM flags for features not built yet
(``ipc.config.NOT_SUPPORTED_YET``) are accepted by the parser only to fail with "not supported yet" (exit 2).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ipc.config import NOT_SUPPORTED_YET, ConfigField, EngineConfig, NotSupportedYet, config_fields


def add_config_args(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """One flag per field of ``cls`` that carries an ``Arg``."""
    group = parser.add_argument_group(title)
    for field in config_fields(cls).values():
        _add_field(group, field)


def _add_field(group: argparse._ArgumentGroup, field: ConfigField) -> None:
    arg = field.arg
    flags = [field.flag, *arg.aliases]
    if field.value_type is bool:
        group.add_argument(*flags, dest=field.name, action=argparse.BooleanOptionalAction, default=field.default,
                           help=arg.help)
        for negative in arg.negative_aliases:
            group.add_argument(negative, dest=field.name, action="store_false",
                               help=f"Same as --no-{field.flag[2:]} (vLLM's spelling).")
        return
    help_text = arg.help if field.default is None else f"{arg.help} (default: {_show(field.default)})"
    kwargs: dict[str, Any] = {"dest": field.name, "default": field.default, "help": help_text}
    if arg.choices is not None:
        kwargs["choices"] = arg.choices
    if arg.metavar is not None:
        kwargs["metavar"] = arg.metavar
    if arg.nargs is not None:
        kwargs["nargs"] = arg.nargs
        kwargs["type"] = _list_item
        kwargs["action"] = _FlattenList
    else:
        kwargs["type"] = field.value_type
    group.add_argument(*flags, **kwargs)


def _show(default: Any) -> str:
    return " ".join(default) if isinstance(default, list) else str(default)


def _list_item(text: str) -> list[str]:
    """One item of a list flag; vLLM's JSON spelling (``--allowed-origins '["a", "b"]'``) works too."""
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise argparse.ArgumentTypeError(f"not a JSON list of strings: {text}") from None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise argparse.ArgumentTypeError(f"not a JSON list of strings: {text}")
        return value
    return [text]


class _FlattenList(argparse.Action):
    """``--flag a b`` and ``--flag '["a", "b"]'`` both store ``["a", "b"]``."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, [item for items in values for item in items])


def values_from_args(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The parsed value of each of ``cls``'s flags, keyed by field name."""
    return {name: getattr(args, name) for name in config_fields(cls)}


# ------------------------------------------------------------------------------------------ engine flags


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The positional MODEL (vLLM's ``serve MODEL``), every ``EngineConfig`` flag, and the not-yet-supported ones."""
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help="Same as --model.")
    add_config_args(parser, EngineConfig, "engine (EngineConfig)")
    add_not_supported_args(parser)


def engine_config_from_args(args: argparse.Namespace, **extra: Any) -> EngineConfig:
    from ipc.config import engine_config_from_kwargs

    values = values_from_args(args, EngineConfig)
    values["model"] = values["model"] or args.model_tag
    values.update(extra)
    return engine_config_from_kwargs(**values)


# ------------------------------------------------------------------------------------------ not supported yet


class _NotSupportedYetAction(argparse.Action):
    def __init__(self, option_strings: list[str], dest: str, name: str, spec: NotSupportedYet, **kwargs: Any):
        super().__init__(option_strings, dest, **kwargs)
        self.name = name
        self.spec = spec

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        value = True if self.spec.switch else (" ".join(values) if isinstance(values, list) else values)
        try:
            self.spec.check(self.name, value)
        except ValueError as exc:
            parser.error(str(exc))


def add_not_supported_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("vLLM flags for features not built yet (they fail with 'not supported yet')")
    for name, spec in NOT_SUPPORTED_YET.items():
        flags = ["--" + name.replace("_", "-"), *spec.aliases]
        nargs = 0 if spec.switch else spec.nargs
        allowed = f" (accepted: {', '.join(spec.allowed)})" if spec.allowed else ""
        group.add_argument(*flags, dest=f"_not_supported_{name}", action=_NotSupportedYetAction, name=name,
                           spec=spec, nargs=nargs, default=argparse.SUPPRESS, metavar=None if nargs == 0 else "VALUE",
                           help=f"Not supported yet: {spec.feature}{allowed}.")
