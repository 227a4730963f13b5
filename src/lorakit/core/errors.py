"""Exceptions lorakit raises. Every message says what was wrong and how to fix it."""


class LorakitError(Exception):
    """Base class of every error lorakit raises on purpose."""


class ConfigError(LorakitError, ValueError):
    """A configuration field holds a value outside its allowed range."""


class TargetError(LorakitError, ValueError):
    """`target_modules` matched nothing, or matched a layer the method cannot adapt."""


class AdapterFileError(LorakitError, ValueError):
    """An adapter folder is missing, corrupt, pickled, or does not fit the model."""
