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
