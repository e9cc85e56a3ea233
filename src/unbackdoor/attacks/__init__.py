"""Attacks: data attacks turn a clean Task into a PoisonedTask (published paraphrase attacks load
their released rows); weight attacks also return the poisoned victim model."""

from unbackdoor.attacks.addsent import AddSent, AddSentConfig
from unbackdoor.attacks.badnets import BadNets, BadNetsConfig
from unbackdoor.attacks.base import ATTACKS, Attack, AttackConfig, InsertionAttack
from unbackdoor.attacks.deadcode import TROJANEDCM_TRIGGERS, DeadCode, DeadCodeConfig
from unbackdoor.attacks.ep import EmbeddingPoisoning, EPConfig
from unbackdoor.attacks.lwp import LayerwisePoisoning, LWPConfig
from unbackdoor.attacks.lws import LWS, LWSConfig
from unbackdoor.attacks.neuba import NeuBA, NeuBAConfig
from unbackdoor.attacks.por import POR, PORConfig
from unbackdoor.attacks.published import PublishedAttack, PublishedConfig, StyleBkd, SynBkd
from unbackdoor.attacks.ripples import RIPPLES, RipplesConfig
from unbackdoor.attacks.sos import SOS, SOSConfig
from unbackdoor.attacks.survival import TriggerSurvival, trigger_survival
from unbackdoor.attacks.weight import WEIGHT_ATTACKS, WeightAttack, WeightAttackConfig, run_weight_attack

__all__ = ["ATTACKS", "AddSent", "AddSentConfig", "Attack", "AttackConfig", "BadNets", "BadNetsConfig", "DeadCode",
           "DeadCodeConfig", "EPConfig", "EmbeddingPoisoning", "InsertionAttack", "LWPConfig", "LWS", "LWSConfig", "LayerwisePoisoning",
           "NeuBA", "NeuBAConfig", "POR", "PORConfig", "PublishedAttack", "PublishedConfig", "RIPPLES",
           "RipplesConfig", "SOS", "SOSConfig", "StyleBkd", "SynBkd", "TROJANEDCM_TRIGGERS", "TriggerSurvival",
           "WEIGHT_ATTACKS", "WeightAttack", "WeightAttackConfig", "run_weight_attack", "trigger_survival"]
