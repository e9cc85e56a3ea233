"""Outputs that never look finished before they are, and never cost the user a file.

Every output folder is written into a work dir beside it (``.<name>.partial``) and renamed into
place when complete; a completed folder carries :data:`OUTPUT_MARKER`. Before any work,
:func:`check_output_free` refuses an output that would endanger other files:

* the current directory, one of its ancestors, a filesystem root, ``.``/``..``/an empty path;
* a folder that holds (or is) one of the command's inputs;
* an existing folder without ``--overwrite``, and with ``--overwrite`` one that unbackdoor did not
  write (no :data:`OUTPUT_MARKER`, no ``unbackdoor.json``): the tool replaces only its own outputs;
* a place where the folder cannot be created (a parent that is a file, a read-only place).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from unbackdoor.errors import UnbackdoorError

OUTPUT_MARKER = ".unbackdoor-output"  # written into every completed output folder
TOOL_RECORDS = (OUTPUT_MARKER, "unbackdoor.json")  # either one marks a folder this tool wrote


def partial_dir(out: Path) -> Path:
    """The work dir of ``out``: kept after a crash so a rerun can resume from its checkpoints."""
    return out.parent / f".{out.name}.partial"


def written_by_tool(folder: Path) -> bool:
    """Whether ``folder`` is an output this tool wrote (it carries the marker or ``unbackdoor.json``)."""
    return any((folder / name).is_file() for name in TOOL_RECORDS)


def resolve_output(out: str | Path) -> Path:
    """The absolute output path, or an error when writing there could remove other files."""
    if not str(out).strip():
        raise UnbackdoorError("the output path is empty: give the name of a new folder")
    given = Path(out)
    real = given.absolute().resolve()
    if real.parent == real:
        raise UnbackdoorError(f"{out}: is a filesystem root; give the name of a new folder")
    if given.name in ("", ".", ".."):
        raise UnbackdoorError(f"{out}: is the current directory or one of its ancestors; give the name of a new "
                              "folder")
    path = given.absolute().parent.resolve() / given.name  # the last part unresolved: a link is not followed
    cwd = Path.cwd().resolve()
    if any(cwd == p or cwd.is_relative_to(p) for p in (path, real)):
        raise UnbackdoorError(f"{out}: is the current directory or one of its ancestors; give the name of a new folder")
    return path


def check_output_free(out: str | Path, overwrite: bool = False, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Fail early, before any work, unless ``out`` can be written safely; returns it resolved.

    ``inputs`` are the command's input paths (names that are not paths are ignored): the output must
    neither be one of them nor hold one.
    """
    path = resolve_output(out)
    _check_not_an_input(path, out, inputs)
    if path.exists() or path.is_symlink():
        _check_replaceable(path, out, overwrite)
    check_creatable(path, out)
    return path


def _check_not_an_input(path: Path, out: str | Path, inputs: Iterable[str | Path | None]) -> None:
    for spec in inputs:
        if spec is None or not str(spec).strip() or not Path(spec).exists():
            continue
        source = Path(spec).absolute().resolve()
        if source == path or source.is_relative_to(path):
            raise UnbackdoorError(f"{out}: is (or holds) the input {spec}; write the output somewhere else")


def _check_replaceable(path: Path, out: str | Path, overwrite: bool) -> None:
    if not overwrite:
        raise UnbackdoorError(f"{out}: already exists; choose another output or pass --overwrite")
    if path.is_symlink() or not path.is_dir():
        raise UnbackdoorError(f"{out}: exists and is not a folder; --overwrite replaces only a folder unbackdoor wrote")
    if not written_by_tool(path):
        raise UnbackdoorError(f"{out}: was not written by unbackdoor (no {OUTPUT_MARKER} or unbackdoor.json in it), "
                              "so --overwrite will not replace it; remove it yourself or choose another output")


def check_creatable(path: Path, out: str | Path | None = None) -> None:
    """Fail unless the folder ``path`` (or a file at ``path``) can be created: its nearest existing
    ancestor must be a writable folder (probed by making and removing a folder in it)."""
    shown = out if out is not None else path
    ancestor = path.parent
    while not ancestor.exists():
        if ancestor.is_symlink():
            raise UnbackdoorError(f"cannot create {shown}: {ancestor} is a broken link")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UnbackdoorError(f"cannot create {shown}: {ancestor} is a file, not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".unbackdoor-probe-", dir=ancestor)
    except OSError as exc:
        raise UnbackdoorError(f"cannot create {shown}: cannot write in {ancestor} ({exc.strerror})") from None
    os.rmdir(probe)


def write_marker(folder: Path, **fields: Any) -> None:
    """Mark ``folder`` as a complete output of this tool (what :func:`written_by_tool` looks for)."""
    from unbackdoor import __version__

    record = {"tool": "unbackdoor", "version": __version__,
              "completed": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **fields}
    write_json(folder / OUTPUT_MARKER, record)


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a work dir; on success it becomes ``out`` (marked as this tool's). On failure it stays
    as ``.<name>.partial``, which a rerun resumes from."""
    out = check_output_free(out, overwrite)
    work = partial_dir(out)
    work.mkdir(parents=True, exist_ok=True)  # parents too: only now that the inputs are validated
    yield work
    write_marker(work)
    _replace(work, out, overwrite)


def _replace(work: Path, out: Path, overwrite: bool) -> None:
    """Move ``work`` to ``out``; an earlier output there (checked to be this tool's) is moved aside
    first and removed only once the new one is in place."""
    if not out.exists():
        os.replace(work, out)
        return
    _check_replaceable(out, out, overwrite)
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    os.replace(work, out)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def check_output_file(out: str | Path, overwrite: bool = False) -> Path:
    """Like :func:`check_output_free` for a single JSON record file: ``--overwrite`` replaces only a
    record this tool wrote (a JSON object with ``unbackdoor_version``)."""
    if not str(out).strip():
        raise UnbackdoorError("the output path is empty: give the name of a new file")
    path = Path(out).absolute().parent.resolve() / Path(out).name
    if path.is_dir():
        raise UnbackdoorError(f"{out}: is a folder; --out names a JSON file to write")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise UnbackdoorError(f"{out}: already exists; choose another --out or pass --overwrite")
        if path.is_symlink() or not _is_tool_record(path):
            raise UnbackdoorError(f"{out}: is not a record written by unbackdoor, so --overwrite will not replace it; "
                                  "remove it yourself or choose another --out")
    check_creatable(path, out)
    return path


def _is_tool_record(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "unbackdoor_version" in data
