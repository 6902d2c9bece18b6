"""Every error minillama raises on purpose is a MiniLlamaError.

The command line turns these into one line on stderr and exit status 2; anything else is a bug
(exit status 1). Each message names the file, field or argument at fault and what was expected.

A message shows values that came from a file or the command line (a path, a GGUF key, a dtype,
a pickle global); such a value may hold anything, a terminal escape sequence or 4 MB of text.
`shown(value)` is the one way to put one into a message: control characters escaped, cut to
VALUE_LIMIT characters with the full length said. As a last guard, a MiniLlamaError's text is
always one line of at most MESSAGE_LIMIT characters, control characters escaped.
"""

VALUE_LIMIT = 100            # characters of one value a message shows
MESSAGE_LIMIT = 1000         # characters of a whole message (the longest real ones are ~500)


def _escaped(text):
    """`text` with every character a terminal could act on written as an escape (\\x1b, \\n,
    \\x9b, a lone surrogate \\udc80); printable characters, spaces included, as they are."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _cut(text, limit):
    """`text` cut in the middle to `limit` characters, "..." where the cut is."""
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    return text[:head] + "..." + text[len(text) - (limit - head):]


def shown(value, quote=True, limit=VALUE_LIMIT):
    """`value` (from a file or argv) as a message shows it: a str quoted as repr() quotes it
    ('llama'), or with quote=False bare (a path); anything else as its repr(). Control
    characters escaped (\\x1b), and what is shown cut in the middle to `limit` characters,
    the value's own length said: 'blk.0.attn_qxxxx...xxxx.weight' (4,194,304 characters)."""
    if isinstance(value, str):
        text, unit = (repr(value) if quote else _escaped(value)), "characters"
    elif isinstance(value, bytes):
        text, unit = repr(value), "bytes"
    else:
        text, unit = _escaped(repr(value)), "characters of repr"
    size = len(value) if isinstance(value, (str, bytes)) else len(text)
    return text if len(text) <= limit else f"{_cut(text, limit)} ({size:,} {unit})"


def one_line(message):
    """A message as it is printed: control characters (newlines too) escaped, cut to
    MESSAGE_LIMIT characters."""
    text = _escaped(message)
    return text if len(text) <= MESSAGE_LIMIT else \
        f"{_cut(text, MESSAGE_LIMIT)} ({len(text):,} characters)"


class MiniLlamaError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in minillama."""

    def __str__(self):
        return one_line(super().__str__())


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


class StreamError(MiniLlamaError):
    """A standard stream minillama needs is closed: stdout, or stdin in chat."""


def check_tokenizer_path(name, path):
    """A tokenizer path given to the CLI or the API: None where it was left out, refused where
    it is "": an empty path (an unset variable in a script, say) names no file, and taken as
    left out it would fall back to another tokenizer. Returns it."""
    if path == "":
        raise ArgumentError(f"{name}: expected a tokenizer file, got an empty path")
    return path


def check_positive_int(name, value):
    """The one check for sizes and counts given to the API (max_seq_len, steps, dim, ...):
    an int (NumPy's too, not a bool) of at least 1; returns it."""
    import numbers
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ArgumentError(f"{name}: expected a positive integer, got {shown(value)}")
    return value
