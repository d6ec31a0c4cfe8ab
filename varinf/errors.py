"""The errors varinf raises for bad input, each with a message that names the problem and the fix."""


class ConfigError(ValueError):
    """A recipe or constructor argument is invalid."""


class DataError(RuntimeError):
    """Data is missing, truncated, corrupt or out of range: a file, or a tensor of the wrong shape
    or with values outside what the model takes."""


class NumericalError(FloatingPointError):
    """Training produced a NaN or inf; raised before the bad step can reach a checkpoint."""
