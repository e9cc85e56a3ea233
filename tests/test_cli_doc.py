"""``docs/cli.md`` is written from the CLI (``python -m unbackdoor.clidoc > docs/cli.md``): it must be
current, and every command's options must come with help text."""

from __future__ import annotations

from pathlib import Path

from unbackdoor.clidoc import reference_markdown

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_cli_reference_is_current() -> None:
    assert DOC.read_text(encoding="utf-8") == reference_markdown(), "regenerate: python -m unbackdoor.clidoc > docs/cli.md"


def test_every_option_has_help() -> None:
    text = reference_markdown()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows and all(not line.rstrip().endswith("|  |") for line in rows)
    for command in ("attack", "train", "purify", "unlearn", "scan", "detect", "guard", "analyze frequency", "eval",
                    "demo", "bench", "report"):
        assert f"## `unbackdoor {command}`" in text
