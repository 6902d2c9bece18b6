"""Every error minillama raises on purpose is a MiniLlamaError.

The command line turns these into one line on stderr and exit status 2; anything else is a bug
(exit status 1). Each message names the file, field or argument at fault and what was expected.
"""


class MiniLlamaError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in minillama."""


class CheckpointError(MiniLlamaError):
    """A model file is missing, truncated, or not in the format it claims to be."""


class TokenizerError(MiniLlamaError):
    """A tokenizer file is missing or malformed, or does not fit the model."""


class ArgumentError(MiniLlamaError, ValueError):
    """An argument (CLI flag or API parameter) is outside its accepted range."""


class DeviceError(MiniLlamaError):
    """The requested device (e.g. cuda) is not usable: no CuPy, no GPU, or a kernel misuse."""


class OutOfMemoryError(MiniLlamaError):
    """The planned memory for a model does not fit on the target."""


class GenerationError(MiniLlamaError):
    """Generation cannot go on: the sequence is full, or the logits are not finite."""


class DownloadError(MiniLlamaError):
    """A model file could not be fetched or failed its checksum."""


def check_positive_int(name, value):
    """The one check for sizes and counts given to the API (max_seq_len, steps, dim, ...):
    an int (NumPy's too, not a bool) of at least 1; returns it."""
    import numbers
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ArgumentError(f"{name}: expected a positive integer, got {value!r}")
    return value
