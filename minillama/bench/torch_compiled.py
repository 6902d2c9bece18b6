"""The fast PyTorch reference: a Llama written the way gpt-fast writes one, for the GPU benchmark.

    python -m minillama.bench.torch_compiled [--shape 7B] [--layers N] [--dtype bfloat16]
                                             [--batches 1,8] [--steps 200] [--prefill 512]

`python -m minillama.bench gpu` measures minillama beside this model, same shape, same run: it
is what a user who wants speed would run instead. It shares no code with minillama's model
(only ModelArgs and the weight names), and it is fast for the reasons gpt-fast
(pytorch-labs/gpt-fast, model.py and generate.py) is fast:

    static KV cache   (bsz, n_kv_heads, max_seq_len, head_dim), allocated once and written in
                      place at positions held in a device tensor: every decode step has the same
                      shapes and the same addresses, so one CUDA graph serves every position
    fused weights     wq|wk|wv -> wqkv and w1|w3 -> w13: one matmul each instead of 3 and 2
    SDPA              F.scaled_dot_product_attention over the whole cache, a boolean mask row
                      per position hiding the slots not yet written
    compiled step     forward + argmax as one function, torch.compile(mode="reduce-overhead",
                      fullgraph=True): Inductor fuses the small operations into Triton kernels
                      and a CUDA graph replays the whole step in one launch; the prefill is
                      compiled too (gpt-fast's --compile_prefill), without a CUDA graph

Two differences from minillama's decode loop, both gpt-fast's choices: the token stays on the
GPU between steps (no host round trip; `to_host=True` adds one), and the attention reads all
max_seq_len cache slots every step where minillama reads the positions so far, so the benchmark
sizes the cache to the steps it decodes, as gpt-fast sizes it to prompt + new tokens.

Weights come under Meta's names, (out, in) for linears: a dict of NumPy arrays or tensors (the
very weights a minillama Transformer gets), or RandomWeights, made on the device one tensor at a
time (a Llama-2-7B shape is 13 GB in bfloat16: never build it on the host). bfloat16 by default;
float32 turns TF32 off, so a float32 matmul is a float32 matmul.

Without torch or without CUDA, measure() returns (None, reason) and the benchmark prints
"n/a: reason"; a failed compile is reported in its row, not raised.
"""
import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Mapping

from ..model import ModelArgs, weight_shapes
from .cpu import SHAPES as STORIES
from .timing import median_rate

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
    Module = nn.Module
except ImportError:                   # the benchmark still runs; measure() says why this doesn't
    torch = None
    Module = object

SHAPES = {**STORIES,                  # the TinyStories shapes, and Llama-2-7B (Meta's params.json)
          "7B": dict(dim=4096, hidden_dim=11008, n_layers=32, n_heads=32, vocab_size=32000,
                     max_seq_len=4096)}
DTYPES = ("bfloat16", "float16", "float32")


def model_args(shape, max_batch_size=1, max_seq_len=None, n_layers=None):
    """ModelArgs of a named shape; fewer layers for a quick run (issue 10 first measured the 7B
    width with 4 layers), a shorter max_seq_len to bound the RoPE table and the caches."""
    s = dict(SHAPES[shape], max_batch_size=max_batch_size)
    if max_seq_len is not None:
        s["max_seq_len"] = max_seq_len
    if n_layers is not None:
        s["n_layers"] = n_layers
    return ModelArgs(**s)


# ----------------------------------------------------------------------------
# the model

