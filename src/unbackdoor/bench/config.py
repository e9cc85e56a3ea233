"""The benchmark YAML: datasets x attacks x defences x seeds, validated whole before any work.

Every name is checked against its registry (attacks, weight attacks, train-time defences, purify
methods, unlearn methods, detectors) and every parameter block is validated by building the
method's own config, so a typo fails in one :class:`~unbackdoor.errors.ConfigError` line before a
single model is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, model_validator

from unbackdoor.config import StrictConfig, build_config, read_yaml
from unbackdoor.errors import ConfigError, DataError
from unbackdoor.training.config import TrainConfig

LABEL = r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$"  # labels become folder names and table rows
RESERVED_DEFENSES = {"none", "floor", "floor-model"}  # none = the victim itself; floor = never poisoned


class DatasetSpec(StrictConfig):
    """A clean dataset: a name under the data root (``sst2``) or a folder."""

    name: str = Field(pattern=LABEL, description="label in tables and folder names")
    data: str | None = Field(None, description="clean data spec (default: name)")
    max_dev: int | None = Field(None, ge=2, description="cap the dev split (seeded, stratified, the same rows in "
                                "every cell); the capped task is written once into RUN_DIR/data/NAME")
    max_test: int | None = Field(None, ge=2, description="cap the test split, hence the CACC rows and the triggered "
                                 "rows of generated attacks, as max_dev")

    @property
    def spec(self) -> str:
        return self.data or self.name

    @property
    def capped(self) -> bool:
        return self.max_dev is not None or self.max_test is not None


class AttackSpec(StrictConfig):
    """One attack: a registered data attack, a weight attack, or a published poisoned variant."""

    name: str = Field(pattern=LABEL, description="label in tables and folder names")
    attack: str | None = Field(None, description="registered attack (unbackdoor.attacks.ATTACKS or weight attacks)")
    variant: str | None = Field(None, description="published poisoned variant under each dataset's data root "
                                "folder, e.g. synbkd_hiddenkiller_p20 (sst2 -> sst2/synbkd_hiddenkiller_p20)")
    params: dict[str, Any] = Field(default_factory=dict, description="attack parameters; seed defaults to the cell's")
    dataset: str | None = Field(None, description="the one dataset (a name under datasets) this attack belongs to, "
                                "e.g. a published variant of that dataset; default: every dataset")

    def applies_to(self, dataset: DatasetSpec) -> bool:
        """Whether the grid pairs this attack with ``dataset``."""
        return self.dataset is None or self.dataset == dataset.name

    @model_validator(mode="after")
    def _one_source(self) -> AttackSpec:
        if (self.attack is None) == (self.variant is None):
            raise ValueError("give exactly one of attack (a registered attack) or variant (published poisoned data)")
        if self.variant is not None and self.params:
            raise ValueError("a published variant takes no params")
        return self


class TrainDefenseSpec(StrictConfig):
    """Training on the poisoned rows through a train-time defence (``train --defense``)."""

    kind: Literal["train"]
    name: str = Field(pattern=LABEL)
    method: str = Field(description="train-time defence: lora, musclelora, reweight, ...")
    params: dict[str, Any] = Field(default_factory=dict)


class PurifyDefenseSpec(StrictConfig):
    """Purifying the victim with a small clean set (``purify``)."""

    kind: Literal["purify"]
    name: str = Field(pattern=LABEL)
    method: str = Field(description="purify method (unbackdoor.purify.PURIFY_DEFENSES)")
    params: dict[str, Any] = Field(default_factory=dict)
    epur: bool = Field(False, description="E-PUR's embedding reset first")
    clean_fraction: float | None = Field(0.01, gt=0, le=1, description="share of the clean train split")
    clean_size: int | None = Field(None, ge=2, description="clean rows (instead of a fraction)")


class UnlearnDefenseSpec(StrictConfig):
    """A detector flags training rows (never the oracle flags), an unlearn method forgets them."""

    kind: Literal["unlearn"]
    name: str = Field(pattern=LABEL)
    method: str = Field(description="unlearn method (unbackdoor.unlearn.UNLEARN_METHODS)")
    params: dict[str, Any] = Field(default_factory=dict)
    detector: str = Field("loss", description="detector whose flagged rows are the forget set")
    detector_params: dict[str, Any] = Field(default_factory=dict)
    rate: float = Field(0.1, gt=0, le=1, description="share of training rows the detector flags")
    clean_fraction: float | None = Field(0.01, gt=0, le=1, description="clean / retain share of the clean train split")
    clean_size: int | None = Field(None, ge=2, description="clean / retain rows (instead of a fraction)")


class GuardDefenseSpec(StrictConfig):
    """An inference-time guard in front of the victim (``guard``): thresholds from a clean set only;
    the cell's CACC and ASR are end to end (a rejected clean row is an error, a rejected triggered row a
    failed attack), its metrics also hold FRR and FAR."""

    kind: Literal["guard"]
    name: str = Field(pattern=LABEL)
    method: str = Field(description="guard (unbackdoor.guard.GUARDS): onion, strip, rap")
    params: dict[str, Any] = Field(default_factory=dict)
    clean_fraction: float | None = Field(0.01, gt=0, le=1, description="share of the clean train split")
    clean_size: int | None = Field(None, ge=2, description="clean rows (instead of a fraction)")


DefenseSpec = Annotated[TrainDefenseSpec | PurifyDefenseSpec | UnlearnDefenseSpec | GuardDefenseSpec,
                        Field(discriminator="kind")]


class BenchConfig(StrictConfig):
    """A whole benchmark grid."""

    name: str = Field("bench", pattern=LABEL, description="default run dir: runs/bench/NAME")
    model: str | None = Field(None, description="base model (default: the packaged all-MiniLM-L6-v2)")
    max_train: int | None = Field(None, ge=2, description="subsample training rows (seeded by the cell's seed)")
    max_length: int | None = Field(None, ge=8, le=4096, description="tokens per input")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="compute precision of every cell (auto: "
                                                       "bf16 where the processor runs it natively, else fp32)")
    train: dict[str, Any] = Field(default_factory=dict, description="victim / floor training settings "
                                  "(TrainConfig keys; seed is the cell's)", json_schema_extra={"keys_of": TrainConfig})
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    datasets: list[DatasetSpec] = Field(min_length=1)
    attacks: list[AttackSpec] = Field(min_length=1)
    defenses: list[DefenseSpec] = Field(default_factory=list, validation_alias=AliasChoices("defenses", "defences"),
                                        description="besides none (the victim itself); also spelt defences")

    @model_validator(mode="after")
    def _unique_labels(self) -> BenchConfig:
        per_dataset = [f"{a.name} (dataset {d.name})" for d in self.datasets for a in self.attacks if a.applies_to(d)]
        for what, labels in (("dataset", [d.name for d in self.datasets]), ("attack", per_dataset),
                             ("defence", [d.name for d in self.defenses]), ("seed", self.seeds)):
            dupes = sorted({str(x) for x in labels if labels.count(x) > 1})
            if dupes:
                raise ValueError(f"{what} listed twice: {', '.join(dupes)}")
        names = {d.name for d in self.datasets}
        for d in self.datasets:
            published = [a.name for a in self.attacks if a.variant is not None and a.applies_to(d)]
            if d.capped and published:
                raise ValueError(f"dataset {d.name}: max_dev/max_test cap generated attacks' sets only, and the "
                                 f"published variant(s) {', '.join(published)} carry their own test rows; give "
                                 "those attacks another dataset entry without the caps")
        strays = sorted({a.dataset for a in self.attacks if a.dataset is not None} - names)
        if strays:
            raise ValueError(f"attack dataset {', '.join(strays)} is not among the datasets ({', '.join(sorted(names))})")
        reserved = sorted({d.name for d in self.defenses} & RESERVED_DEFENSES)
        if reserved:
            raise ValueError(f"defence names {', '.join(reserved)} are reserved (none = the victim, floor = never "
                             "poisoned; both are always in the grid)")
        return self


def weight_attacks() -> Any:
    """The weight-attack registry, or ``None`` while :mod:`unbackdoor.attacks.weight` is absent."""
    try:
        from unbackdoor.attacks.weight import WEIGHT_ATTACKS
    except ImportError:
        return None
    return WEIGHT_ATTACKS


def attack_kind(spec: AttackSpec) -> Literal["data", "weight", "variant"]:
    """How a cell poisons: a registered data attack, a weight attack, or published poisoned data."""
    from unbackdoor.attacks.base import ATTACKS

    if spec.variant is not None:
        return "variant"
    if spec.attack in ATTACKS:
        return "data"
    registry = weight_attacks()
    if registry is not None and spec.attack in registry:
        return "weight"
    known = ATTACKS.names() + (list(registry.names()) if registry is not None else [])
    raise ConfigError(f"attack {spec.name}: unknown attack {spec.attack!r}; choose one of: {', '.join(sorted(known))}")


def load_bench_config(path: str | Path) -> BenchConfig:
    """Read and validate a bench YAML whole: structure, names, every parameter block, every dataset."""
    config = build_config(BenchConfig, read_yaml(path), str(path))
    check_methods(config)
    check_datasets(config)
    return config


def check_methods(config: BenchConfig) -> None:
    """Every attack and defence name is registered and its parameters are valid."""
    from unbackdoor.attacks.base import ATTACKS
    from unbackdoor.detect.base import build_detector
    from unbackdoor.guard.base import build_guard
    from unbackdoor.purify.base import build_purify_defense, epur_first
    from unbackdoor.train_defenses.base import build_train_defense
    from unbackdoor.unlearn import build_unlearn_method

    build_config(TrainConfig, config.train, "train")
    for spec in config.attacks:
        kind = attack_kind(spec)
        if kind == "data":
            cls = ATTACKS.get(spec.attack)
            build_config(cls.config_class, spec.params, f"attack {spec.name}")
        elif kind == "weight":
            cls = weight_attacks().get(spec.attack)
            if getattr(cls, "config_class", None) is not None:
                build_config(cls.config_class, spec.params, f"attack {spec.name}")
    for d in config.defenses:
        where = f"defence {d.name}"
        try:
            if isinstance(d, TrainDefenseSpec):
                build_train_defense(d.method, d.params)
            elif isinstance(d, PurifyDefenseSpec):
                build_purify_defense(d.method, d.params, have_base=True, before=epur_first(d.method, {} if d.epur else None))
            elif isinstance(d, GuardDefenseSpec):
                build_guard(d.method, d.params)
            else:
                build_unlearn_method(d.method, d.params, have_base=True, have_train_rows=True)
                build_detector(d.detector, d.detector_params)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def variant_spec(dataset: DatasetSpec, attack: AttackSpec) -> str:
    """The data spec of a published poisoned variant of ``dataset``."""
    from unbackdoor.data.io import resolve_data_path

    clean = resolve_data_path(dataset.spec)
    parent = clean.parent if clean.name == "clean" else clean
    return str(parent / str(attack.variant))


def check_datasets(config: BenchConfig) -> None:
    """Every dataset (and every published variant of it) exists."""
    from unbackdoor.data.io import is_poisoned_folder, resolve_data_path

    for dataset in config.datasets:
        try:
            resolve_data_path(dataset.spec)
        except DataError as exc:
            raise ConfigError(f"dataset {dataset.name}: {exc}") from None
        for attack in config.attacks:
            if attack.variant is None or not attack.applies_to(dataset):
                continue
            folder = Path(variant_spec(dataset, attack))
            if not folder.is_dir() or not is_poisoned_folder(folder):
                raise ConfigError(f"attack {attack.name}: dataset {dataset.name} has no poisoned variant "
                                  f"{attack.variant!r} ({folder})")

