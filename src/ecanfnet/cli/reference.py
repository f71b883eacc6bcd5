"""The Markdown reference of every `ecanfnet` command, rendered from the parser itself so it cannot drift.

    python -m ecanfnet.cli.reference --write docs/cli.md    # regenerate docs/cli.md (replaced atomically)
    python -m ecanfnet.cli.reference                        # print it

Everything is laid out here, not by argparse's help formatter, so the text does not depend on the
terminal's width or on the Python version's argparse.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Iterator, Sequence

from . import build_parser

REGENERATE = "python -m ecanfnet.cli.reference --write docs/cli.md"
USAGE_WIDTH = 100  # usage lines wrap here, whatever the terminal


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The whole reference for parser (default: the `ecanfnet` parser), as Markdown."""
    parser = parser or build_parser()
    commands = list(_subcommands(parser))
    lines = [f"_Generated from the argument parser by `{REGENERATE}`; edit src/ecanfnet/cli/, not this file._",
             "", f"# `{parser.prog}` command line", "", _inline(parser.description or ""), "",
             *_code_block("text", _usage(parser)), "",
             f"Every command takes `-h` / `--help`; `{parser.prog} --version` prints the version.", "",
             "| Command | What it does |", "| --- | --- |"]
    lines += [f"| [`{name}`](#{_anchor(sub.prog)}) | {_inline(summary)} |" for name, summary, sub in commands]
    for _, summary, sub in commands:
        lines += ["", *_command_section(sub, summary)]
    return "\n".join(lines) + "\n"


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    """(name, one-line help, parser) of each subcommand, in the order --help lists them."""
    for action in parser._actions:  # argparse has no public accessor for these
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                yield choice.dest, choice.help or "", action.choices[choice.dest]


def _command_section(parser: argparse.ArgumentParser, summary: str) -> list[str]:
    """One command: heading, one-line help, description, usage, arguments table, examples."""
    lines = [f"## `{parser.prog}`", "", f"*{_inline(summary)}*", ""]
    if parser.description:
        lines += [_inline(parser.description), ""]
    lines += [*_code_block("text", _usage(parser)), "", "| Argument | Default | Description |",
              "| --- | --- | --- |"]
    lines += [_argument_row(action, parser.prog) for action in _documented(parser)]
    examples = _examples(parser.epilog or "")
    if examples:
        lines += ["", "Examples:", "", *_code_block("sh", examples)]
    return lines


