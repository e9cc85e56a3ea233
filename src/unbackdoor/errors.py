"""User-facing errors. The CLI prints each as one line and exits with status 2."""


class UnbackdoorError(Exception):
    """Bad input of any kind: a path, a file, a config value, a model."""


class DataError(UnbackdoorError):
    """A dataset cannot be read or does not have the expected shape."""


class ConfigError(UnbackdoorError):
    """A configuration value or method name is invalid."""


class ModelError(UnbackdoorError):
    """A model directory cannot be loaded or does not fit the task."""


class UnsafeWeightsError(ModelError):
    """A model directory holds only pickle weights and pickle loading was not allowed."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message, shortened to ``limit`` characters: what a
    one-line error may quote of a library's (often many-line) message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
