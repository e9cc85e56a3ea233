"""Safe loading and saving of Hugging Face classifiers; the default base model."""

from unbackdoor.models.loading import (
    Classifier,
    check_same_architecture,
    default_base_path,
    load_classifier,
    read_provenance,
)
from unbackdoor.models.saving import provenance_record, save_classifier

__all__ = [
    "Classifier",
    "check_same_architecture",
    "default_base_path",
    "load_classifier",
    "provenance_record",
    "read_provenance",
    "save_classifier",
]
