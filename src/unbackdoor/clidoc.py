"""``docs/cli.md``, written from the CLI itself (every command, its help and its options), so that
the reference cannot drift from the code: ``python -m unbackdoor.clidoc > docs/cli.md``
(``tests/test_cli_doc.py`` checks the file is current)."""

from __future__ import annotations

import sys
from typing import Any

HEADER = """# `unbackdoor` command reference

Generated from the CLI (`python -m unbackdoor.clidoc > docs/cli.md`; a test keeps it current). Every
command also takes `--config FILE.yaml` with the same keys as its options (strict: an unknown key is
an error, with the nearest valid key suggested), and `-v`/`-q` before the command for more or less
logging. Bad input ends in one `error:` line and exit status 2.
"""


def _option_line(param: Any, ctx: Any) -> str:
    record = param.get_help_record(ctx)
    if record is None:  # an argument
        return f"| `{param.human_readable_name}` (argument) | |"
    names, text = record
    return f"| `{names.replace('|', '/')}` | {text.replace('|', '/')} |"


def _command_section(name: str, command: Any) -> list[str]:
    import click

    ctx = click.Context(command, info_name=name)
    lines = [f"## `unbackdoor {name}`", "", (command.help or "").strip(), ""]
    params = [p for p in command.params if not getattr(p, "hidden", False) and p.name != "help"]
    if params:
        lines += ["| option | meaning |", "|---|---|", *(_option_line(p, ctx) for p in params), ""]
    return lines


def reference_markdown() -> str:
    """The whole reference, command by command in the CLI's order (groups expanded)."""
    import typer

    from unbackdoor.cli import app

    root = typer.main.get_command(app)
    lines = [HEADER]
    for name, command in root.commands.items():  # type: ignore[attr-defined]
        sub = getattr(command, "commands", None)
        if sub:
            for sub_name, sub_command in sub.items():
                lines += _command_section(f"{name} {sub_name}", sub_command)
        else:
            lines += _command_section(name, command)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(reference_markdown())
