"""unbackdoor: give people clean language models back from backdoor poisoning."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("unbackdoor")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
