"""Checkpoint readers: each turns a file (or directory) into (ModelArgs, weights under Meta's names)."""
from .llama2c import load_llama2c, write_llama2c

__all__ = ["load_llama2c", "write_llama2c"]
