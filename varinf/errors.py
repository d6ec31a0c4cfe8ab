"""The errors varinf raises for bad input, each with a message that names the problem and the fix."""


class ConfigError(ValueError):
    """A recipe or constructor argument is invalid."""


class DataError(RuntimeError):
    """A data file is missing, truncated, corrupt or not what it claims to be."""


class NumericalError(FloatingPointError):
    """Training produced a NaN or inf; raised before the bad step can reach a checkpoint."""
