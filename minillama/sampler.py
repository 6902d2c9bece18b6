"""Choosing the next token from the logits.

Two samplers, each faithful to the program it mirrors:

- `Llama2cSampler`: llama2.c's `sample()`, bit for bit. Its own xorshift64* generator, argmax at
  temperature 0, otherwise softmax(logits / temperature) (scaled_logits: where a tiny
  temperature overflows that, its limit, the argmax) and either plain multinomial sampling
  or top-p (nucleus) sampling with llama2.c's pre-filter cutoff (1 - topp) / (n - 1).
  Arithmetic is float32, summed left to right as the C loops do, so a seed gives the same
  story as llama2.c's `run` (given the same logits: exact.ExactDecoder's).
- `sample_top_p`: Meta's `sample_top_p` for `generate`, batched, driven by a NumPy Generator.

Sampling runs on the host: the work is tiny, and the same seed then gives the same tokens on
every device.
"""
import numpy as np

from .errors import ArgumentError
from .exact import expf, softmax_c

# ----------------------------------------------------------------------------
# llama2.c's random numbers: xorshift64*

MASK64 = (1 << 64) - 1


def random_u32(state):
    """One step of xorshift64*: (new state, 32 random bits). `state` is a Python int."""
    state ^= state >> 12
    state ^= (state << 25) & MASK64
    state ^= state >> 27
    return state, ((state * 0x2545F4914F6CDD1D) & MASK64) >> 32


def random_f32(state):
    """(new state, a float32 in [0, 1)): the top 24 of the 32 bits, as llama2.c takes them."""
    state, bits = random_u32(state)
    return state, np.float32(bits >> 8) / np.float32(16777216.0)


# ----------------------------------------------------------------------------
# llama2.c's sampler

def check_sampling_args(temperature, top_p):
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise ArgumentError(f"{name}: expected a number, got {value!r}")
    if not np.isfinite(temperature) or temperature < 0:
        raise ArgumentError(f"temperature: expected a number >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ArgumentError(f"top_p: expected a number in (0, 1], got {top_p}")


def scaled_logits(logits, temperature):
    """logits / temperature, as both samplers divide them, but for a row where that overflows
    float32 (a tiny temperature such as 1e-38, or 1e-40 as a subnormal float32): there
    softmax would take inf - inf = NaN and sample garbage, so the row takes temperature 0's
    pick, all of the probability on its first largest logit (the limit T -> 0 where that logit
    is the only largest; among equal largest ones the limit would share it), written as
    logits 0 there and -inf elsewhere. The samplers then draw as they always do and land on
    that token. No usual temperature overflows (a logit
    of 100 needs T < 3e-37), so their results stay llama2.c's and Meta's, bit for bit.
    logits: (..., vocab), finite."""
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):   # 1e-50 is 0 in float32
        scaled = logits / temperature
    overflowed = ~np.isfinite(scaled).all(axis=-1)
    if overflowed.any():
        limit = np.full_like(scaled, -np.inf)
        np.put_along_axis(limit, np.argmax(logits, axis=-1)[..., None], 0, axis=-1)
        scaled = np.where(overflowed[..., None], limit, scaled)
    return scaled


def rounded_exp(x):
    """exp in float64, rounded once to float32: glibc's expf but for the last bit of about 1
    value in 1,500, and vectorized, where calling expf itself costs a C call per value."""
    return np.exp(x.astype(np.float64)).astype(np.float32)


def first_above(cdf, value):
    """Index of the first cdf entry with value < cdf (llama2.c's `if (coin < cdf)` loops)."""
    hits = np.flatnonzero(value < cdf)
    return int(hits[0]) if hits.size else None


class Llama2cSampler:
    """exact: take the softmax's exp from the C library, expf itself, as llama2.c does; else
    rounded_exp, the same draws but for a coin within a last bit of a boundary (--exact)."""

    def __init__(self, vocab_size, temperature=1.0, topp=0.9, rng_seed=0, exact=False):
        check_sampling_args(temperature, topp)
        self.exp = expf if exact else rounded_exp
        self.vocab_size = vocab_size
        self.temperature = np.float32(temperature)
        self.topp = np.float32(topp)
        self.rng_state = int(rng_seed) & MASK64

    def sample(self, logits):
        """logits: (vocab_size,) float32 -> the next token id."""
        logits = np.asarray(logits, dtype=np.float32)
        if self.temperature == 0:
            return int(np.argmax(logits))                  # first maximum, as the C loop
        probs = softmax_c(scaled_logits(logits, self.temperature), self.exp)
        self.rng_state, coin = random_f32(self.rng_state)
        if self.topp <= 0 or self.topp >= 1:
            return self.sample_mult(probs, coin)
        return self.sample_topp(probs, coin)

    def sample_mult(self, probs, coin):
        i = first_above(np.cumsum(probs, dtype=np.float32), coin)
        return len(probs) - 1 if i is None else i          # rounding: fall back to the last

    def sample_topp(self, probs, coin):
        n = len(probs)
        # Tokens below the cutoff can never be in the nucleus: skip sorting them.
        cutoff = (np.float32(1) - self.topp) / np.float32(n - 1)
        candidates = np.flatnonzero(probs >= cutoff)
        order = candidates[np.argsort(-probs[candidates], kind="stable")]   # descending
        cumulative = np.cumsum(probs[order], dtype=np.float32)
        over = first_above(cumulative, self.topp)         # first i with cumulative > topp
        last_idx = len(order) - 1 if over is None else over
        r = coin * cumulative[last_idx]
        i = first_above(cumulative[:last_idx + 1], r)
        return int(order[last_idx if i is None else i])


