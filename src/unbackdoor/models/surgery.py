"""Parameter surgery every weight-level method shares: which group a parameter belongs to, the
block it sits in, seeded re-initialisation, resets of a scope to the base (``reinit``, ``distill``),
state snapshots, suspect/base alignment, seeded masks and the fingerprint that names a run's
checkpoint folder.

One home for each, so that two methods asked for "a fresh head with seed 3" get the same head, and
"the same RNG fork" means the same thing everywhere. Methods import from here, never from each
other's files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

import torch

from unbackdoor.errors import ConfigError, ModelError
from unbackdoor.models.loading import Classifier, check_same_architecture

logger = logging.getLogger(__name__)

HEAD = "head"
GROUPS = ("embeddings", "layernorm", "encoder", "pooler")  # every backbone group; the head is apart
_LAYER_INDEX = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")


# ----------------------------------------------------------------------------- where a parameter sits
def _is_norm(module: torch.nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or "LayerNorm" in name or "RMSNorm" in name


def _parameter_owners(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Parameter name -> the module that holds it directly."""
    owners: dict[str, torch.nn.Module] = {}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owners[f"{mname}.{pname}" if mname else pname] = module
    return owners


def parameter_groups(model: torch.nn.Module) -> dict[str, str]:
    """Each parameter's group: ``head``, ``embeddings``, ``layernorm``, ``pooler`` or ``encoder``.

    The head is everything outside the backbone (``model.base_model_prefix``: ``bert``,
    ``roberta``, ``transformer``, ``model``, ...), e.g. ``classifier`` or ``score``.
    """
    prefix = getattr(model, "base_model_prefix", "")
    owners = _parameter_owners(model)
    groups: dict[str, str] = {}
    for name, _ in model.named_parameters():
        module = owners[name]
        if prefix and not name.startswith(prefix + "."):
            groups[name] = HEAD
        elif isinstance(module, torch.nn.Embedding):
            groups[name] = "embeddings"
        elif _is_norm(module):
            groups[name] = "layernorm"
        elif ".pooler." in f".{name}":
            groups[name] = "pooler"
        else:
            groups[name] = "encoder"
    return groups


def layer_index(name: str) -> int | None:
    """The transformer block a parameter belongs to (``...layer.3.``, ``h.3.``, ``layers.3.``)."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def aligned_parameters(suspect: Classifier, base: Classifier) -> Iterator[tuple[str, torch.nn.Parameter, torch.Tensor]]:
    """(name, suspect parameter, base tensor) for every parameter the base also has, by name.

    Parameters only the suspect has (typically the new classification head of a fine-tuned
    model built from a headless encoder) are skipped; shapes must agree.
    """
    base_params = dict(base.model.named_parameters())
    for name, param in suspect.model.named_parameters():
        ref = base_params.get(name)
        if ref is None:
            continue
        if ref.shape != param.shape:
            raise ModelError(f"parameter {name}: suspect {tuple(param.shape)} vs base {tuple(ref.shape)}")
        yield name, param, ref.detach().to(param.device)


# ----------------------------------------------------------------------------- seeded randomness
@contextmanager
def forked_rng() -> Iterator[None]:
    """Run a block on a copy of the global RNG state (CPU and every GPU), restored afterwards: the
    one RNG fork every method uses (e.g. a perturbed forward whose dropout must not shift the rest)."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield


@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run a block under ``torch.manual_seed(seed)`` without disturbing the global RNG state."""
    with forked_rng():
        torch.manual_seed(seed)
        yield


def reinitialise_parameters(model: torch.nn.Module, names: Sequence[str], seed: int) -> None:
    """Re-initialise the named parameters with the architecture's own initialiser, seeded.

    Calls ``model._init_weights`` on each module that holds one of them (other parameters of that
    module are restored). Transformers skips tensors flagged as loaded from a checkpoint
    (``_is_hf_initialized``), so the flag is cleared for the call.
    """
    wanted = set(names)
    missing = wanted - {n for n, _ in model.named_parameters()}
    if missing:
        raise ModelError(f"no parameter named {sorted(missing)[0]!r} to re-initialise")
    if not wanted:
        return
    init = getattr(model, "_init_weights", None)
    if init is None:
        raise ModelError(f"{type(model).__name__} has no initialiser (_init_weights)")
    with seeded_rng(seed), torch.no_grad():
        for mname, module in model.named_modules():
            direct = {f"{mname}.{p}" if mname else p: t for p, t in module.named_parameters(recurse=False)}
            hit = wanted & direct.keys()
            if not hit:
                continue
            keep = {n: direct[n].detach().clone() for n in direct.keys() - hit}
            flags = {n: getattr(t, "_is_hf_initialized", None) for n, t in direct.items()}
            for t in direct.values():
                t._is_hf_initialized = False  # type: ignore[attr-defined]
            init(module)
            for n, t in direct.items():
                if n in keep:
                    t.copy_(keep[n])
                if flags[n] is None:
                    del t._is_hf_initialized  # type: ignore[attr-defined]
                else:
                    t._is_hf_initialized = flags[n]  # type: ignore[attr-defined]


def fresh_values(model: torch.nn.Module, names: Sequence[str], seed: int) -> dict[str, torch.Tensor]:
    """What :func:`reinitialise_parameters` would give the named parameters, leaving them as they are."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in names}
    reinitialise_parameters(model, names, seed)
    fresh = {n: params[n].detach().clone() for n in names}
    with torch.no_grad():
        for n, value in saved.items():
            params[n].copy_(value)
    return fresh


