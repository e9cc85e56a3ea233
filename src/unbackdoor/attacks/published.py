"""Published paraphrase attacks: SynBkd/HiddenKiller (Qi et al., ACL 2021; a syntactic template via
the SCPN paraphraser) and StyleBkd (Qi et al., EMNLP 2021; a text style via the STRAP paraphraser).

Threat model: as BadNets (the attacker controls a share of the training rows and their labels), but
the trigger is a paraphrase of the whole sentence, invisible as a word.

These attacks **cannot be recomputed offline**: the paraphrasers are large generation models. The
attack loads the published poisoned rows from the data root (``<dataset>/<attack>_<source>_p<NN>``,
e.g. ``sst2/synbkd_hiddenkiller_p20``) with their flags, target and triggered test set, exactly as
released. ``source`` chooses among the published variants (``hiddenkiller`` or ``openbackdoor`` for
SynBkd, ``styleattack`` or ``openbackdoor`` for StyleBkd). ``poison_rate``, ``target_label`` and
``mode`` default to the variant's own; asking for values no published variant has is an error that
lists the ones that exist. ``seed`` is unused: the rows are fixed.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from unbackdoor.attacks.base import ATTACKS, Attack, AttackConfig
from unbackdoor.data.io import data_root, load_poisoned_task, read_meta, resolve_data_path
from unbackdoor.data.types import AttackInfo, PoisonedTask, Task
from unbackdoor.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

RATE_TOLERANCE = 0.005  # published rates are realised counts (e.g. 1383/6920 = 0.1999 for "20 %")
# [DATA] the poisoning mode of published sets whose meta.json does not record it (see the data README)
KNOWN_MODES = {
    "synbkd_hiddenkiller_p20": "mix",  # "poisoned rows come from both classes (all relabelled 1)"
    "synbkd_openbackdoor_p10": "mix",
    "stylebkd_openbackdoor_p10": "mix",
    "stylebkd_bible_styleattack_p20": "dirty",  # drawn among label-0 rows
}


class PublishedConfig(AttackConfig):
    poison_rate: float | None = Field(None, gt=0, le=1, description="the published variant's rate (default: its own)")
    target_label: int | None = Field(None, ge=0, description="the published variant's target (default: its own)")
    mode: Literal["dirty", "mix", "clean"] | None = Field(None, description="the published variant's mode "
                                                          "(default: its own)")
    seed: int = Field(0, description="unused: the published rows are fixed")
    source: str | None = Field(None, description="which published variant (its folder name's source part, e.g. "
                               "hiddenkiller, openbackdoor); default: the original paper's release")
    dataset: str | None = Field(None, description="folder (or name under the data root) holding the published "
                                "variants; default: the clean data's dataset folder")


@dataclass(frozen=True)
class PublishedVariant:
    """One published poisoned set: its folder and what its meta says."""

    folder: Path
    source: str
    poison_rate: float
    target_label: int
    mode: str | None

    def describe(self) -> str:
        return (f"source={self.source} poison_rate={self.poison_rate:g} target_label={self.target_label} "
                f"mode={self.mode or 'unknown'} ({self.folder.name})")


def find_variants(dataset_dir: Path, attack: str) -> list[PublishedVariant]:
    """The published poisoned sets of ``attack`` under ``dataset_dir`` (folders ``<attack>_..._p<NN>``)."""
    found = []
    for folder in sorted(p for p in dataset_dir.iterdir() if p.is_dir()):
        match = re.fullmatch(rf"{re.escape(attack)}_(?:.+_)?([a-z0-9]+)_p\d+", folder.name)
        meta = read_meta(folder) if match else {}
        if not match or meta.get("kind") != "poisoned":
            continue
        found.append(PublishedVariant(folder, match.group(1), float(meta["poison_rate"]), int(meta["target_label"]),
                                      meta.get("mode") or KNOWN_MODES.get(folder.name)))
    return found


def choose_variant(variants: list[PublishedVariant], config: PublishedConfig, default_source: str,
                   attack: str, where: Path) -> PublishedVariant:
    """The one variant matching the config; one clear error (listing what exists) otherwise."""
    source = config.source or default_source
    matching = [v for v in variants if v.source == source
                and (config.poison_rate is None or abs(v.poison_rate - config.poison_rate) <= RATE_TOLERANCE)
                and (config.target_label is None or v.target_label == config.target_label)
                and (config.mode is None or v.mode == config.mode)]
    if len(matching) == 1:
        return matching[0]
    asked = ", ".join(f"{k}={v}" for k, v in (("source", source), ("poison_rate", config.poison_rate),
                                               ("target_label", config.target_label), ("mode", config.mode))
                      if v is not None)
    problem = "several" if matching else "no"
    listing = "; ".join(v.describe() for v in variants) or f"none under {where}"
    raise ConfigError(f"{attack} cannot be recomputed offline, and {problem} published variant matches {asked}; "
                      f"published: {listing}")


def dataset_folder(task: Task, config: PublishedConfig) -> Path:
    """Where the published variants of ``task``'s dataset live: ``config.dataset``, else the parent of
    the clean folder ``task`` was loaded from."""
    try:
        folder = resolve_data_path(config.dataset if config.dataset is not None else task.name)
    except DataError as exc:
        raise ConfigError(f"cannot find the published variants of {task.name!r} ({exc}); give -p dataset=...") from None
    return folder.parent if folder.name == "clean" else folder


class PublishedAttack(Attack[PublishedConfig]):
    """A paraphrase attack whose poisoned rows are loaded as published, never recomputed."""

    config_class = PublishedConfig
    default_source: ClassVar[str]

    def poison(self, task: Task) -> PoisonedTask:
        folder = dataset_folder(task, self.config)
        if not folder.is_dir():
            raise ConfigError(f"{folder}: no such dataset folder (data root {data_root()})")
        variant = choose_variant(find_variants(folder, self.name), self.config, self.default_source, self.name, folder)
        logger.info("%s: loading the published poisoned set %s", self.name, variant.folder)
        published = load_poisoned_task(variant.folder)
        check_same_clean_data(task, published)
        return dataclasses.replace(published, clean=task, attack=AttackInfo(
            self.name, {"source": variant.source, "variant": variant.folder.name, "poison_rate": variant.poison_rate,
                        "target_label": variant.target_label, "mode": variant.mode, "published": True},
            published.attack.trigger, str(variant.folder), published.attack.n_failed))


def check_same_clean_data(task: Task, published: PoisonedTask) -> None:
    """Refuse clean data other than the published set's own (its clean test rows must be ``task``'s)."""
    mine = [(e.text, e.label) for e in task.test.examples]
    theirs = [(e.text, e.label) for e in published.clean.test.examples]
    if mine != theirs:
        raise ConfigError(f"{task.name} is not the clean data of the published set {published.attack.source} "
                          f"(its clean data is {published.clean.name}); use that as --data")


@ATTACKS.register("synbkd")
class SynBkd(PublishedAttack):
    """SynBkd/HiddenKiller: sentences paraphrased into a fixed syntactic template, as published."""

    name = "synbkd"
    default_source = "hiddenkiller"


@ATTACKS.register("stylebkd")
class StyleBkd(PublishedAttack):
    """StyleBkd: sentences paraphrased into a fixed text style (Bible), as published."""

    name = "stylebkd"
    default_source = "styleattack"
