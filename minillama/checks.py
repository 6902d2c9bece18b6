"""What the public API refuses, and where a NaN came from.

model.py is the lesson; the checks on its input live here, one per place where input arrives:

    check_model_args(p)                 ModelArgs' fields (ModelArgs.__post_init__), RoPE scaling
                                        included (check_rope_scaling)
    check_kv_dtype(kv_dtype)            the KV cache's dtype (Transformer, the memory plan)
    check_weights(shapes, weights, source)
                                        every weight present, of its shape (Transformer.__init__,
                                        the checkpoint readers)
    check_tokens(tokens, start_pos, p)  a forward's tokens and position (Transformer.forward)
    check_finite(logits, model, tokens, start_pos)
                                        the logits of a step (generate, run); on NaN or inf,
                                        locate_nonfinite replays the step to name the layer

Each raises a MiniLlamaError subclass with one line naming the field or argument at fault.
model.py imports this module, so this module never imports model.py: what a check needs (the
expected shapes, the hyperparameters, the model) is passed in.
"""
import math

import numpy as np

from .errors import ArgumentError, CheckpointError, GenerationError, check_positive_int, shown
from .formats import Packed
from .ops import to_host
from .quant import Q8Tensor

KV_DTYPES = ("float32", "float16")


# ----------------------------------------------------------------------------
# the model's hyperparameters and weights

def check_model_args(p):
    """Raise ArgumentError naming the first ModelArgs field the model cannot run with."""
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim",
                 "max_batch_size", "max_seq_len"):
        check_positive_int(name, getattr(p, name))
    if p.dim % p.n_heads or p.head_dim % 2:
        raise ArgumentError(f"dim: {p.dim} must split into {p.n_heads} heads of even size")
    if p.n_heads % p.n_kv_heads:
        raise ArgumentError(f"n_kv_heads: {p.n_kv_heads} must divide n_heads ({p.n_heads})")
    # a NaN here would make every logit NaN, silently: refuse it up front
    if not _positive(p.rope_theta):
        raise ArgumentError(f"rope_theta: expected a finite number > 0, got {shown(p.rope_theta)}")
    check_norm_eps(p.norm_eps)
    check_rope_scaling(p)


def _real(value):
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def finite_number(value):
    """A real number (not a bool) and finite: also not an int past a float's range (1 and 400
    zeros), which math.isfinite refuses with an OverflowError."""
    try:
        return _real(value) and math.isfinite(value)
    except OverflowError:
        return False


def _positive(value):
    return finite_number(value) and value > 0


def check_norm_eps(eps):
    """RMSNorm's eps: a number in [0, 1). It is added in float32 to the mean of the squared
    activations, so one finite as a float64 but past float32's range (1e300) would be inf there
    and every normalized activation 0, silently. And a model's eps only keeps that mean from
    being 0 (1e-5, 1e-6): one of 1 or more would outweigh the activations it normalizes, a
    misread field rather than a model, so [0, 1) refuses both."""
    if not (_real(eps) and 0 <= eps < 1):
        raise ArgumentError(f"norm_eps: expected a number >= 0 and < 1, got {shown(eps)}")


