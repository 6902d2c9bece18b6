"""Meta's model-parallel layout: which slice of every weight rank r of N holds.

Meta's `llama/model.py` builds its layers from fairscale's parallel layers, and its 13B and 70B
checkpoints are saved already cut that way, one consolidated.NN.pth per rank:

    ColumnParallelLinear  wq wk wv w1 w3 output   rows (outputs) cut in N: rank r's heads,
                                                  hidden units, vocabulary entries
    RowParallelLinear     wo w2                   columns (inputs) cut in N: the heads and
                                                  hidden units rank r computed
    ParallelEmbedding     tok_embeddings          columns (the width) cut in N
    the norms                                     whole on every rank

So a rank computes its own heads and hidden units from the whole residual stream, and only
two products, wo and w2, give partial sums (of the whole width) that need the other ranks':
one all-reduce after each (model.py in this package). The cuts are equal (Meta's rule): N
must divide n_kv_heads (a kv head and the query heads sharing it stay on one rank), hidden_dim,
vocab_size and dim. A column cut of a weight stored in blocks (q8_0, q4_0, q4_1, llama2.c's Q8
groups) must fall on a block boundary; anything else is refused with one line saying why.

    shard_args(p, rank, world)            RankArgs: the sizes rank r computes with
    shard_weights(weights, p, rank, world) {name: rank r's slice}, each still lazy if it was
    slice_weight(w, axis, start, stop)    one slice of an array, Packed, Q8Tensor or LazyTensor
"""
from dataclasses import dataclass

import numpy as np

from .. import formats
from ..checkpoints.meta import ROW_PARALLEL, concat_axis
from ..dtypes import LazyTensor
from ..errors import ArgumentError, check_positive_int, shown
from ..formats import Packed
from ..quant import Q8Tensor

COLUMN_PARALLEL = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
                   "feed_forward.w1.weight", "feed_forward.w3.weight", "output.weight")


def split_axis(name):
    """The axis weight `name` is cut along: 0 (rows), 1 (columns), or None (whole on every
    rank): the axis checkpoints/meta.py joins Meta's shards along (concat_axis), for a name
    of Meta's layout only."""
    if not (name.endswith(("norm.weight", *ROW_PARALLEL, *COLUMN_PARALLEL))
            or name == "tok_embeddings.weight"):
        raise ArgumentError(f"{shown(name)}: not a weight of Meta's layout")
    return concat_axis(name)


@dataclass(frozen=True)
class RankArgs:
    """The sizes one rank computes with: its share of the heads and hidden units and of the
    classifier's rows, the whole width. The attributes model.Attention, FeedForward and
    TransformerBlock read have ModelArgs' names; vocab_size is the whole vocabulary, what the
    rank hands back after gathering the logits, and vocab_part its own rows of the classifier."""
    rank: int
    world: int
    dim: int                # the residual stream: whole on every rank
    n_layers: int
    n_heads: int            # this rank's query heads, n_heads / world
    n_kv_heads: int         # this rank's kv heads, n_kv_heads / world
    head_dim: int
    hidden_dim: int         # this rank's hidden units, hidden_dim / world
    vocab_size: int         # the whole vocabulary (the logits after gathering)
    vocab_part: int         # this rank's classifier rows, vocab_size / world
    norm_eps: float
    rope_theta: float
    max_batch_size: int
    max_seq_len: int

    @property
    def kv_dim(self):
        return self.n_kv_heads * self.head_dim


def check_world(p, world):
    """Refuse a world size Meta's layout cannot cut `p` into, in one line naming the field."""
    check_positive_int("tensor_parallel", world)
    if p.n_kv_heads % world:
        raise ArgumentError(f"tensor_parallel: {world} GPUs cannot share {p.n_kv_heads} kv heads "
                            f"(n_kv_heads must be a multiple of the GPU count: each kv head stays "
                            f"on one GPU with the query heads that read it)")
    for field in ("hidden_dim", "vocab_size", "dim"):
        if getattr(p, field) % world:
            raise ArgumentError(f"tensor_parallel: {field} {getattr(p, field)} does not split "
                                f"into {world} equal parts (Meta's layout cuts it evenly)")
    return world