def kept_count(rho: float, numel: int) -> int:
    """k_t = ⌈ρ·d_t⌉, exact for decimal ρ (0.3 · 10 keeps 3, not 4)."""
    return min(numel, math.ceil(Fraction(repr(float(rho))) * numel))


def tensor_seed(seed: int, name: str) -> int:
    """A generator seed from (seed, tensor name): masks do not depend on visiting order."""
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def random_priorities(name: str, shape: torch.Size | Sequence[int], seed: int) -> torch.Tensor:
    """Seeded u_i ~ U(0, 1) for every element of tensor ``name`` (on CPU, float32)."""
    gen = torch.Generator(device="cpu").manual_seed(tensor_seed(seed, name))
    return torch.rand(tuple(shape), generator=gen)


def keep_mask_from_priorities(priorities: torch.Tensor, rho: float) -> torch.Tensor:
    """Reset the d_t − ⌈ρ·d_t⌉ elements with the highest priority; True = keep.

    Ties are broken by flat position (stable sort), so masks are nested across ρ.
    """
    flat = priorities.reshape(-1)
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    k = kept_count(rho, flat.numel())
    if k:
        keep[torch.argsort(flat, stable=True)[:k]] = True
    return keep.reshape(priorities.shape)


# ----------------------------------------------------------------------------- resets to the base or random
def num_blocks(model: Any) -> int:
    """The number of transformer blocks (from parameter names)."""
    indices = [i for i in (layer_index(n) for n, _ in model.named_parameters()) if i is not None]
    if not indices:
        raise ModelError(f"{type(model).__name__}: no numbered transformer blocks found")
    return max(indices) + 1


def scope_parameters(model: Any, scope: str, top_k: int = 1) -> list[str]:
    """Names of the parameters a scope resets, in model order.

    ``head``: head + pooler. ``top_k``: blocks ≥ L − k, every parameter after the last block
    (pooler, final norm) and the head. ``all``: every parameter.
    """
    names = [n for n, _ in model.named_parameters()]
    if scope == "all":
        return names
    groups = parameter_groups(model)
    if scope == "head":
        return [n for n in names if groups[n] in (HEAD, "pooler")]
    if scope != "top_k":
        raise ConfigError(f"unknown reinit scope {scope!r}")
    n_blocks = num_blocks(model)
    if top_k > n_blocks:
        raise ConfigError(f"top_k={top_k} but the model has {n_blocks} blocks")
    last_block_pos = max(i for i, n in enumerate(names) if layer_index(n) is not None)
    chosen = []
    for pos, name in enumerate(names):
        idx = layer_index(name)
        if (idx is not None and idx >= n_blocks - top_k) or pos > last_block_pos or groups[name] == HEAD:
            chosen.append(name)
    return chosen


@dataclass
class ResetReport:
    """What :func:`reinitialise` did."""

    scope: str
    source: str
    top_k: int | None
    n_from_base: int
    n_random: int
    random_names: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reinitialise(suspect: Classifier, base: Classifier | None, scope: str, source: str, *, top_k: int = 1,
                 seed: int = 0) -> ResetReport:
    """Reset ``suspect``'s parameters in ``scope`` in place: to ``base`` (``pretrained``) or random.

    The head, and any tensor the base lacks, is always re-initialised (seeded, model's initialiser).
    """
    names = scope_parameters(suspect.model, scope, top_k)
    from_base: dict[str, Any] = {}
    if source == "pretrained":
        if base is None:
            raise TypeError("source=pretrained needs the clean base model")
        check_same_architecture(suspect, base)
        groups = parameter_groups(suspect.model)
        aligned = {name: (param, ref) for name, param, ref in aligned_parameters(suspect, base)}
        from_base = {n: aligned[n] for n in names if n in aligned and groups[n] != HEAD}
    elif source != "random":
        raise ConfigError(f"unknown reinit source {source!r}")
    for param, ref in from_base.values():
        param.data.copy_(ref.to(param.dtype))
    random_names = [n for n in names if n not in from_base]
    reinitialise_parameters(suspect.model, random_names, seed)
    report = ResetReport(scope, source, top_k if scope == "top_k" else None, len(from_base), len(random_names),
                         random_names)
    logger.info("reinit %s from %s: %d tensors from the base, %d re-initialised", scope, source,
                report.n_from_base, report.n_random)
    return report


# ----------------------------------------------------------------------------- states and run folders
def snapshot_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the model's state (to restore it between search candidates)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def restore_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    model.load_state_dict(state)


def config_fingerprint(*parts: Any) -> str:
    """A short hash naming a run's sub-folder, so a resumed run never picks up another setting."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]
