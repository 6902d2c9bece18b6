"""A random checkpoint: every weight of a model's shapes, under Meta's names, from a seed.

For tests, stand-in files and benchmarks (speed does not depend on the values).
"""
import numpy as np

from ..model import ModelArgs, weight_shapes


def random_weights(p: ModelArgs, seed=0, tied=False, scale=None):
    """Random float32 weights for every tensor of `p`, under Meta's names. Norm weights sit
    near 1 and matrices near N(0, 1/in) (N(0, scale^2) with `scale`), so activations keep a
    sane size through the layers. tied: output.weight is the embedding array itself, as a
    shared classifier is."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in weight_shapes(p).items():
        if len(shape) == 1:
            weights[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            std = scale if scale is not None else 1.0 / np.sqrt(shape[1])
            weights[name] = (std * rng.standard_normal(shape)).astype(np.float32)
    if tied:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    return weights
