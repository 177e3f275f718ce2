"""Error types that the CLI turns into one clear line instead of a traceback."""


class CondloraError(Exception):
    """A user mistake (bad config, bad path, bad option): reported as one line."""


class ConfigError(CondloraError, ValueError):
    """A config key, value or override that does not fit the schema."""


class LoRAError(CondloraError, ValueError):
    """A LoRA method, target pattern or file that cannot be used."""


class DataError(CondloraError, ValueError):
    """A data path that is missing or a file that is malformed."""
