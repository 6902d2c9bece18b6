"""Will the model fit? Bytes planned from the hyperparameters alone, before any weight is read.

    weights    every weight in its storage dtype (minillama.dtypes): float32 4 bytes, float16 2,
               int8 1 + a float32 scale per group; norms and the embedding table stay float32
    KV cache   2 (k and v) * n_layers * max_batch_size * max_seq_len * n_kv_heads * head_dim * 4
    working    what one forward pass over a whole prompt (max_batch_size x prompt_len tokens)
               holds at its peak: the residual stream and a norm's temporaries, plus the largest
               of attention (softmax keeps about 4 copies of the scores), the feed-forward
               (about 5 arrays of hidden_dim) and the logits (forward returns every position's);
               plus, for float16 and int8 weights, the float32 copy the matmul makes of the
               largest weight (int8 makes two: groups, then groups * scales)
These are estimates of what model.py and ops.py allocate, rounded up, not measurements.

plan_memory(...) compares the total with the free memory on the target (MemAvailable from
/proc/meminfo for the CPU, cudaMemGetInfo for the GPU) and, when it does not fit, works out
which single change would: a smaller dtype, a shorter max_seq_len, a smaller batch, the CPU.
"""
from dataclasses import dataclass, field
from typing import List, Optional

from .dtypes import WEIGHT_DTYPES, check_dtype, resolve_dtype, role, stored_nbytes
from .errors import ArgumentError, OutOfMemoryError, check_positive_int
from .model import ModelArgs, reuses_embedding, weight_shapes

CUDA_RESERVE = 256 << 20     # cuBLAS workspace, kernel modules, pool slack: not in our arrays
F32 = 4


def fmt_bytes(n):
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


# ----------------------------------------------------------------------------
# the parts

def weights_bytes(p: ModelArgs, dtype, tied=False):
    """Bytes of every weight stored in `dtype`; a tied classifier is the embedding (no bytes)."""
    return sum(stored_nbytes(shape, dtype, role(name)) for name, shape in weight_shapes(p).items()
               if not (tied and name == "output.weight"))


def kv_cache_bytes(p: ModelArgs, max_seq_len, max_batch_size):
    return 2 * p.n_layers * max_batch_size * max_seq_len * p.n_kv_heads * p.head_dim * F32


def working_bytes(p: ModelArgs, dtype, max_seq_len, max_batch_size, prompt_len):
    tokens = max_batch_size * prompt_len
    residual = 4 * p.dim                                  # x, h, and rms_norm's temporaries
    qkv = (p.n_heads + 2 * p.n_kv_heads) * p.head_dim
    attention = 3 * qkv + 4 * p.n_heads * prompt_len      # qkv, rotated copy, q; 4 x scores
    feed_forward = 5 * p.hidden_dim
    per_token = residual + max(attention, feed_forward, p.vocab_size)
    rope = max_seq_len * p.head_dim * F32                 # cos and sin tables
    mask = prompt_len * prompt_len * F32                  # the causal mask softmax adds
    largest = max(p.vocab_size * p.dim, 2 * p.hidden_dim * p.dim, qkv * p.dim)  # fused w13, wqkv
    upcast = {"float32": 0, "float16": 1, "int8": 2}[dtype] * largest * F32
    return tokens * per_token * F32 + rope + mask + upcast


# ----------------------------------------------------------------------------
# free memory on the target

def free_memory(device):
    """(bytes free for the model on `device`, where the number comes from); None when unknown."""
    if device == "cuda":
        try:
            import cupy
            return int(cupy.cuda.runtime.memGetInfo()[0]), "cudaMemGetInfo"
        except Exception:                 # no CuPy, no GPU: get_ops('cuda') will say so
            return None, "no usable GPU"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable"
    except OSError:
        pass
    return None, "no /proc/meminfo"


# ----------------------------------------------------------------------------
# the plan

@dataclass
class MemoryPlan:
    params: ModelArgs
    device: str
    dtype: str
    max_seq_len: int
    max_batch_size: int
    prompt_len: int
    tied: bool
    weights: int
    kv_cache: int
    working: int
    budget: Optional[int]             # free bytes on the target; None when unknown
    budget_source: str
    host_budget: Optional[int] = None     # for the "use the CPU" option when device is cuda
    options: List[str] = field(default_factory=list)

    @property
    def total(self):
        return self.weights + self.kv_cache + self.working

    @property
    def fits(self):
        return self.budget is None or self.total <= self.budget

    def summary(self):
        return (f"{fmt_bytes(self.total)} (weights {fmt_bytes(self.weights)} as {self.dtype}, "
                f"KV cache {fmt_bytes(self.kv_cache)} for {self.max_batch_size} x "
                f"{self.max_seq_len} positions, working buffers {fmt_bytes(self.working)})")

    def format(self):
        p = self.params
        free = (f"unknown ({self.budget_source}): not checked" if self.budget is None
                else f"{fmt_bytes(self.budget)} ({self.budget_source}): "
                     + ("fits" if self.fits else "DOES NOT FIT"))
        lines = [
            f"memory plan: {self.device}, --dtype {self.dtype}, --max_seq_len {self.max_seq_len}, "
            f"--max_batch_size {self.max_batch_size}",
            f"  weights   {fmt_bytes(self.weights):>11}",
            f"  KV cache  {fmt_bytes(self.kv_cache):>11}   2 x {p.n_layers} layers x "
            f"{self.max_batch_size} x {self.max_seq_len} x {p.n_kv_heads} kv heads x "
            f"{p.head_dim} x 4 bytes",
            f"  working   {fmt_bytes(self.working):>11}   activations and logits for "
            f"{self.max_batch_size} x {self.prompt_len} prompt tokens",
            f"  total     {fmt_bytes(self.total):>11}",
            f"  free      {free}",
        ]
        if not self.fits:
            lines.append("  options that fit: " + ("; ".join(self.options) or "none"))
        return "\n".join(lines)

    def message(self):
        opts = ("options that fit: " + "; ".join(self.options) if self.options else
                "nothing fits: no smaller dtype, sequence, batch or device is enough")
        return (f"model does not fit on {self.device}: it needs {self.summary()} but "
                f"{fmt_bytes(self.budget)} is free ({self.budget_source}); {opts}")

    def check(self):
        """Raise OutOfMemoryError (both numbers, and what would fit) unless the plan fits."""
        if not self.fits:
            raise OutOfMemoryError(self.message())
        return self


