"""Will the model fit? Bytes planned from the hyperparameters and the formats the file stores
its weights in, before any weight is read.

    weights    every weight as stored (minillama.dtypes decides each one's format): float32 4
               bytes, float16 and bfloat16 2, Packed q8_0 / q4_0 / q4_1 34 / 18 / 20 bytes per
               block of 32 (formats.bytes_for), llama2.c's Q8 groups 1 + a float32 scale per
               group; the embedding as the float32 table the model gathers from, the
               classifier as stored (no bytes when it is that same float32 table)
    KV cache   2 (k and v) * n_layers * max_batch_size * max_seq_len * n_kv_heads * head_dim
               * 4 bytes (float32), or * 2 (--kv-dtype float16)
    working    what one forward pass over a whole prompt (max_batch_size x prompt_len tokens)
               holds at its peak: the residual stream and a norm's temporaries, plus the largest
               of attention (softmax keeps about 4 copies of the scores), the feed-forward
               (about 5 arrays of hidden_dim) and the logits (forward returns every position's);
               plus the float32 copy linear() makes of the largest weight not stored as
               float32: on the CPU a Packed weight's block of rows (ops.LINEAR_CHUNK_BYTES;
               none on the GPU, whose kernels read it as stored, but for the float16 copy of a
               k-quant matrix a prompt is multiplied by), Q8 groups two whole copies
               (groups, then groups * scales); plus, for a float16 cache, the float32 copy of the
               keys and values one layer reads
    loading    what loading holds for a moment on the CPU, beside the weights, the largest
               of: storing one weight (the bytes read, widened to float32, quantized:
               QUANTIZE_COPIES) in the checkpoint's order; laying one float32 matrix out
               column-major (loading.lay_out); building the model, whose wqkv and w13 are
               fused copies made while the checkpoint's separate wq, wk, wv, w1, w3 live (for
               a float32 Llama ~70% of the weights), with a float32 embedding table made from
               one stored otherwise. The separate weights are let go once the model is built
               (loading.build_model, used by load_model, Llama.build and `minillama run`),
               so the peak is weights + KV cache + the larger of working and loading
These are estimates of what model.py and ops.py allocate, rounded up, not measurements
(tests/test_robust.py holds the total to within 10% of the peak RSS a process measures).

plan_memory(...) compares the total with the free memory on the target (for the CPU,
MemAvailable from /proc/meminfo, or less where a memory cgroup, v1 or v2, sets a lower limit;
cudaMemGetInfo for the GPU) and, when it does not fit, works out
which single change would: a smaller dtype, a shorter max_seq_len, a smaller batch, the CPU.
plan_checkpoint(...) plans an opened checkpoint, and makes the CPU rule for --dtype None: a file
stored in Packed formats (GGUF blocks, bf16) is expanded to float32 at load when that fits,
because NumPy multiplies float32 fastest; else it is kept as stored. `minillama info` says which.
"""
import math
from dataclasses import dataclass, field
from typing import List, Optional

from .checks import check_kv_dtype
from .dtypes import (DTYPE_FORMATS, Q8_GROUPS, WEIGHT_DTYPES, check_dtype, role, source_format,
                     storage_name, storage_plan, stored_nbytes)
from .errors import ArgumentError, OutOfMemoryError, check_positive_int
from .formats import kquants
from .model import ModelArgs, classifier_is_embedding, weight_shapes
from .ops import LINEAR_CHUNK_BYTES

CUDA_RESERVE = 256 << 20     # cuBLAS workspace, kernel modules, pool slack: not in our arrays
F32 = 4
KV_BYTES = {"float32": 4, "float16": 2}
# float32 copies of a block of rows that formats.dequantize holds at its peak: bf16 widens
# through a uint32 copy, Q4 unpacks its codes to bytes first, the scales widen too; the
# k-quants unpack their bit fields to bytes (measured with tracemalloc: 1.37 to 1.91)
DEQUANTIZE_COPIES = {"f16": 1, "bf16": 2, "q8_0": 1.125, "q4_0": 1.375, "q4_1": 1.5,
                     "q2_k": 1.5, "q3_k": 1.75, "q4_k": 1.5, "q5_k": 1.5, "q6_k": 2, Q8_GROUPS: 2}