# ----------------------------------------------------------------------------
# Meta's sampler for generate()

# Meta sorts the whole vocabulary to find the nucleus; a stable sort of 32000 probabilities
# takes ~2.7 ms on a 2-core CPU (12.5 ms at Llama 3's 128256), longer than a 7B step on a
# GPU. The nucleus is nearly always among the most likely few hundred, so those are sorted
# first (a partition finds them in ~0.2 ms), then more of them, and the whole vocabulary only
# where they all hold too little of the mass (nucleus_order says why the tokens drawn are the
# same either way).
NUCLEUS_CANDIDATES = (1024, 8192)
NUCLEUS_MARGIN = 1e-3       # the candidates' mass past p that makes every other token's certain


def sample_top_p(probs, p, rng):
    """Nucleus sampling, batched, as Meta's sample_top_p.
    probs: (bsz, vocab) -> (bsz,) token ids. Keeps the smallest set of most likely tokens whose
    probability mass reaches p (a token stays if the mass *before* it is <= p), renormalises,
    and draws one token per row."""
    probs_idx = np.stack([nucleus_order(row, p) for row in probs])   # descending, as it matters
    probs_sort = np.take_along_axis(probs, probs_idx, axis=-1)
    probs_sum = np.cumsum(probs_sort, axis=-1)
    probs_sort[probs_sum - probs_sort > p] = 0.0
    probs_sort /= probs_sort.sum(axis=-1, keepdims=True)
    # torch.multinomial(probs_sort, 1), by inverting the CDF at a uniform draw
    u = rng.random((probs.shape[0], 1))
    choice = (np.cumsum(probs_sort, axis=-1) <= u).sum(axis=-1, keepdims=True)
    kept = (probs_sort > 0).sum(axis=-1, keepdims=True)
    choice = np.minimum(choice, kept - 1)          # rounding at the top edge: the last kept token
    return np.take_along_axis(probs_idx, choice, axis=-1)[:, 0]


def nucleus_order(row, p, candidates=NUCLEUS_CANDIDATES):
    """The token ids of one row of probabilities (vocab,) in the order sample_top_p needs: the
    most likely first, ties by id (Meta's stable sort of -probs), as far as the nucleus and
    past it; the rest by id.

    The k most likely (with every token tied with the last of them), k the first of
    `candidates` that holds enough of the mass, are sorted alone: no other token is as likely,
    so they are the sorted vocabulary's first m entries, and the cumulative sums over them are
    the same float32 sums. Where their mass passes p by
    NUCLEUS_MARGIN (far more than float32's rounding of ~1e-4 can move a sum of them), the
    mass before each other token passes p in either order, so every one of them is zeroed,
    and the masked array, its sums and the token drawn are the same as after the whole sort.
    Where none does (a flat distribution, p near 1), the whole vocabulary is sorted."""
    n = row.shape[0]
    for k in candidates:
        if n <= 2 * k:
            break
        t = np.partition(row, n - k)[n - k]                     # the k-th largest
        top = np.flatnonzero(row >= t)
        if row[top].sum(dtype=np.float64) > p + NUCLEUS_MARGIN:
            return np.concatenate([top[descending(row[top])], np.flatnonzero(row < t)])
    return descending(row)


def descending(values):
    """np.argsort(-values, kind="stable"): positions by value, largest first, ties by position.
    For float32 probabilities (>= 0, whose bits order as the values do) a faster sort gives
    the same: each position's key is its value's bits, inverted so that the largest comes
    first, above the position itself, so that no two keys tie and any sort is stable (a
    quicksort of 32000 such keys takes half a stable float sort's time)."""
    bits = values.view(np.uint32) if values.dtype == np.float32 else None
    # (-0.0 and NaN order otherwise as bits than as values: the stable sort takes them)
    if bits is None or (bits >> 31).any() or not (values >= 0).all():
        return np.argsort(-values, kind="stable")
    keys = np.invert(bits).astype(np.uint64) << np.uint64(32)
    keys |= np.arange(values.shape[0], dtype=np.uint64)
    return (np.sort(keys) & np.uint64(0xFFFFFFFF)).astype(np.int64)
