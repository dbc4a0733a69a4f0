"""Command lines built from dataclasses: ``python -m ptd_train.run`` and ``python -m ptd_train.compare``.

Each field of a config dataclass is a flag ``--<name>``; its metadata gives the help text
(``help``), the allowed values (``choices``) and the placeholder (``metavar``), and a
:class:`Section` the rest: ``no_help`` for the ``--no_<name>`` form of a flag that defaults to true,
``default_text`` for what a ``None`` default means. On top of argparse:

- a mistake is one line, ``<prog>: error: ...``, and exit code 2; the traceback only with
  ``--debug`` or ``PTD_DEBUG=1`` (:func:`run_command`);
- an unknown flag names the nearest known one;
- a negative number after a flag is its value, exponent forms too (``--lr -1e-4``);
- every option shows its default;
- nothing heavy is imported here, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import typing

from .config import UsageError

TRUE, FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _boolean(text: str) -> bool:
    if text.lower() in TRUE:
        return True
    if text.lower() in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def _boolean_or_auto(text: str) -> bool | None:
    return None if text.lower() == "auto" else _boolean(text)


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage and exits; one line instead, through run_command
        raise UsageError(message)


def _show(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _add_field(group, f: dataclasses.Field, kind, default, help_text: str | None, text: dict) -> list[str]:
    """Add the flag(s) of one field (``text``: its ``no_help`` and ``default_text``); returns their
    option strings."""
    meta = f.metadata
    help_text = meta.get("help", "") if help_text is None else help_text
    shown = text.get("default_text") if default is None else _show(default)
    if shown is not None:
        help_text += f" (default: {shown})"
    flag = f"--{f.name}"
    base = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
    if bool in base:
        optional = type(None) in typing.get_args(kind)
        group.add_argument(flag, type=_boolean_or_auto if optional else _boolean, nargs="?", const=True,
                           default=default, metavar="true|false|auto" if optional else "true|false", help=help_text,
                           dest=f.name)  # fmt: skip
        if default is True:
            no_help = text.get("no_help", f"The opposite of {flag}.")
            group.add_argument(f"--no_{f.name}", action="store_false", dest=f.name, help=no_help)
            return [flag, f"--no_{f.name}"]
        return [flag]
    convert = {int: _whole_number, float: _number}.get(base[0], str)
    metavar = meta.get("metavar") or {int: "N", float: "X"}.get(base[0], "TEXT")
    choices = meta.get("choices")
    if choices:
        metavar = "{" + ",".join(choices) + "}"
    group.add_argument(flag, type=convert, default=default, metavar=metavar, help=help_text, dest=f.name)
    return [flag]


@dataclasses.dataclass
class Section:
    """One group of flags in ``--help``: the fields ``names`` of ``config`` (None: all of them), with
    ``defaults`` and ``helps`` overriding the dataclass defaults and help texts."""

    title: str
    config: type
    names: list[str] | None = None
    defaults: dict = dataclasses.field(default_factory=dict)
    helps: dict = dataclasses.field(default_factory=dict)  # help texts that differ from the field's own
    texts: dict = dataclasses.field(default_factory=dict)  # name → {"no_help": ..., "default_text": ...}


class Command:
    """A command line over config dataclasses: build once, :meth:`parse` an argv into instances."""

    def __init__(self, prog: str, description: str, sections: list[Section], epilog: str = ""):
        self.parser = _Parser(prog=prog, usage="%(prog)s [options]", description=description, epilog=epilog,
                              formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
        self.fields: dict[type, list[str]] = {}
        self.options: list[str] = ["--help", "--debug"]
        groups: dict[str, argparse._ArgumentGroup] = {}
        for section in sections:
            hints = typing.get_type_hints(section.config)
            by_name = {f.name: f for f in dataclasses.fields(section.config)}
            names = section.names if section.names is not None else list(by_name)
            if section.title not in groups:
                groups[section.title] = self.parser.add_argument_group(section.title)
            group = groups[section.title]
            for name in names:
                f = by_name[name]
                default = section.defaults.get(name, f.default)
                self.options += _add_field(group, f, hints[name], default, section.helps.get(name),
                                           section.texts.get(name, {}))
                self.fields.setdefault(section.config, []).append(name)
        self.parser.add_argument("--debug", action="store_true",
                                 help="Show the full traceback of an error (also: environment variable PTD_DEBUG=1).")

    def parse(self, argv: list[str]) -> dict[type, object]:
        """{config class: instance} for ``argv``; a :class:`UsageError` for any mistake."""
        argv = _join_negative_values(list(argv), self.options)
        namespace, unknown = self.parser.parse_known_args(argv)
        if unknown:
            raise UsageError(self.unknown_message(unknown[0]))
        out = {}
        for config, names in self.fields.items():
            out[config] = config(**{name: getattr(namespace, name) for name in names})
        return out

    def unknown_message(self, token: str) -> str:
        if not token.startswith("-"):
            return f"unexpected argument {token!r}: every option is a flag with a value, e.g. --max_steps 50"
        name = token.split("=", 1)[0]
        near = difflib.get_close_matches(name, self.options, n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]}?" if near else "; see --help for the options"
        return f"unknown flag {name}{hint}"


def _join_negative_values(argv: list[str], options: list[str]) -> list[str]:
    """``--lr -1e-4`` → ``--lr=-1e-4``: argparse takes ``-1e-4`` for a flag (it reads ``-5`` and
    ``-.5`` as numbers, not exponent forms)."""
    out = []
    for token in argv:
        previous = out[-1] if out else ""
        if token.startswith("-") and previous in options and "=" not in previous and _is_number(token):
            out[-1] = f"{previous}={token}"
        else:
            out.append(token)
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def debugging(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("PTD_DEBUG", "").lower() in TRUE


def run_command(prog: str, body, argv: list[str] | None):
    """``body(argv)``, with a :class:`UsageError` printed as one line on stderr and exit code 2 (the
    traceback with ``--debug`` or ``PTD_DEBUG=1``). Under torchrun only rank 0 prints it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return body(argv)
    except UsageError as e:
        if debugging(argv):
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