# ... and the float32-sized arrays quantizing a float32 weight holds at its peak, the result
# included (measured with tracemalloc: f16 0.75, bf16 2.0, q8_0 3.06, q4_0 2.13)
QUANTIZE_COPIES = {"f16": 0.75, "bf16": 2.0, "q8_0": 3.1, "q4_0": 2.15, Q8_GROUPS: 2.0}


def fmt_bytes(n):
    if n >= 1 << 80:          # a header's absurd sizes: the order of magnitude says enough
        digits = str(int(n))  # (n / size would not fit a float past ~1e308)
        return f"{digits[0]}.{digits[1]}e{len(digits) - 1} B"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


# ----------------------------------------------------------------------------
# the parts

def storage_of(p: ModelArgs, dtype, tied=False, sources=None):
    """{name: format} for every weight of `p` (dtypes.storage_plan). sources: {name: format as
    the file stores it}; by default every weight float32 (a plan from the hyperparameters)."""
    sources = sources or {}
    return storage_plan({name: (sources.get(name, "f32"), shape)
                         for name, shape in weight_shapes(p).items()}, dtype, tied)


def weights_bytes(p: ModelArgs, dtype, tied=False, sources=None):
    """Bytes of every weight as the model holds it (see the module docstring)."""
    return _weights_bytes(p, storage_of(p, dtype, tied, sources), tied)


def _weights_bytes(p, storage, tied):
    total = 0
    for name, shape in weight_shapes(p).items():
        if name == "tok_embeddings.weight":
            total += F32 * math.prod(shape)              # the float32 table gathered from
        elif not (tied and name == "output.weight" and storage[name] == "f32"):
            total += stored_nbytes(storage[name], shape)
    return total


def kv_cache_bytes(p: ModelArgs, max_seq_len, max_batch_size, kv_dtype="float32"):
    per_value = KV_BYTES[check_kv_dtype(kv_dtype)]
    return 2 * p.n_layers * max_batch_size * max_seq_len * p.n_kv_heads * p.head_dim * per_value


def working_bytes(p: ModelArgs, dtype, max_seq_len, max_batch_size, prompt_len,
                  kv_dtype="float32", storage=None, device="cpu"):
    tokens = max_batch_size * prompt_len
    residual = 4 * p.dim                                  # x, h, and rms_norm's temporaries
    qkv = (p.n_heads + 2 * p.n_kv_heads) * p.head_dim
    attention = 3 * qkv + 4 * p.n_heads * prompt_len      # qkv, rotated copy, q; 4 x scores
    feed_forward = 5 * p.hidden_dim
    per_token = residual + max(attention, feed_forward, p.vocab_size)
    rope = max_seq_len * p.head_dim * F32                 # cos and sin tables
    mask = prompt_len * prompt_len * F32                  # the causal mask softmax adds
    storage = storage or storage_of(p, dtype)
    kv_upcast = 0 if kv_dtype == "float32" else 2 * max_batch_size * max_seq_len * p.kv_dim * F32
    return (tokens * per_token * F32 + rope + mask + _upcast_bytes(p, storage, device)
            + kv_upcast)


def loading_bytes(p: ModelArgs, storage, tied=False, device="cpu", sources=None):
    """What loading holds beside the weights, at its peak (module docstring): the larger of
    storing one weight (read, widened, narrowed) and building the model (the fused copies). On
    the GPU the host does both, one weight or layer at a time: nothing extra on the device."""
    if device == "cuda":
        return 0
    # loading.lay_out copies each float32 matrix column-major, one at a time, after storing
    laying_out = max((F32 * math.prod(shape) for name, shape in weight_shapes(p).items()
                      if len(shape) == 2 and storage[name] == "f32"), default=0)
    return max(_storing_bytes(p, storage, tied, sources or {}), laying_out,
               _build_bytes(p, storage, tied))