def shard_args(p, rank, world):
    """RankArgs of rank `rank` of `world` for the model of ModelArgs `p`."""
    check_world(p, world)
    return RankArgs(rank=rank, world=world, dim=p.dim, n_layers=p.n_layers,
                    n_heads=p.n_heads // world, n_kv_heads=p.n_kv_heads // world,
                    head_dim=p.head_dim, hidden_dim=p.hidden_dim // world,
                    vocab_size=p.vocab_size, vocab_part=p.vocab_size // world,
                    norm_eps=p.norm_eps, rope_theta=p.rope_theta,
                    max_batch_size=p.max_batch_size, max_seq_len=p.max_seq_len)


def part(n, rank, world):
    """(start, stop) of rank's equal part of n."""
    size = n // world
    return rank * size, (rank + 1) * size


def shard_weights(weights, p, rank, world):
    """{name: rank's slice} of every weight (arrays, Packed, Q8Tensors or LazyTensors: a lazy
    weight stays lazy, and only its slice is kept once it is read). A tied classifier is cut
    by rows and the embedding by columns, so on a rank they are two different slices."""
    check_world(p, world)
    return {name: shard_weight(name, w, rank, world) for name, w in weights.items()}


def shard_weight(name, w, rank, world):
    axis = split_axis(name)
    if axis is None or world == 1:
        return w
    start, stop = part(w.shape[axis], rank, world)
    return slice_weight(w, axis, start, stop, name)


# ----------------------------------------------------------------------------
# one slice of a weight, in any storage

def slice_weight(w, axis, start, stop, name="weight"):
    """Rows (axis 0) or columns (axis 1) start:stop of a (rows, cols) weight, stored as it was:
    a NumPy or CuPy array, a Packed (its planes cut; columns only on block boundaries), a
    Q8Tensor (columns only on group boundaries) or a LazyTensor (still lazy: the slice is cut
    when it is read, and only the slice is kept)."""
    if isinstance(w, LazyTensor):
        return _slice_lazy(w, axis, start, stop, name)
    if isinstance(w, Packed):
        return _slice_packed(w, axis, start, stop, name)
    if isinstance(w, Q8Tensor):
        g = w.group_size
        _check_boundary(name, "Q8 groups", g, start, stop)
        s = slice(start // g, stop // g)
        if axis == 0:
            return Q8Tensor(w.q[start:stop].copy(), w.s[start:stop].copy(), g, w.w8a8)
        return Q8Tensor(w.q[:, start:stop].copy(), w.s[:, s].copy(), g, w.w8a8)
    return (w[start:stop] if axis == 0 else w[:, start:stop]).copy()     # C-contiguous


def _slice_lazy(w, axis, start, stop, name):
    """A LazyTensor of the slice. Where the reader maps the file (w.raw), reading it reads only
    the slice's bytes: rows start:stop, or in every row the bytes of columns start:stop (whole
    blocks of a block format); else the whole weight is read and the slice kept."""
    shape = list(w.shape)
    shape[axis] = stop - start
    if w.raw is None:
        return LazyTensor(shape, w.format, lambda: slice_weight(w.read(), axis, start, stop, name))
    if axis == 1:
        _check_boundary(name, f"{w.format} blocks", formats.module(w.format).BLOCK, start, stop)

    def read():
        rows, cols = w.shape
        data = w.raw().reshape(rows, formats.bytes_for(w.format, (1, cols)))   # one row a line
        if axis == 0:
            window = data[start:stop]
        else:
            window = data[:, formats.bytes_for(w.format, (1, start)):
                          formats.bytes_for(w.format, (1, stop))]
        packed = formats.from_gguf(np.ascontiguousarray(window), w.format, tuple(shape),
                                   f"{name} (columns {start}:{stop})" if axis else
                                   f"{name} (rows {start}:{stop})")
        return packed.data if "data" in packed.planes else packed        # as w.read() gives
    return LazyTensor(shape, w.format, read)


def _slice_packed(w, axis, start, stop, name):
    rows, cols = w.shape
    if axis == 0:
        return Packed(w.format, (stop - start, cols),
                      {k: a[start:stop].copy() for k, a in w.planes.items()})
    block = formats.module(w.format).BLOCK
    _check_boundary(name, f"{w.format} blocks", block, start, stop)
    cut = slice(start // block, stop // block)          # planes are (rows, blocks[, bytes])
    return Packed(w.format, (rows, stop - start),
                  {k: a[:, cut].copy() for k, a in w.planes.items()})


def _check_boundary(name, what, block, start, stop):
    if start % block or stop % block:
        raise ArgumentError(f"tensor_parallel: {name} is stored in {what} of {block} values, "
                            f"and its columns {start}:{stop} for this GPU do not fall on block "
                            f"boundaries; use fewer GPUs or --dtype float16")
