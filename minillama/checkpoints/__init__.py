"""Checkpoint readers: each turns a file (or directory) into (ModelArgs, weights under Meta's names)."""
import json

from ..errors import CheckpointError


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


from .llama2c import load_llama2c  # noqa: E402  (after the helper it may use)

__all__ = ["load_llama2c", "read_json_object"]