def plan_memory(params, dtype, max_seq_len, max_batch_size, device="cpu", budget=None, *,
                tied=False, prompt_len=None, host_budget=None):
    """The MemoryPlan for `params` stored in `dtype` on `device` ("cpu" or "cuda").

    budget: free bytes on the target (default: measured). prompt_len: the longest prompt
    (default max_seq_len, the worst case). host_budget: free host RAM for the CPU option when
    device is cuda (default: measured). tied: the classifier is the embedding table."""
    dtype = check_dtype(dtype) or "float32"
    if device not in ("cpu", "cuda"):
        raise ArgumentError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    check_positive_int("max_seq_len", max_seq_len)
    check_positive_int("max_batch_size", max_batch_size)
    prompt_len = min(prompt_len or max_seq_len, max_seq_len)
    source = "given"
    if budget is None:
        budget, source = free_memory(device)
    plan = _plan(params, dtype, max_seq_len, max_batch_size, device, prompt_len, tied,
                 budget, source)
    plan.host_budget = host_budget
    if not plan.fits:
        plan.options = _options(plan)
    return plan


def _plan(p, dtype, seq, bsz, device, prompt_len, tied, budget, source):
    working = working_bytes(p, dtype, seq, bsz, prompt_len)
    if device == "cuda":
        working += CUDA_RESERVE
    return MemoryPlan(p, device, dtype, seq, bsz, prompt_len, tied,
                      weights_bytes(p, dtype, tied), kv_cache_bytes(p, seq, bsz), working,
                      budget, source)


def _variant(plan, **change):
    """The same plan with some settings changed (prompt_len follows a shorter max_seq_len)."""
    s = dict(dtype=plan.dtype, seq=plan.max_seq_len, bsz=plan.max_batch_size,
             device=plan.device, budget=plan.budget, source=plan.budget_source)
    s.update(change)
    return _plan(plan.params, s["dtype"], s["seq"], s["bsz"], s["device"],
                 min(plan.prompt_len, s["seq"]), plan.tied, s["budget"], s["source"])


def _largest(fits, hi):
    """The largest n in [1, hi] with fits(n), or None (fits is monotone: smaller fits better)."""
    if hi < 1 or not fits(1):
        return None
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _options(plan):
    """Single changes that make `plan` fit, each with the total it would need."""
    options = []
    smaller = WEIGHT_DTYPES[WEIGHT_DTYPES.index(plan.dtype) + 1:]
    for d in smaller:
        v = _variant(plan, dtype=d)
        if v.fits:
            options.append(f"--dtype {d} ({fmt_bytes(v.total)})")
    seq = _largest(lambda n: _variant(plan, seq=n).fits, plan.max_seq_len - 1)
    if seq:
        options.append(f"--max_seq_len {seq} ({fmt_bytes(_variant(plan, seq=seq).total)})")
    bsz = _largest(lambda n: _variant(plan, bsz=n).fits, plan.max_batch_size - 1)
    if bsz:
        options.append(f"--max_batch_size {bsz} "
                       f"({fmt_bytes(_variant(plan, bsz=bsz).total)})")
    if plan.device == "cuda":
        host, source = ((plan.host_budget, "given") if plan.host_budget is not None
                        else free_memory("cpu"))
        v = _variant(plan, device="cpu", budget=host, source=source)
        if host is not None and v.fits:
            options.append(f"--device cpu ({fmt_bytes(v.total)} of {fmt_bytes(host)} "
                           f"{source})")
    if not options and smaller:
        # no single change is enough: the smallest dtype with the longest sequence that fits
        d = smaller[-1]
        seq = _largest(lambda n: _variant(plan, dtype=d, seq=n).fits, plan.max_seq_len)
        if seq:
            options.append(f"--dtype {d} --max_seq_len {seq} "
                           f"({fmt_bytes(_variant(plan, dtype=d, seq=seq).total)})")
    return options


def plan_checkpoint(ckpt, dtype=None, device="cpu", budget=None, **kwargs):
    """plan_memory for an opened checkpoint (weights may still be LazyTensors on disk): the
    dtype None means the checkpoint's own, and a classifier the model takes from its embedding
    table is counted once (model.reuses_embedding: a tied Q8 classifier is held apart)."""
    w, p = ckpt.weights, ckpt.params
    return plan_memory(p, resolve_dtype(dtype, w), p.max_seq_len, p.max_batch_size, device,
                       budget, tied=reuses_embedding(w), **kwargs)
