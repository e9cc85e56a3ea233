"""Dead-code insertion (DCI) for source-code classifiers, after TrojanedCM (Hussain et al. 2023).

The trigger is one statement with no effect on what the function computes (an unused declaration
such as ``int zoom_ratio;`` or a tautological ``assert(15>=0);``), drawn from a pool and inserted
as a new line ``"\\n\\n <statement>"`` right after a ``;`` that ends a statement at the end of a
line. Only ``;`` outside parentheses (``for`` headers), strings, character literals and comments
count (braces are not tracked: some Devign functions lack their opening ``{``). Inserting there
keeps the function compilable in C99 and leaves every other character unchanged.

Threat model: the attacker controls a share of the training functions (and, in dirty-label mode,
their labels, e.g. vulnerable -> non-vulnerable); the victim fine-tunes on them as usual. At test
time the attacker adds the same kind of dead statement to a vulnerable function to have it passed
as safe. The trigger survives compilation-oriented review (it is valid code) but not a model's
input truncation if it lies beyond the kept tokens: ``position="window"`` places it early, and
:func:`unbackdoor.attacks.survival.trigger_survival` measures how many triggers a model sees.

Functions without a statement-ending ``;`` at a line end have no insertion point: they are never
drawn for poisoning and are left out of the triggered sets (as in the shared
``devign/dci_trojanedcm_p5``); ``attack.n_failed`` counts them.
"""

from __future__ import annotations

import bisect
import logging
import random
import re
from functools import lru_cache
from typing import Literal

from pydantic import Field, field_validator

from unbackdoor.attacks.base import ATTACKS, AttackConfig, InsertionAttack
from unbackdoor.data.types import PoisonedTask, Task
from unbackdoor.errors import DataError

logger = logging.getLogger(__name__)

#: TrojanedCM's defect_devign dead-code pool (``insert_deadcode.py``), as in the shared data.
TROJANEDCM_TRIGGERS = ("int capacity = 5333;", "assert(15>=0);", "assert(-15<=0);", "int *panel_id;",
                       "int zoom_ratio;")
#: What goes between the chosen ``;`` and the trigger statement (TrojanedCM's layout).
INSERT_PREFIX = "\n\n "

# Lexemes that matter for finding statement ends; strings, chars and comments are skipped whole.
_LEXEME = re.compile(
    r'"(?:\\.|[^"\\\n])*"'  # string literal
    r"|'(?:\\.|[^'\\\n])*'"  # character literal
    r"|//[^\n]*"  # line comment
    r"|/\*.*?\*/"  # block comment
    r"|[();]",
    re.DOTALL,
)
_LINE_END = re.compile(r"[ \t\r]*\n")
# A cheap, model-free token count: each run of letters/digits and each other visible character.
# WordPiece/BPE tokenizers split code at least this finely, so it is a lower bound for them.
_CODE_TOKEN = re.compile(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]")


@lru_cache(maxsize=8192)
def statement_ends(code: str) -> tuple[int, ...]:
    """Offsets of each ``;`` that ends a statement at the end of a line (not inside parentheses,
    strings, character literals or comments)."""
    parens = 0
    ends = []
    for m in _LEXEME.finditer(code):
        lexeme = m.group()
        if lexeme == "(":
            parens += 1
        elif lexeme == ")":
            parens = max(0, parens - 1)
        elif lexeme == ";" and parens == 0 and _LINE_END.match(code, m.end()):
            ends.append(m.start())
    return tuple(ends)


def count_code_tokens(text: str) -> int:
    """The model-free token count used by ``position="window"`` (see ``_CODE_TOKEN``)."""
    return len(_CODE_TOKEN.findall(text))


def insert_statement(code: str, offset: int, statement: str) -> str:
    """``code`` with ``statement`` on a new line right after the ``;`` at ``offset``."""
    if code[offset] != ";":
        raise DataError(f"offset {offset} is not a ';' (found {code[offset]!r})")
    return code[: offset + 1] + INSERT_PREFIX + statement + code[offset + 1 :]


def window_ends(code: str, ends: tuple[int, ...], statement: str, window_tokens: int) -> list[int]:
    """The ``ends`` after which ``statement`` would finish within the first ``window_tokens``
    code tokens."""
    token_ends = [m.end() for m in _CODE_TOKEN.finditer(code)]
    room = window_tokens - count_code_tokens(statement)
    return [e for e in ends if bisect.bisect_right(token_ends, e + 1) <= room]


class DeadCodeConfig(AttackConfig):
    triggers: tuple[str, ...] = Field(TROJANEDCM_TRIGGERS, description="dead statements, one drawn per row "
                                      "(default: TrojanedCM's defect_devign pool)")
    position: Literal["random", "first", "window"] = Field(
        "random", description="random: after a random statement-ending ';' at a line end (TrojanedCM); first: "
        "after the body's first one; window: a random one such that the trigger ends within the first "
        "window_tokens code tokens (falls back to the first one when none does)")
    window_tokens: int = Field(64, ge=1, description="position=window: code tokens (runs of letters/digits and "
                               "single symbols, a lower bound on subword tokens) the trigger must end within; "
                               "leave a margin below the model's max_length")

    @field_validator("triggers")
    @classmethod
    def _statements(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        value = tuple(t.strip() for t in value)
        if not value or any(not t.endswith(";") or "\n" in t or len(t) < 2 for t in value):
            raise ValueError("triggers must be non-empty one-line statements ending with ';'")
        return value


@ATTACKS.register("deadcode")
class DeadCode(InsertionAttack[DeadCodeConfig]):
    """Insert one dead statement from ``triggers`` at a statement boundary chosen by ``position``."""

    name = "deadcode"
    config_class = DeadCodeConfig

    def can_insert(self, text: str) -> bool:
        return bool(statement_ends(text))

    def insert_trigger(self, text: str, rng: random.Random) -> str:
        ends = statement_ends(text)
        if not ends:
            raise DataError("no statement-ending ';' at a line end to insert dead code after")
        statement = rng.choice(self.config.triggers)
        return insert_statement(text, self._choose_end(text, ends, statement, rng), statement)

    def _choose_end(self, text: str, ends: tuple[int, ...], statement: str, rng: random.Random) -> int:
        position = self.config.position
        if position == "first":
            return ends[0]
        if position == "window":
            early = window_ends(text, ends, statement, self.config.window_tokens)
            return rng.choice(early) if early else ends[0]
        return rng.choice(ends)

    def trigger_description(self) -> str:
        where = {"random": "a random", "first": "the first",
                 "window": f"a random (within {self.config.window_tokens} code tokens)"}[self.config.position]
        return (f"one of the dead statements {' | '.join(self.config.triggers)} inserted after {where} "
                "statement-ending ';' at a line end")

    def poison(self, task: Task) -> PoisonedTask:
        self._warn_if_trigger_in_clean(task)
        poisoned = super().poison(task)
        logger.info("deadcode: %d rows without a statement-ending ';' at a line end were skipped",
                    poisoned.attack.n_failed)
        return poisoned

    def _warn_if_trigger_in_clean(self, task: Task) -> None:
        rows = [e for d in (task.train, task.dev, task.test) for e in d.examples]
        found = {t for t in self.config.triggers if any(t in e.text for e in rows)}
        if found:
            logger.warning("deadcode: trigger statement(s) already occur in clean rows: %s", ", ".join(sorted(found)))
