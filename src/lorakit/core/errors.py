"""Exceptions lorakit raises. Every message says what was wrong and how to fix it."""


class LorakitError(Exception):
    """Base class of every error lorakit raises on purpose."""


class ConfigError(LorakitError, ValueError):
    """A configuration field holds a value outside its allowed range."""


class TargetError(LorakitError, ValueError):
    """`target_modules` matched nothing, or matched a layer the method cannot adapt."""


class AdapterFileError(LorakitError, ValueError):
    """An adapter folder is missing, corrupt, pickled, or does not fit the model."""


class AdapterConfigError(AdapterFileError, ConfigError):
    """An adapter file's config holds a field of the wrong kind or out of range (both a file and a
    config problem: `except ConfigError` and `except AdapterFileError` both catch it)."""


class LorakitWarning(UserWarning):
    """Base class of every warning lorakit gives on purpose."""


class DtypeConversionWarning(LorakitWarning):
    """An adapter file's tensors were converted to another dtype on load (once per load, naming the dtypes)."""