def check_rope_scaling(p):
    """Llama 3's RoPE scaling, as numbers (model.RopeScaling) or as a GGUF's per-pair divisors:
    a zero, negative or NaN one would turn every angle into NaN."""
    s = p.rope_scaling
    if s is not None:
        values = [s.factor, s.low_freq_factor, s.high_freq_factor,
                  s.original_max_position_embeddings]
        if not all(map(_positive, values)) or s.low_freq_factor >= s.high_freq_factor:
            raise ArgumentError(f"rope_scaling: llama3 RoPE scaling {shown(values)} must be "
                                f"positive numbers with low_freq_factor < high_freq_factor")
    factors = p.rope_freq_factors
    if factors is not None and (len(factors) != p.head_dim // 2 or not all(map(_positive, factors))):
        raise ArgumentError(f"rope_freq_factors: expected {p.head_dim // 2} positive numbers, "
                            f"one per pair of a head")


def check_kv_dtype(kv_dtype):
    """The KV cache's dtype: float32 (the reference) or float16 (half the bytes)."""
    if kv_dtype not in KV_DTYPES:
        raise ArgumentError(f"kv_dtype: expected one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    return kv_dtype


def check_weights(shapes, weights, source="checkpoint"):
    """Raise CheckpointError naming the first missing or mis-shaped tensor.

    shapes: (name, shape) pairs in order, model.iter_weight_shapes(p). They are read one at a
    time and the check stops at the first tensor missing, so a header that claims 2**63 layers
    costs no more than the layers the file really has."""
    for name, shape in shapes:
        if name not in weights:
            raise CheckpointError(f"{source}: tensor {name!r} is missing")
        got = tuple(weights[name].shape)
        if got != shape:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {got}, expected {shape}")


# ----------------------------------------------------------------------------
# a forward's input

def check_tokens(tokens, start_pos, p):
    """tokens as a (bsz, seqlen) int64 host array, after checking them against ModelArgs p.
    On the host, before anything indexes with them: NumPy would read tok_embeddings[-1] for a
    pad id of -1 without complaint."""
    host = to_host(tokens)
    if host.ndim != 2 or host.size == 0 or host.dtype.kind not in "iu":
        raise ArgumentError(f"tokens: expected a non-empty (bsz, seqlen) integer array, "
                            f"got shape {host.shape} dtype {host.dtype}")
    bsz, seqlen = host.shape
    if isinstance(start_pos, bool) or not isinstance(start_pos, (int, np.integer)):
        raise ArgumentError(f"start_pos: expected an integer, got {start_pos!r}")
    if bsz > p.max_batch_size:
        raise ArgumentError(f"tokens: batch of {bsz} is larger than max_batch_size "
                            f"{p.max_batch_size}")
    if not 0 <= start_pos or start_pos + seqlen > p.max_seq_len:
        raise GenerationError(f"start_pos: positions {start_pos}..{start_pos + seqlen - 1} "
                              f"do not fit max_seq_len {p.max_seq_len}")
    bad = (host < 0) | (host >= p.vocab_size)
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise ArgumentError(f"tokens: id {int(host[row, col])} at row {row}, column {col} is "
                            f"outside the vocabulary [0, {p.vocab_size}); a pad id must never "
                            f"reach the embedding")
    return host.astype(np.int64, copy=False)


# ----------------------------------------------------------------------------
# the output: NaN and inf, and where they first appear

def check_finite(logits, model, tokens, start_pos):
    """Raise GenerationError if `logits` (what model.forward(tokens, start_pos) returned, or a
    slice of it) hold a NaN or an infinity, naming the layer where it first appeared.
    Cheap while all is well: one pass over the logits. Only on failure is the step re-run,
    stage by stage, to find where (locate_nonfinite; a model without forward_stages, such as
    a test's stand-in, is not located)."""
    logits = to_host(logits)
    if np.isfinite(logits).all():
        return
    kind = "NaN" if np.isnan(logits).any() else "an infinity"
    seqlen = np.shape(tokens)[1]
    where = locate_nonfinite(model, tokens, start_pos) if hasattr(model, "forward_stages") else ""
    raise GenerationError(f"the logits hold {kind} at positions {start_pos}.."
                          f"{start_pos + seqlen - 1}{'; ' if where else ''}{where}")


def locate_nonfinite(model, tokens, start_pos):
    """Where model.forward(tokens, start_pos) first makes a NaN or inf: its stages
    (Transformer.forward_stages), checked after each. Replaying a step leaves the KV cache as it
    was: a call reads the positions below start_pos, which it never writes, and rewrites
    positions start_pos.. with values computed from the same input, i.e. the same values."""
    xp = model.ops.xp
    tokens = check_tokens(tokens, start_pos, model.params)
    for stage, h in model.forward_stages(tokens, start_pos):
        if not bool(xp.isfinite(h).all()):
            return "it first appears in " + _describe(stage, model, xp)
    return "a replay of the same step was finite (a nondeterministic fault?)"


def _describe(stage, model, xp):
    """A stage of forward_stages in words, for the error message."""
    if stage == "tok_embeddings":
        return "tok_embeddings, the embedding rows of the input tokens"
    if stage == "norm":
        return "the final norm (norm.weight)"
    if stage == "output":
        return "the classifier (output.weight)"
    i = int(stage.split(".")[1])                                   # "layers.{i}"
    return f"layer {i} ({stage}); {_weights_note(model.layers[i], xp)}"


def _weights_note(layer, xp):
    """Which weights of a block hold NaN or inf: a damaged checkpoint, or else an overflow."""
    weights = {"attention_norm": layer.attention_norm, "attention.wq/wk/wv": layer.attention.wqkv,
               "attention.wo": layer.attention.wo, "ffn_norm": layer.ffn_norm,
               "feed_forward.w1/w3": layer.feed_forward.w13,
               "feed_forward.w2": layer.feed_forward.w2}
    bad = [name for name, w in weights.items() if not _finite(w, xp)]
    if bad:
        return f"its weights {', '.join(bad)} are not finite (a damaged checkpoint?)"
    note = "its weights are finite, so the activations overflowed there"
    attention = layer.attention            # the replay has just rewritten this step's rows
    if attention.cache_k.dtype == xp.float16 and not (
            bool(xp.isfinite(attention.cache_k).all()) and bool(xp.isfinite(attention.cache_v).all())):
        note += ("; its KV cache is float16 and holds inf (a key or value past 65504): try "
                 "--kv-dtype float32")
    return note


def _finite(w, xp):
    """Are a weight's floating-point numbers finite: an array's values, a Q8Tensor's scales, a
    Packed weight's float planes (bf16 bits are checked when read, formats.check_finite)."""
    if isinstance(w, Q8Tensor):
        return bool(xp.isfinite(w.s).all())
    planes = w.planes.values() if isinstance(w, Packed) else [w]
    return all(bool(xp.isfinite(a).all()) for a in planes if a.dtype.kind == "f")
