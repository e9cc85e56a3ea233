"""Refactors keep behaviour: every method's output on tiny inputs matches ``tests/golden.json``
(see ``golden_runs.py``; ``UNBACKDOOR_WRITE_GOLDEN=1`` rewrites the file after an intended change)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from golden_runs import GOLDEN, fingerprints


def test_every_method_still_produces_what_it_did(tmp_path: Path) -> None:
    found = fingerprints(tmp_path)
    if os.environ.get("UNBACKDOOR_WRITE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        pytest.skip(f"wrote {GOLDEN}")
    expected = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert sorted(found) == sorted(expected), "methods added or gone: rewrite golden.json and say why"
    changed = {name: (expected[name], found[name]) for name in expected if found[name] != expected[name]}
    assert changed == {}