def rms_norm(x, weight, eps):
    # x / sqrt(mean(x^2) + eps) * weight, the mean taken in float32 whatever x's dtype
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def rope_tables(head_dim, end, theta):
    """cos and sin of position * frequency, each (end, head_dim // 2), float32 on the host:
    pair i turns at theta^(-2i / head_dim), the angles rounded to float32 as Meta's are."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(end, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def rope(x, cos, sin):
    """Rotate each adjacent pair (x[2i], x[2i+1]) of every head by its angle, in float32.
    x: (bsz, seqlen, heads, head_dim); cos, sin: (seqlen, head_dim // 2)."""
    pairs = x.float().unflatten(-1, (-1, 2))          # (bsz, seqlen, heads, head_dim // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None], sin[:, None]              # broadcast over heads
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


def frozen(t):
    return nn.Parameter(t, requires_grad=False)


class KVCache(Module):
    """Keys and values of every position, preallocated: (bsz, n_kv_heads, max_seq_len, head_dim).
    Buffers of a module, so a CUDA graph may write them in place (it records their addresses)."""

    def __init__(self, bsz, n_kv_heads, max_seq_len, head_dim, dtype, device):
        super().__init__()
        shape = (bsz, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        # input_pos: (seqlen,); k, v: (bsz, n_kv_heads, seqlen, head_dim) -> the whole caches
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        return self.k, self.v


class Attention(Module):
    def __init__(self, p: ModelArgs, take, prefix):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = p.n_heads, p.n_kv_heads, p.head_dim
        # ((n_heads + 2 * n_kv_heads) * head_dim, dim): q, k and v in one matmul
        self.wqkv = frozen(torch.cat([take(prefix + w + ".weight") for w in ("wq", "wk", "wv")]))
        self.wo = frozen(take(prefix + "wo.weight"))
        self.cache = None                             # a KVCache, from Llama.setup_cache

    def forward(self, x, cos, sin, mask, input_pos):
        bsz, seqlen, _ = x.shape
        nh, nkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = F.linear(x, self.wqkv).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        q = rope(q.view(bsz, seqlen, nh, hd), cos, sin).transpose(1, 2)  # (bsz, nh, seqlen, hd)
        k = rope(k.view(bsz, seqlen, nkv, hd), cos, sin).transpose(1, 2)  # (bsz, nkv, seqlen, hd)
        v = v.view(bsz, seqlen, nkv, hd).transpose(1, 2)
        k, v = self.cache.update(input_pos, k, v)      # (bsz, nkv, max_seq_len, hd)
        if nh > nkv:                                   # GQA: each kv head serves nh // nkv heads
            k = k.repeat_interleave(nh // nkv, dim=1)  # (bsz, nh, max_seq_len, hd)
            v = v.repeat_interleave(nh // nkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)      # (bsz, nh, seqlen, hd)
        return F.linear(y.transpose(1, 2).reshape(bsz, seqlen, nh * hd), self.wo)


class FeedForward(Module):
    def __init__(self, p: ModelArgs, take, prefix):
        super().__init__()
        # (2 * hidden_dim, dim): w1 and w3 in one matmul
        self.w13 = frozen(torch.cat([take(prefix + "w1.weight"), take(prefix + "w3.weight")]))
        self.w2 = frozen(take(prefix + "w2.weight"))

    def forward(self, x):
        h1, h3 = F.linear(x, self.w13).chunk(2, dim=-1)   # (bsz, seqlen, hidden_dim) each
        return F.linear(F.silu(h1) * h3, self.w2)


class Block(Module):
    def __init__(self, p: ModelArgs, take, layer_id):
        super().__init__()
        pre = f"layers.{layer_id}."
        self.eps = p.norm_eps
        self.attention = Attention(p, take, pre + "attention.")
        self.feed_forward = FeedForward(p, take, pre + "feed_forward.")
        self.attention_norm = frozen(take(pre + "attention_norm.weight"))
        self.ffn_norm = frozen(take(pre + "ffn_norm.weight"))

    def forward(self, x, cos, sin, mask, input_pos):
        # the residual stream x: (bsz, seqlen, dim)
        h = x + self.attention(rms_norm(x, self.attention_norm, self.eps), cos, sin, mask,
                               input_pos)
        return h + self.feed_forward(rms_norm(h, self.ffn_norm, self.eps))


class Llama(Module):
    """forward(tokens (bsz, seqlen), input_pos (seqlen,)) -> logits (bsz, seqlen, vocab_size),
    everything on `device`, after setup_cache(bsz, max_seq_len).

    weights: a Mapping under Meta's names (NumPy arrays, tensors, or RandomWeights); each is
    converted to `dtype` on `device` and fused as it is taken. A tied output (the same object
    as tok_embeddings.weight) stays one tensor."""

    def __init__(self, p: ModelArgs, weights, dtype=None, device="cuda"):
        super().__init__()
        dtype, device = dtype or torch.bfloat16, torch.device(device)
        if dtype == torch.float32:
            exact_float32()
        self.params, self.norm_eps, self.dtype, self.device = p, p.norm_eps, dtype, device

        def convert(w):
            return torch.as_tensor(w).to(device=device, dtype=dtype)

        def take(name):
            return convert(weights[name])
        embedding = weights["tok_embeddings.weight"]
        self.tok_embeddings = frozen(convert(embedding))
        self.layers = nn.ModuleList(Block(p, take, i) for i in range(p.n_layers))
        self.norm = frozen(take("norm.weight"))
        output = weights["output.weight"]
        self.output = self.tok_embeddings if output is embedding else frozen(convert(output))
        cos, sin = rope_tables(p.head_dim, p.max_seq_len, p.rope_theta)
        self.register_buffer("cos", cos.to(device), persistent=False)
        self.register_buffer("sin", sin.to(device), persistent=False)
        # buffers, not plain attributes: a CUDA graph may keep their addresses (setup_cache)
        self.register_buffer("causal_mask", None, persistent=False)

    def setup_cache(self, bsz, max_seq_len):
        """A fresh KV cache in every layer for exactly `bsz` rows of `max_seq_len` positions, and
        the causal mask: (max_seq_len, max_seq_len), row p true at 0..p."""
        p = self.params                 # positions past p.max_seq_len have no RoPE angles
        for layer in self.layers:
            layer.attention.cache = KVCache(bsz, p.n_kv_heads, max_seq_len, p.head_dim,
                                            self.dtype, self.device)
        self.causal_mask = torch.ones((max_seq_len, max_seq_len), dtype=torch.bool,
                                      device=self.device).tril()

    def forward(self, tokens, input_pos):
        mask = self.causal_mask[None, None, input_pos]        # (1, 1, seqlen, max_seq_len)
        cos, sin = self.cos[input_pos], self.sin[input_pos]   # (seqlen, head_dim // 2)
        h = F.embedding(tokens, self.tok_embeddings)          # (bsz, seqlen, dim)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, input_pos)
        return F.linear(rms_norm(h, self.norm, self.norm_eps), self.output)


def exact_float32():
    """float32 matmuls and convolutions in true float32, not TF32 (a process-wide setting)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


class RandomWeights(Mapping):
    """Random weights under Meta's names, each made on `device` in `dtype` only when it is
    asked for, so Llama fuses it and drops it before the next: the host never holds a 13 GB
    model, and the device never holds two. Norms near 1, matrices near N(0, 1/in)."""

    def __init__(self, p: ModelArgs, dtype, device, seed=0):
        self.shapes, self.dtype, self.device, self.seed = weight_shapes(p), dtype, device, seed

    def __getitem__(self, name):
        shape = self.shapes[name]
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed * 100003 + list(self.shapes).index(name))
        w = torch.randn(shape, generator=gen, device=self.device, dtype=self.dtype)
        return 1.0 + 0.1 * w if len(shape) == 1 else w * shape[1] ** -0.5

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)


def weight_bytes_per_token(model):
    """Bytes of weights one batch-1 decode step reads: every matrix and norm, the classifier
    included, but of the embedding table only the token's row. (A batch reads them once.)"""
    emb = model.tok_embeddings
    total = sum(w.nbytes for w in model.parameters())     # a tied table counts once, whole
    if model.output is not emb:
        total -= emb.nbytes - emb[0].nbytes
    return total


# ----------------------------------------------------------------------------
# decode and prefill

def decode_step(model, tokens, input_pos):
    """One greedy step on the device: tokens (bsz, 1) at position input_pos (1,) -> the next
    tokens (bsz, 1). gpt-fast compiles forward and sampling together, as one graph."""
    logits = model(tokens, input_pos)                         # (bsz, 1, vocab_size)
    return logits[:, -1].argmax(dim=-1, keepdim=True)


def compiled_decode_step():
    """decode_step compiled as gpt-fast compiles its decode_one_token. Dynamo keeps compiled
    code per function, across torch.compile wrappers: reset it, so each model and batch gets a
    compile (and a compile time) of its own and old CUDA graphs let go of their memory."""
    import torch._inductor.config
    torch._dynamo.reset()
    torch._inductor.config.coordinate_descent_tuning = True   # gpt-fast's: faster decode GEMVs
    return torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)


def math_attention():
    """gpt-fast decodes with SDPA's math backend, so Inductor generates the attention itself
    (fused with its neighbours) instead of calling a fixed kernel."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:                                       # torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def round_up(n, k):
    return (n + k - 1) // k * k


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_rate(model, bsz, steps, compile=True, to_host=False):
    """Greedy decode at batch `bsz`: `steps` one-token steps from position 0 (token 1 first),
    the token fed back on the device (`to_host`: through the host, as minillama's loop does).
    A first pass warms up (compiles, records the CUDA graph); then the median of PASSES timed
    passes, as minillama's (timing.median_rate).
    -> (tokens per second, compile seconds: the wall time of the very first step)."""
    model.setup_cache(bsz, round_up(steps, 8))
    step = compiled_decode_step() if compile else decode_step
    device = model.device

    def run(n):
        tokens = torch.ones((bsz, 1), dtype=torch.int64, device=device)
        pos = torch.zeros(1, dtype=torch.int64, device=device)
        for _ in range(n):
            # a copy: the CUDA graph's output lives in its pool, which the next replay rewrites
            tokens = step(model, tokens, pos).clone()
            if to_host:
                tokens = tokens.cpu().to(device)
            pos += 1
        sync(device)

    with torch.no_grad(), math_attention():
        start = time.perf_counter()
        run(1)
        compile_s = time.perf_counter() - start
        rate = median_rate(lambda: run(steps), bsz * steps, lambda: sync(device))
        return rate, compile_s


def prefill_ms(model, seqlen=512, bsz=1, reps=5, compile=False):
    """One forward of a `seqlen`-token prompt at positions 0.. (all the logits, as minillama's
    forward returns them), eager, or compiled as gpt-fast's --compile_prefill does (Inductor,
    no CUDA graph: a prompt's matmuls keep the GPU busy; on an H200 it halves a 7B prefill).
    -> (milliseconds: the median of `reps` after warm-up, seconds of the first call)."""
    model.setup_cache(bsz, round_up(seqlen, 8))
    tokens = torch.randint(model.params.vocab_size, (bsz, seqlen), device=model.device)
    pos = torch.arange(seqlen, device=model.device)
    if compile:
        torch._dynamo.reset()
    forward = torch.compile(model, fullgraph=True) if compile else model
    times = []
    with torch.no_grad():
        for _ in range(reps + 2):
            sync(model.device)
            start = time.perf_counter()
            forward(tokens, pos)
            sync(model.device)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[2:]), times[0]


# ----------------------------------------------------------------------------
# what the benchmark calls

def unavailable(device="cuda"):
    """Why the reference cannot run here (no torch, no CUDA, no torch.compile); None if it can."""
    if torch is None:
        return "torch is not installed"
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile (needs 2.0 or later)"
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    return None


def measure(shape="7B", batches=(1, 8), steps=200, dtype="bfloat16", prefill_len=512,
            n_layers=None, device="cuda", weights=None, compile=True, to_host=False):
    """Decode tokens/s per batch, a prefill, and the weight bytes per token, of the reference
    in `dtype` (a name from DTYPES) at a named shape, with `weights` (a Mapping under Meta's
    names; default RandomWeights on the device). prefill_len None: no prefill row.
    -> (result dict, None), or (None, reason) when it cannot run at all. A batch whose compile
    or run fails gets an "error" in its row; the other rows still run."""
    reason = unavailable(device)
    if reason is None and dtype not in DTYPES:
        reason = f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}"
    if reason:
        return None, reason
    p = model_args(shape, max(batches), round_up(max(steps, prefill_len or 0), 8), n_layers)
    tdtype = getattr(torch, dtype)
    try:
        if weights is None:
            weights = RandomWeights(p, tdtype, device)
        model = Llama(p, weights, tdtype, device)
    except Exception as e:                                   # out of memory, say
        release_memory(device)
        return None, f"building the {shape} model failed: {one_line(e)}"
    r = dict(shape=shape, n_layers=p.n_layers, dtype=dtype, device=device_name(device),
             torch=torch.__version__, weight_bytes_per_token=weight_bytes_per_token(model),
             compiled=compile, decode=[])
    for bsz in batches:
        row = dict(bsz=bsz)
        try:
            row["tokens_per_s"], row["compile_s"] = decode_rate(model, bsz, steps, compile,
                                                                to_host)
        except Exception as e:            # a failed compile, say: this row says so, others run
            row["error"] = one_line(e)
        r["decode"].append(row)
    if prefill_len:                       # None: decode only (the TinyStories rows)
        r["prefill"] = row = dict(seqlen=prefill_len)
        try:
            row["ms"], row["compile_s"] = prefill_ms(model, prefill_len, compile=compile)
        except Exception as e:
            row["error"] = one_line(e)
    del model
    release_memory(device)
    return r, None


def one_line(e):
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def device_name(device):
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def release_memory(device):
    """Give the GPU memory back to the other libraries of the benchmark (CuPy's pool): drop
    the compiled graphs and their CUDA-graph pools, then PyTorch's cached blocks."""
    torch._dynamo.reset()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minillama.bench.torch_compiled")
    parser.add_argument("--shape", default="7B", choices=list(SHAPES))
    parser.add_argument("--layers", type=int, help="fewer layers than the shape has")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=200, help="decode steps per pass")
    parser.add_argument("--prefill", type=int, default=512, help="prompt tokens to prefill")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--eager", action="store_true", help="do not compile (for comparison)")
    parser.add_argument("--to-host", action="store_true",
                        help="bring each token to the host and back, as minillama's loop does")
    args = parser.parse_args(argv)
    r, reason = measure(args.shape, [int(b) for b in args.batches.split(",")], args.steps,
                        args.dtype, args.prefill, args.layers, args.device,
                        compile=not args.eager, to_host=args.to_host)
    if r is None:
        print(f"n/a: {reason}")
        return 1
    print(f"{r['shape']} shape, {r['n_layers']} layers, {r['dtype']}, {r['device']}, torch "
          f"{r['torch']}, {'compiled' if r['compiled'] else 'eager'}; weights read per token: "
          f"{r['weight_bytes_per_token'] / 1e9:.3f} GB")
    for d in r["decode"]:
        print(f"  decode batch {d['bsz']}: " + (f"n/a: {d['error']}" if "error" in d else
              f"{d['tokens_per_s']:.1f} tokens/s ({1000 * d['bsz'] / d['tokens_per_s']:.3f} "
              f"ms/step), first step (compile) {d['compile_s']:.1f} s"))
    f = r["prefill"]
    print(f"  prefill {f['seqlen']} tokens: " + (f"n/a: {f['error']}" if "error" in f else
          f"{f['ms']:.2f} ms, first call (compile) {f['compile_s']:.1f} s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
