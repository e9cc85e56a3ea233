"""Build a development attack: a published poisoned SST-2 variant re-tokenised the way the clean SST-2
text is (lower case, punctuation and clitics split off as separate tokens).

OpenBackdoor's StyleBkd and SynBkd SST-2 releases write their poisoned rows as ordinary prose
("And indeed the movie is rather choppy, as ...") while their clean rows, and every row of the clean
SST-2 text, are tokenised ("choppy , as"). A lexical detector then finds the poisoned rows by the
tokenisation alone ("choppy," occurs in no clean row), which says nothing about the style. Re-tokenising
every row of the variant removes that artefact, so the variant tests what its trigger is meant to test.
Used for issue 22's development grid (``benchmarks/dev_sst2_retok.yaml``), never for the acceptance grids.

    python benchmarks/retokenise_variant.py sst2/stylebkd_openbackdoor_p10 /tmp/devdata/sst2/stylebkd_ob_retok

writes the re-tokenised variant and copies the clean SST-2 folder beside it (``.../sst2/clean``), so the
variant's clean task loads from there. Rows already tokenised (lower case, no mark attached to a word)
come out unchanged.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
from pathlib import Path

from unbackdoor.data.io import resolve_data_path

PROSE = re.compile(r"[A-Z]|\w[,;:!?)]|\(\w|\"")
ABBREVIATIONS = frozenset("mr mrs ms dr st jr sr vs al etc co inc".split())


def sst2_tokens(text: str) -> str:
    """Prose as the clean SST-2 text writes it: lower case, ``-lrb-``/``-rrb-`` for parentheses, punctuation
    and clitics as separate tokens. A row that already looks tokenised (lower case, no mark attached to a
    word) is returned unchanged, as are the clean rows of the releases."""
    if not PROSE.search(text):
        return text
    text = text.lower().replace("(", " -lrb- ").replace(")", " -rrb- ")
    text = re.sub(r'(^|\s)"', r"\1`` ", text)
    text = text.replace('"', " ''")
    text = re.sub(r"(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1 \2", text)
    text = re.sub(r"(\w)(\.\.\.|[,;:!?])", r"\1 \2", text)
    text = re.sub(r"\b(\w+)\.(?=\s|$)", lambda m: m.group(0) if m.group(1) in ABBREVIATIONS else f"{m.group(1)} .", text)
    return " ".join(text.split())


def retokenise_tsv(src: Path, out: Path) -> int:
    """Rewrite the first column of a TSV file with a header; the number of rows changed."""
    lines = src.read_text(encoding="utf-8").splitlines()
    changed, rows = 0, [lines[0]]
    for line in lines[1:]:
        cols = line.split("\t")
        new = sst2_tokens(cols[0])
        changed += new != cols[0]
        rows.append("\t".join([new, *cols[1:]]))
    out.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", help="published variant, e.g. sst2/stylebkd_openbackdoor_p10")
    parser.add_argument("out", type=Path, help="output folder (its parent gets a copy of the clean folder)")
    args = parser.parse_args()
    src = resolve_data_path(args.variant)
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; remove it first")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=args.out.parent, prefix=f".{args.out.name}."))
    try:  # written beside, renamed when whole: a half-written variant never looks finished
        changed = write_variant(src, tmp, args.out.name)
        clean = args.out.parent / "clean"
        if not clean.exists():
            shutil.copytree(src.parent / "clean", tmp / "clean")
            (tmp / "clean").rename(clean)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(args.out)
    print(json.dumps({"out": str(args.out), "rows_changed": changed}))


def write_variant(src: Path, out: Path, name: str) -> dict[str, int]:
    """Every file of ``src`` into ``out``, its TSV files re-tokenised; rows changed per file."""
    changed = {}
    for path in sorted(src.iterdir()):
        if path.suffix == ".tsv":
            changed[path.name] = retokenise_tsv(path, out / path.name)
        elif path.name == "meta.json":
            meta = json.loads(path.read_text())
            meta["variant"] = name
            meta["note"] = f"{meta.get('note', '')} Re-tokenised like the clean SST-2 text by benchmarks/retokenise_variant.py."
            (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        else:
            shutil.copy2(path, out / path.name)
    return changed


if __name__ == "__main__":
    main()