def _documented(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The arguments worth a row: all shown but -h; positionals first, as --help lists them."""
    shown = [a for a in _shown(parser) if not isinstance(a, argparse._HelpAction)]
    return [a for a in shown if not a.option_strings] + [a for a in shown if a.option_strings]


def _shown(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The parser's arguments that are not hidden, in the order they were added."""
    return [a for a in parser._actions if a.help is not argparse.SUPPRESS]


def _argument_row(action: argparse.Action, prog: str) -> str:
    """A table row: the argument as typed, its default (or "required"), its help text."""
    if action.required and action.option_strings:
        default = "required"
    elif _has_default(action):
        default = f"`{action.default}`"
    else:
        default = ""
    return f"| `{_invocation(action)}` | {default} | {_inline(_help_text(action, prog))} |"


def _has_default(action: argparse.Action) -> bool:
    """Whether the option has a value worth showing when left out (not None, an empty list, or a switch's off)."""
    return (bool(action.option_strings) and action.nargs != 0 and action.default is not None
            and action.default != [] and action.default is not argparse.SUPPRESS)


def _help_text(action: argparse.Action, prog: str) -> str:
    """The action's help with argparse's %(name)s placeholders filled in, as --help shows it."""
    text = action.help or ""
    return text % dict(vars(action), prog=prog) if "%" in text else text


def _invocation(action: argparse.Action) -> str:
    """How the argument is typed: `--top-k K`, `PATH [PATH ...]`, `--crop-scale MIN MAX`, `--fast`."""
    if not action.option_strings:
        return _arguments(action, action.dest)
    names = ", ".join(action.option_strings)
    return names if action.nargs == 0 else f"{names} {_arguments(action, action.dest.upper())}"


def _arguments(action: argparse.Action, default_metavar: str) -> str:
    """The value part of an argument, from its nargs and metavar (or choices) as argparse writes it."""
    if action.metavar is not None:
        metavar = action.metavar
    elif action.choices is not None:
        metavar = "{" + ",".join(map(str, action.choices)) + "}"
    else:
        metavar = default_metavar
    if isinstance(metavar, tuple):
        names = metavar
    else:
        names = (metavar,) * (action.nargs if isinstance(action.nargs, int) else 1)
    first = names[0]
    if action.nargs == argparse.ONE_OR_MORE:
        return f"{first} [{first} ...]"
    if action.nargs == argparse.ZERO_OR_MORE:
        return f"[{first} ...]"
    if action.nargs == argparse.OPTIONAL:
        return f"[{first}]"
    if action.nargs == argparse.PARSER:
        return f"{first} ..."
    return " ".join(names)


def _usage(parser: argparse.ArgumentParser) -> str:
    """`usage: PROG [options] POSITIONALS`, each mutually exclusive group at its first member, wrapped."""
    grouped = {a: g for g in parser._mutually_exclusive_groups for a in g._group_actions}
    parts, done = [], set()
    for action in sorted(_shown(parser), key=lambda a: not a.option_strings):  # options first, as argparse does
        group = grouped.get(action)
        if group is None:
            parts.append(_usage_part(action, optional=not action.required and bool(action.option_strings)))
        elif group not in done:
            done.add(group)
            inner = " | ".join(_usage_part(a, optional=False) for a in group._group_actions)
            parts.append(f"({inner})" if group.required else f"[{inner}]")
    return _wrap(parts, f"usage: {parser.prog} ")


def _usage_part(action: argparse.Action, *, optional: bool) -> str:
    """One argument in the usage line: its shortest option and value, in brackets when it may be left out."""
    if not action.option_strings:
        return _arguments(action, action.dest)
    name = min(action.option_strings, key=len)
    text = name if action.nargs == 0 else f"{name} {_arguments(action, action.dest.upper())}"
    return f"[{text}]" if optional else text


def _wrap(parts: Sequence[str], prefix: str) -> str:
    """prefix and parts joined by spaces, wrapped at USAGE_WIDTH between parts, continuation lines aligned."""
    lines = [prefix + parts[0]] if parts else [prefix.rstrip()]
    for part in parts[1:]:
        if len(lines[-1]) + 1 + len(part) > USAGE_WIDTH:
            lines.append(" " * len(prefix) + part)
        else:
            lines[-1] += " " + part
    return "\n".join(lines)


def _examples(epilog: str) -> str:
    """The command lines of an `examples:` epilog (see _options.examples_epilog), dedented; "" without one."""
    head, _, body = epilog.partition("\n")
    return textwrap.dedent(body).strip("\n") if head == "examples:" else ""


def _code_block(language: str, text: str) -> list[str]:
    """A fenced Markdown code block."""
    return [f"```{language}", *text.splitlines(), "```"]


def _inline(text: str) -> str:
    """Help text as inline Markdown, also inside a table cell: | would end the cell, * (/v1/*) start emphasis."""
    return text.replace("|", "\\|").replace("*", "\\*").replace("\n", " ")


def _anchor(heading: str) -> str:
    """The id GitHub gives the heading `` `heading` ``: lower case, spaces as hyphens."""
    return heading.lower().replace(" ", "-")


def main(argv: Sequence[str] | None = None) -> int:
    """Print the reference, or write it to a file with --write."""
    from ..fileio import write_atomically

    parser = argparse.ArgumentParser(prog="python -m ecanfnet.cli.reference",
                                     description="Render the Markdown reference of the ecanfnet commands.")
    parser.add_argument("--write", metavar="FILE", help="write it to FILE (replaced atomically) instead of stdout")
    args = parser.parse_args(argv)
    text = render()
    if args.write is None:
        sys.stdout.write(text)
        return 0

    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)

    write_atomically(args.write, write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