def _storing_bytes(p, storage, tied, sources):
    """store_weights stores the weights one after another, in the checkpoint's order (that of
    `sources`): its peak is what is kept so far plus what storing the next one holds. Returned
    as the bytes above the weights' total."""
    shapes = weight_shapes(p)
    order = [name for name in sources if name in shapes] or list(shapes)
    kept = peak = 0
    for name in order:
        if tied and name == "output.weight":
            continue                                       # the embedding's table, stored once
        fmt, shape = storage[name], shapes[name]
        peak = max(peak, kept + stored_nbytes(fmt, shape)
                   + _store_bytes(sources.get(name, "f32"), fmt, shape))
        kept += stored_nbytes(fmt, shape)
    return max(peak - kept, 0)


def _store_bytes(source, fmt, shape):
    """Held beyond the kept weight while one weight arriving as `source` is stored as `fmt`, in
    two steps: the bytes read and their float32 values (dequantize's temporaries included);
    then, the bytes read let go, the float32 values and quantize's arrays."""
    if fmt == source:
        return 0                                   # read straight into the form it is kept in
    n4 = F32 * math.prod(shape)
    read = 0 if source == "f32" else stored_nbytes(source, shape)
    widen = read + (n4 if source == "f32" else _times(DEQUANTIZE_COPIES[source], n4))
    narrow = 0 if fmt == "f32" else n4 + _times(QUANTIZE_COPIES[fmt], n4)
    return max(max(widen, narrow) - stored_nbytes(fmt, shape), 0)


def _times(copies, n):
    """copies * n in integers (a hostile header's n does not fit a float)."""
    return n * round(copies * 1000) // 1000


def _build_bytes(p, storage, tied):
    """Held beside the stored weights while model.py builds the model: wqkv and w13, fused
    copies of every layer (the separate weights live until the model is built), the largest
    of them twice if float32 (concatenated, then laid out column-major); and the float32
    embedding table made from a table stored otherwise, the stored one beside it."""
    shapes = weight_shapes(p)
    groups = {}
    for name, shape in shapes.items():
        parts = name.split(".")
        if parts[-2] in ("wq", "wk", "wv", "w1", "w3"):
            key = (parts[1], parts[-2] in ("w1", "w3"))
            groups[key] = groups.get(key, 0) + stored_nbytes(storage[name], shape)
    fused = sum(groups.values())
    if any(storage[n] == "f32" for n in shapes if n.split(".")[-2] in ("wq", "w1")):
        fused += max(groups.values(), default=0)
    embedding, table = storage["tok_embeddings.weight"], shapes["tok_embeddings.weight"]
    if embedding != "f32":
        fused += F32 * math.prod(table) + (0 if tied else stored_nbytes(embedding, table))
    return fused


def _upcast_bytes(p, storage, device):
    """The largest float32 copy linear() makes of a weight not stored as float32 (on the GPU,
    the float16 copy a prompt multiplies a k-quant matrix through, kquant_to_f16)."""
    qkv = (p.n_heads + 2 * p.n_kv_heads) * p.head_dim
    fused = {"wq": qkv, "wk": qkv, "wv": qkv, "w1": 2 * p.hidden_dim, "w3": 2 * p.hidden_dim}
    worst = 0
    for name, shape in weight_shapes(p).items():
        fmt = storage[name]
        if role(name) != "linear" or fmt == "f32":
            continue
        kind = name.split(".")[-2]                            # wq, ..., w3, output
        count = fused.get(kind, shape[0]) * shape[1]          # the matrix linear() multiplies
        if device == "cuda" and fmt != Q8_GROUPS:          # the kernels read the rest as stored
            worst = max(worst, 2 * count if fmt in kquants.FIELDS else 0)
        elif fmt == Q8_GROUPS:      # runq's integer products (quant.matmul_q8) widen the
            worst = max(worst, count * F32)                  # codes to float32 once
        else:
            chunk = min(count * F32, LINEAR_CHUNK_BYTES)
            worst = max(worst, int(DEQUANTIZE_COPIES[fmt] * chunk))
    return worst


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
    free, source = None, "no /proc/meminfo"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free, source = int(line.split()[1]) * 1024, "MemAvailable"
    except OSError:
        pass
    # inside a container the host's MemAvailable is not ours: the cgroup's limit decides when
    # the kernel kills us (signal 9, no message), so the smaller of the two counts
    limited = cgroup_free()
    if limited is not None and (free is None or limited[0] < free):
        free, source = limited
    return free, source


