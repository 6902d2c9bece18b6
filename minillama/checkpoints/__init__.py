"""Checkpoint readers: each turns a file (or directory) into (ModelArgs, weights under Meta's names)."""
import json

from ..checks import finite_number
from ..errors import CheckpointError, shown


def read_json_object(path, what):
    """A JSON file that must hold one object (params.json, config.json)."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the {what} ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return obj


# What a field of a JSON config (config.json, params.json) may hold, as a message says it. Taken
# as Python would take them, 12.9 layers would be 12 and true 1, the string "false" would be
# True and "1e-5" a number; a string of 3,000 characters would fill the message.
FIELD_KINDS = {
    "a positive integer": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "a finite number": finite_number,
    "true or false": lambda v: isinstance(v, bool),
}
REQUIRED = object()


def json_field(cfg, path, key, expected, default=REQUIRED):
    """cfg[key] if it is what `expected` (a key of FIELD_KINDS) says; `default` where the
    file has no such key or null, unless the field is REQUIRED. Else a CheckpointError naming
    the file and the field."""
    value = cfg.get(key)
    if value is None and default is not REQUIRED:
        return default
    if not FIELD_KINDS[expected](value):
        raise CheckpointError(f"{path}: field {shown(key)} must be {expected}, "
                              f"got {shown(value)}")
    return value


from .llama2c import load_llama2c  # noqa: E402  (after the helper it may use)

__all__ = ["json_field", "load_llama2c", "read_json_object"]
