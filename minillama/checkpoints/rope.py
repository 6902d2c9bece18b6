"""RoPE scaling as each checkpoint format writes it, and the parts of Llama 3.x that minillama
does not run, refused by name. model.py's RopeScaling and precompute_freqs do the math.

    Meta's params.json     "use_scaled_rope": true            Meta's defaults, RopeScaling()
                                                               (factor 8, 1, 4, 8192)
    Hugging Face config    "rope_scaling" (transformers 4) or "rope_parameters" (5) with
                           "rope_type": "llama3", "factor", "low_freq_factor",
                           "high_freq_factor", "original_max_position_embeddings"
    GGUF                   tensor rope_freqs.weight: one float32 divisor per pair of a head,
                           what llama.cpp's converter computed from the same four numbers

Only Llama 3's scaling is computed; the others (linear, dynamic, yarn, longrope ...) change
RoPE in other ways and are refused, naming the one the file asks for.
"""
import numpy as np

from ..errors import CheckpointError, shown
from ..model import RopeScaling

LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# params.json keys of Llama 3.x checkpoints that are not a text-only transformer
META_UNSUPPORTED = {
    "vision_chunk_size": "vision (Llama 3.2 Vision: an image encoder and cross-attention layers)",
    "vision_num_cross_attention_layers": "vision (Llama 3.2 Vision's cross-attention layers)",
    "vision_model": "vision (an image encoder)",
    "quantization_args": "Meta's quantized weights (int4/int8 with their own scales)",
    "lora_args": "LoRA adapters (Meta's QLoRA checkpoints)",
}


def vision_note(architecture):
    """What a refusal adds for Llama 3.2 Vision, whose GGUF architecture and config.json
    model_type are both 'mllama'."""
    return " (Llama 3.2 Vision: images are not supported)" if architecture == "mllama" else ""


def meta_rope_scaling(cfg, path):
    """RopeScaling from params.json: Meta's defaults when use_scaled_rope is true, else None.
    Refuses the Llama 3.x checkpoints that are more than a text transformer."""
    for key, what in META_UNSUPPORTED.items():
        value = cfg.get(key)
        if value is not None and value != -1 and value != {}:
            raise CheckpointError(f"{path}: {key} is set: {what} is not supported by minillama, "
                                  f"which runs text-only Llama models")
    use = cfg.get("use_scaled_rope", False)
    if not isinstance(use, bool):
        raise CheckpointError(f"{path}: field 'use_scaled_rope' must be true or false, "
                              f"got {shown(use)}")
    return RopeScaling() if use else None


def hf_rope_scaling(cfg, path):
    """RopeScaling from a config.json, or None for plain RoPE; other scaling types refused."""
    # transformers 4 writes rope_scaling beside rope_theta; transformers 5 writes both in
    # rope_parameters. Older files name the type "type" instead of "rope_type".
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(scaling, dict):
        raise CheckpointError(f"{path}: rope_scaling must be an object, got {shown(scaling)}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise CheckpointError(f"{path}: RoPE scaling type {shown(kind)} is not supported "
                              f"(minillama computes 'llama3' scaling only)")
    missing = [k for k in LLAMA3_KEYS if k not in scaling]
    if missing:
        raise CheckpointError(f"{path}: RoPE scaling 'llama3' needs {', '.join(missing)}")
    # the numbers are checked with the other hyperparameters (checks.check_rope_scaling)
    return RopeScaling(*(scaling[k] for k in LLAMA3_KEYS))


def gguf_rope_freq_factors(gf, head_dim):
    """The rope_freqs tensor of a GGUF, as a tuple of head_dim // 2 divisors, or None. Other
    scaling (llama.rope.scaling.type linear, yarn ...) is refused."""
    kind = gf.metadata.get("llama.rope.scaling.type", "none")
    if kind != "none":
        raise CheckpointError(f"{gf.path}: RoPE scaling type {shown(kind)} is not supported "
                              f"(minillama computes Llama 3's, stored as the rope_freqs tensor)")
    if "rope_freqs.weight" not in gf.tensors:
        return None
    factors = np.asarray(gf.tensor("rope_freqs.weight"), np.float32).reshape(-1)
    if factors.size != head_dim // 2 or not (np.isfinite(factors).all() and (factors > 0).all()):
        raise CheckpointError(f"{gf.path}: tensor 'rope_freqs.weight' must hold {head_dim // 2} "
                              f"positive numbers, one per pair of a head")
    return tuple(factors.tolist())