CGROUP_ROOT = "/sys/fs/cgroup"
# (version, limit file, usage file, the memory.stat key of page cache the kernel can drop)
CGROUP_FILES = [("v2", "memory.max", "memory.current", "inactive_file"),
                ("v1", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")]


def cgroup_free(root=CGROUP_ROOT, proc_cgroup="/proc/self/cgroup"):
    """(bytes left under the tightest memory cgroup limit of this process, "cgroup vN
    FILE"), or None where no cgroup sets one. Left = limit - (usage - inactive page cache),
    for the process's own cgroup and each one above it (a parent's limit binds too)."""
    best = None
    for version, limit_file, usage_file, inactive_key in CGROUP_FILES:
        for folder in _cgroup_folders(root, proc_cgroup, version):
            limit = _read_int(f"{folder}/{limit_file}")
            usage = _read_int(f"{folder}/{usage_file}")
            if limit is None or usage is None or limit >= 1 << 60:     # "max": no limit
                continue
            usage -= _stat_value(f"{folder}/memory.stat", inactive_key)
            left = max(limit - usage, 0)
            if best is None or left < best[0]:
                best = (left, f"cgroup {version} {limit_file}")
    return best


def _cgroup_folders(root, proc_cgroup, version):
    """The cgroup folders of this process, its own first and then each parent up to the
    mount's root (in a container the mount's root is often its own cgroup)."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if (version == "v2" and controllers == "") or \
                (version == "v1" and "memory" in controllers.split(",")):
            mount = root if version == "v2" else f"{root}/memory"
            parts = [p for p in path.split("/") if p]
            return [f"{mount}/{'/'.join(parts[:n])}".rstrip("/")
                    for n in range(len(parts), -1, -1)]
    return []


def _read_int(path):
    try:
        with open(path) as f:
            text = f.read().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def _stat_value(path, key):
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


# ----------------------------------------------------------------------------
# the plan

@dataclass
class MemoryPlan:
    params: ModelArgs
    device: str
    dtype: str                        # the storage in words: "float32", ..., "as stored (q4_1)"
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
    kv_dtype: str = "float32"
    load_dtype: Optional[str] = None  # the dtype for store_weights: None keeps the file's formats
    storage: dict = field(default_factory=dict)       # name -> format (dtypes.storage_plan)
    sources: Optional[dict] = None    # name -> the format the file stores it in
    note: str = ""                    # how the weights are stored, and why (minillama info)
    loading: int = 0                  # held beside the weights while the model is built

    @property
    def total(self):
        return self.weights + self.kv_cache + max(self.working, self.loading)

    @property
    def fits(self):
        return self.budget is None or self.total <= self.budget

    def summary(self):
        return (f"{fmt_bytes(self.total)} (weights {fmt_bytes(self.weights)} as {self.dtype}, "
                f"KV cache {fmt_bytes(self.kv_cache)} for {self.max_batch_size} x "
                f"{self.max_seq_len} positions, working buffers {fmt_bytes(self.working)}"
                f"{self._loading_words()})")

    def _loading_words(self):
        return (f" or, while loading, {fmt_bytes(self.loading)}"
                if self.loading > self.working else "")

    def format(self):
        p = self.params
        free = (f"unknown ({self.budget_source}): not checked" if self.budget is None
                else f"{fmt_bytes(self.budget)} ({self.budget_source}): "
                     + ("fits" if self.fits else "DOES NOT FIT"))
        dtype = f"--dtype {self.dtype}" if self.dtype in WEIGHT_DTYPES else f"weights {self.dtype}"
        kv = "" if self.kv_dtype == "float32" else f", --kv-dtype {self.kv_dtype}"
        lines = [
            f"memory plan: {self.device}, {dtype}{kv}, --max_seq_len {self.max_seq_len}, "
            f"--max_batch_size {self.max_batch_size}",
            f"  weights   {fmt_bytes(self.weights):>11}",
            f"  KV cache  {fmt_bytes(self.kv_cache):>11}   2 x {p.n_layers} layers x "
            f"{self.max_batch_size} x {self.max_seq_len} x {p.n_kv_heads} kv heads x "
            f"{p.head_dim} x {KV_BYTES[self.kv_dtype]} bytes",
            f"  working   {fmt_bytes(self.working):>11}   activations and logits for "
            f"{self.max_batch_size} x {self.prompt_len} prompt tokens",
            f"  loading   {fmt_bytes(self.loading):>11}   storing or laying out one weight, or "
            f"the fused wqkv and w13 while the file's weights live (the total counts the "
            f"larger of working and loading)",
            f"  total     {fmt_bytes(self.total):>11}",
            f"  free      {free}",
        ]
        if self.note:
            lines.insert(2, f"  storage   {self.note}")
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
                tied=False, prompt_len=None, host_budget=None, kv_dtype="float32",
                sources=None):
    """The MemoryPlan for `params` stored in `dtype` on `device` ("cpu" or "cuda").

    budget: free bytes on the target (default: measured). prompt_len: the longest prompt
    (default max_seq_len, the worst case). host_budget: free host RAM for the CPU option when
    device is cuda (default: measured). tied: the classifier is the embedding table.
    kv_dtype: the KV cache's, "float32" or "float16". sources: {name: format} the file stores
    each weight in (default float32; dtype None keeps them)."""
    check_dtype(dtype)
    check_kv_dtype(kv_dtype)
    if device not in ("cpu", "cuda"):
        raise ArgumentError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    check_positive_int("max_seq_len", max_seq_len)
    check_positive_int("max_batch_size", max_batch_size)
    prompt_len = min(prompt_len or max_seq_len, max_seq_len)
    source = "given"
    if budget is None:
        budget, source = free_memory(device)
    settings = dict(dtype=dtype, seq=max_seq_len, bsz=max_batch_size, device=device,
                    prompt_len=prompt_len, tied=tied, budget=budget, source=source,
                    kv_dtype=kv_dtype, sources=sources)
    plan = _plan(params, settings)
    plan.host_budget = host_budget
    if not plan.fits:
        plan.options = _options(plan)
    return plan


def _plan(p, s):
    storage = storage_of(p, s["dtype"], s["tied"], s["sources"])
    working = working_bytes(p, s["dtype"], s["seq"], s["bsz"], s["prompt_len"], s["kv_dtype"],
                            storage, s["device"])
    if s["device"] == "cuda":
        working += CUDA_RESERVE
    return MemoryPlan(p, s["device"], storage_name(storage, s["dtype"]), s["seq"], s["bsz"],
                      s["prompt_len"], s["tied"], _weights_bytes(p, storage, s["tied"]),
                      kv_cache_bytes(p, s["seq"], s["bsz"], s["kv_dtype"]), working,
                      s["budget"], s["source"], kv_dtype=s["kv_dtype"], load_dtype=s["dtype"],
                      storage=storage, sources=s["sources"],
                      loading=loading_bytes(p, storage, s["tied"], s["device"], s["sources"]))


def _variant(plan, **change):
    """The same plan with some settings changed (prompt_len follows a shorter max_seq_len)."""
    s = dict(dtype=plan.load_dtype, seq=plan.max_seq_len, bsz=plan.max_batch_size,
             device=plan.device, budget=plan.budget, source=plan.budget_source,
             tied=plan.tied, kv_dtype=plan.kv_dtype, sources=plan.sources)
    s.update(change)
    s["prompt_len"] = min(plan.prompt_len, s["seq"])
    variant = _plan(plan.params, s)
    variant.host_budget = plan.host_budget
    return variant


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
    smaller = [d for d in WEIGHT_DTYPES if _variant(plan, dtype=d).weights < plan.weights]
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
    if not options:
        # no single change is enough: the widest smaller dtype that leaves room for a
        # sequence, with the longest sequence that fits
        for d in smaller:
            seq = _largest(lambda n: _variant(plan, dtype=d, seq=n).fits, plan.max_seq_len)
            if seq:
                options.append(f"--dtype {d} --max_seq_len {seq} "
                               f"({fmt_bytes(_variant(plan, dtype=d, seq=seq).total)})")
                break
    return options


# ----------------------------------------------------------------------------
# an opened checkpoint, and the CPU rule

def plan_checkpoint(ckpt, dtype=None, device="cpu", budget=None, kv_dtype="float32", **kwargs):
    """plan_memory for an opened checkpoint (weights may still be LazyTensors on disk), from
    the formats its weights are stored in; a tied classifier counts as the model holds it.

    With dtype None: on the GPU the weights are kept as stored (the kernels read every
    format). On the CPU, Packed weights are expanded to float32 at load when the float32 plan
    fits (NumPy multiplies float32 fastest: the plan's load_dtype is then "float32"), and kept
    as stored otherwise (linear() then dequantizes a block of rows at a time, slower). The
    plan's note says which and why."""
    w, p = ckpt.weights, ckpt.params
    plan = plan_memory(p, dtype, p.max_seq_len, p.max_batch_size, device, budget,
                       tied=classifier_is_embedding(w), kv_dtype=kv_dtype,
                       sources={name: source_format(x) for name, x in w.items()}, **kwargs)
    if dtype is not None:
        plan.note = _exceptions(plan, dtype)
        return plan
    packed = sorted({fmt for fmt in plan.storage.values() if fmt not in ("f32", Q8_GROUPS)})
    if not packed:
        return plan
    if device == "cuda":
        plan.note = f"as stored ({', '.join(packed)}): the GPU kernels read each format directly"
        return plan
    expanded = _variant(plan, dtype="float32")
    if expanded.fits:
        free = "" if plan.budget is None else f" of {fmt_bytes(plan.budget)}"
        expanded.note = (f"float32, expanded at load from the file's {', '.join(packed)}: it "
                         f"fits ({fmt_bytes(expanded.total)}{free}), and on the CPU float32 is "
                         f"the fast path (NumPy has no packed product); as stored: "
                         f"{fmt_bytes(plan.total)}")
        return expanded
    plan.note = (f"as stored ({', '.join(packed)}): float32 would need {fmt_bytes(expanded.total)}, more than the "
                 f"{fmt_bytes(plan.budget)} free, so each matrix is dequantized a block of rows "
                 f"at a time, just before its product (slower than float32)")
    return plan


def _exceptions(plan, dtype):
    """For an explicit dtype: the matrices not kept in its format because their rows are not
    whole blocks of 32 (stories260K's w2: 172 values), in words; "" if none."""
    want, others = DTYPE_FORMATS[dtype], {}
    for name, shape in weight_shapes(plan.params).items():
        fmt = plan.storage[name]
        if role(name) == "linear" and fmt != want and shape[-1] % 32:
            kind = name.split(".", 2)[-1] if name.startswith("layers.") else name
            others.setdefault((kind[:-len(".weight")], fmt), []).append(name)
    words = {"f32": "float32", Q8_GROUPS: "llama2.c's Q8 groups (float32 scales)"}
    parts = [f"{kind} x {len(names)}: {words.get(fmt, fmt)}"
             for (kind, fmt), names in sorted(others.items())]
    return (f"{want}, except where rows are not whole blocks of 32: " + "; ".join(parts)
            if parts else "")
