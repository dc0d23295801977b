"""Turn a config dataclass into argparse flags, with each field's docstring as its ``--help`` text.

Field docstrings (a string literal right under the field, as torchtitan writes them) are read from the
source with ``ast``; the flags therefore cannot drift from the config they set.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing


def field_docs(cls) -> dict[str, str]:
    """``{field name: docstring}`` for a dataclass whose fields are followed by string literals."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    docs: dict[str, str] = {}
    body = tree.body[0].body
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of ``cls``; every default is None so only given flags override."""
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        help_text = f"{docs.get(field.name, '')} (default: {default})"
        hint = hints[field.name]
        args = typing.get_args(hint)
        if hint is bool:
            parser.add_argument(_flag(field.name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(hint) is list or any(typing.get_origin(a) is list for a in args):
            inner = next((typing.get_args(a)[0] for a in (hint, *args) if typing.get_origin(a) is list), str)
            parser.add_argument(_flag(field.name), nargs="+", type=inner, default=None, help=help_text)
        else:
            scalar = next((a for a in (hint, *args) if a in (int, float, str)), str)
            parser.add_argument(_flag(field.name), type=scalar, default=None, help=help_text)


def config_from_args(cls, args: argparse.Namespace, base=None):
    """A ``cls`` from ``base`` (or defaults) with every flag the user gave applied."""
    values = dataclasses.asdict(base) if base is not None else {}
    for field in dataclasses.fields(cls):
        given = getattr(args, field.name, None)
        if given is not None:
            values[field.name] = given
    return cls(**values)
