"""Decoding one token: the model's forward step as 5 kernels per layer (2 for one row of
float32 weights), in one CUDA graph.

FusedDecoder computes what Transformer.forward computes for tokens of shape (bsz, 1), with the
kernels of decode.cu and gemv's prologues, on the model's own weights and KV cache. It is the
fast path a GPU backend offers for decoding: CudaOps.decoder(model) sends one-token steps here
when FusedDecoder.covers(model), and prompts, or models it does not cover, to model.forward.
Every storage format is covered: a float32 weight goes through gemv (matmul.cu), a weight kept
as stored (formats.Packed: f16, bf16, q8_0, q4_0, q4_1, and the k-quants q2_k .. q6_k)
through qgemv (qgemv.cu, qgemv_k.cu), which has the same prologues and `accumulate`; the KV
cache may be float32 or float16. One row of float32 weights takes halves.cu's two launches a
layer instead (run_halves), unless the caller asked for the same bits every run.
docs/kernels.md ("Decoding: launches, fusion and a CUDA graph", "A layer in two launches")
measures what they save.
"""
import contextlib
import warnings

import numpy as np

from ..formats import Packed
from .kernels import CACHE_TYPES, GREEDY_THREADS, HALVES_WARPS, KERNELS, MMA_FORMATS, \
    MMA_MIN_ROWS, NULL, PACKED_KERNEL_FORMATS, attention_chunk, attention_splits, \
    attention_threads, gemv, greedy_pick, halves_plan, has_clusters, qgemv, qgemv_mma, takes_x16
from .runtime import i32, require_cupy, sm_count


# Programmatic launches (cuda/pdl.py), measured on an H200 (2026-11-29, graph replay of one
# step): one row 3 to 11% faster (Llama-2-7B shape in q4_0, int8, float16; stories15M and
# 110M); 8 and 32 rows of float32 up to 14% slower, so float32 batches launch the ordinary way.
# Batches of a model kept as stored (qgemv_mma's launches, one wave each since its plan of
# 2026-11-30) gained: the 7B step at 8 rows 8% (q4_0), 7% (int8) and 5% (float16) faster, at
# 16 rows 5%, 4% and 2%, at 32 rows 2%, 1% and 1% (H200, 2026-11-30, kernels/dev/ab_bounds.py),
# so they take them up to PROGRAMMATIC_PACKED_ROWS (more rows: not measured).
PROGRAMMATIC_ROWS = 1
PROGRAMMATIC_PACKED_ROWS = 32


class FusedDecoder:
    """Transformer.forward for tokens of shape (bsz, 1), with the kernels of decode.cu.

    The generic path launches ~45 small CuPy kernels per layer (RMSNorm alone is six); at one
    token per call the GPU mostly waits for the host. Here a layer is 5 launches,

        gemv(rmsnorm -> wqkv), attention_decode (RoPE and the cache write included),
        gemv(wo, h +=), gemv(rmsnorm -> w13), gemv(swiglu -> w2, h +=)

    (each gemv a qgemv where the weight is kept as stored: `matvec` chooses by the weight)
    on buffers allocated once, reading the model's own weights and KV cache; one row of float32
    weights, 2 (attention_half, feed_forward_half: run_halves). The position and
    token ids live in a device array (`step`), so the launches are the same at every position:
    the first call for a batch size runs them and records them into a CUDA graph, and later calls
    copy `step` over and replay the graph with one call. Prefill (seqlen > 1) stays on the
    generic path; both write the same cache.

    Between two replays the host calls CUDA 3 times: the step's copy in, the replay, the
    logits' copy out (into an array from CuPy's pool); an event wait and record, which every
    step made before, come once every STEP_SLOTS steps (`send_step` says why that is enough).
    greedy_steps, greedy decoding's steps, calls CUDA once, the replay, and waits for it: its
    graph copies the token in from page-locked memory, takes n steps, each fed the ids the one
    before picked, and copies back only the picked ids. It may also queue the next call's steps
    behind them before it waits (`then`), so that the GPU goes on while the host reads the ids.
    """

    BLOCK = 256
    STEP_SLOTS = 64         # rows of step_host used in turn: one event wait per 64 steps
    MAX_STEPS = 16          # greedy_steps' steps in one graph, at most
    takes_halves = True     # whether a one-row step may take halves.cu's launches (run_halves)
    deferred_norms = True   # whether a batch step may defer its norms (defers_norms)

    @staticmethod
    def covers(model):
        """Weights that gemv or qgemv reads (float32 arrays, or Packed as CudaOps.weight places
        them; not llama2.c's Q8Tensor, nor a float16 array), a float32 or float16 KV cache,
        heads that fit a block, and max_seq_len within the bound that attention_decode's
        shared memory set until 2026-11-30 (it now keeps nothing per key there; the bound
        stays until the fused step is checked on a GPU beyond it); anything else stays on the
        generic path."""
        p = model.params
        readable = all(isinstance(w, Packed) and w.format in PACKED_KERNEL_FORMATS
                       and w.shape[1] % 8 == 0
                       or getattr(w, "dtype", None) == np.float32
                       for w in FusedDecoder._weights(model))
        cache = all(layer.attention.cache_k.dtype.name in CACHE_TYPES for layer in model.layers)
        smem = 4 * (p.max_seq_len + 3 * p.head_dim + 4 * FusedDecoder.BLOCK)
        return readable and cache and p.head_dim <= FusedDecoder.BLOCK and smem <= 48 * 1024

    @staticmethod
    def _weights(model):
        yield model.output
        yield model.norm
        for layer in model.layers:
            yield from (layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13,
                        layer.feed_forward.w2, layer.attention_norm, layer.ffn_norm)

    def __init__(self, model, deterministic=False, x16_batches=True):
        import cupyx                                         # ships with cupy: pinned memory
        # No reference to the model itself: CudaOps keys its decoders by the model, weakly.
        cp, p = model.ops.xp, model.params
        self.cp, self.p = cp, p
        self.tok_embeddings, self.norm, self.output = model.tok_embeddings, model.norm, model.output
        self.freqs_cos, self.freqs_sin = model.freqs_cos, model.freqs_sin
        self.scale = np.float32(1.0 / np.sqrt(p.head_dim))  # q's scale before q . k, as model.py
        self.layers = [(layer.attention_norm, layer.attention.wqkv, layer.attention.wo,
                        layer.ffn_norm, layer.feed_forward.w13, layer.feed_forward.w2,
                        layer.attention.cache_k, layer.attention.cache_v)
                       for layer in model.layers]
        nb, hd = p.max_batch_size, p.head_dim

        def buf(width):
            return cp.zeros((nb, width), dtype=np.float32)
        self.step = cp.zeros(1 + nb, dtype=np.int32)         # [start_pos, token_0, token_1, ...]
        # its sources, page-locked, one row a step in turn (send_step)
        self.step_host = cupyx.empty_pinned((self.STEP_SLOTS, 1 + nb), dtype=np.int32)
        self.slot = 0                                        # the row the next step writes
        self.round_copied = cp.cuda.Event()                  # recorded after a round's last copy
        self.h = buf(p.dim)                                  # the residual stream
        # [q heads | k heads | v heads] and [h1 | h3], each after its rows' sums of squares
        # where a batch step defers its norm (defers_norms)
        self.qkv, self.qkv_ss, self.qkv_flat = self._with_sums((p.n_heads + 2 * p.n_kv_heads) * hd)
        self.att = buf(p.n_heads * hd)
        self.h13, self.h13_ss, self.h13_flat = self._with_sums(2 * p.hidden_dim)
        self.logits = buf(p.vocab_size)
        # attention_decode's splits of the keys: each split's record, and a counter per head
        # and row (the last split combines the records and sets its counter back to 0)
        splits = self.attention_grid(1)[1][2]
        self.split_parts = cp.zeros((nb, p.n_heads, splits, hd + 2), dtype=np.float32)
        self.arrivals = cp.zeros((nb, p.n_heads), dtype=np.int32)
        self.graphs = {}                                     # bsz -> cupy.cuda.Graph
        self.launches_per_step = {}                          # bsz -> kernels in one step
        # greedy_steps' edges, page-locked: the row its graph's copy node reads, and the ids
        # and flags each step's greedy_pick writes in place, in two halves: a call's, and the
        # call queued behind it (greedy_steps' `then`), which may run while the host reads
        self.row_host = cupyx.empty_pinned((1 + nb,), dtype=np.int32)   # [start_pos, tokens]
        self.picks_host = cupyx.empty_pinned((2, self.MAX_STEPS, 2 * nb), dtype=np.int32)
        self.greedy_graphs = {}                              # (bsz, n) -> cupy.cuda.Graph, or None
        self.queued_graphs = {}                              # (bsz, n, half) -> the same, fed
        self.picked_events = [cp.cuda.Event(disable_timing=True) for _ in range(2)]   # a half's
        self.queued = None                                   # the GreedyCall queued, if any
        self.packed = any(isinstance(w, Packed) for w in self._weights(model))
        # halves.cu's two launches a layer for one row (run_halves), where the caller did not
        # ask for the same bits every run (their sums are added by atomics, in any order)
        self.halves = None if deterministic else self._halves()
        # and the batches' products that add into the residual add their slices of k by
        # atomics too (qgemv_mma's any_order)
        self.any_order = not deterministic
        # and the batches' products on the tensor cores take x in one float16 part (qgemv_mma's
        # x16: 11 bits of each value of x, as a prompt's GEMM takes it), unless the caller
        # asks for the two parts' 22 bits (x16_batches=False)
        self.x16_batches = x16_batches
        self.mma_layers = all(getattr(w, "format", None) in MMA_FORMATS
                              for layer in self.layers for w in layer[1:3] + layer[4:6])
        if self.halves is not None:          # the residual's other two buffers (run_halves)
            self.residuals = [self.h, buf(p.dim), buf(p.dim)]

    def _with_sums(self, width):
        """A product's output of `width` floats a row, the rows' sums of squares before it in
        one allocation: (rows (nb, width), sums (nb,), the flat buffer). The sums come first,
        padded to 16 bytes, so that what a step of bsz rows adds into, the sums and its rows,
        is the buffer's first sum_floats + bsz * width floats: one range to zero
        (_cleared)."""
        nb = self.p.max_batch_size
        pad = -(-nb // 4) * 4
        flat = self.cp.zeros(pad + nb * width, dtype=np.float32)
        return flat[pad:].reshape(nb, width), flat[:nb], flat

    def _cleared(self, flat, rows, bsz):
        """The range of a _with_sums buffer that a step of bsz rows adds into."""
        return flat[:flat.size - rows.size + bsz * rows.shape[1]]

    def defers_norms(self, bsz):
        """Whether a step of bsz rows leaves wqkv's and w13's RMSNorm to the kernel after them
        (qgemv_mma's rms_out: attention_decode and w2's staging scale the rows, so no product
        waits for its last block to add the slices up): where the caller did not ask for the
        same bits every run, every product of a layer goes through qgemv_mma (MMA_MIN_ROWS rows
        or more of weights in its formats), and the products add the residual (one GPU)."""
        return (self.any_order and self.deferred_norms and self.adds_residual
                and bsz >= MMA_MIN_ROWS and self.mma_layers)

    def __call__(self, tokens, start_pos, use_graphs=True):
        bsz = tokens.shape[0]
        self.drop_queued()
        self.send_step(tokens, start_pos)
        if use_graphs and self.graphs.get(bsz) is not None:
            self.graphs[bsz].launch()
        else:
            before = KERNELS.launches
            self.run(bsz)
            self.launches_per_step[bsz] = KERNELS.launches - before
            if use_graphs and bsz not in self.graphs:
                self.graphs[bsz] = self._capture(bsz)      # None if the driver refuses
        # a copy: the caller may keep the logits of every step, and the buffer is reused. (A
        # ring of preallocated outputs would save the allocation, but a kept step would be
        # overwritten a few steps later; from the pool the allocation is cheap, and when the
        # caller drops the array its memory goes back for the next step.)
        logits = self.cp.empty((bsz, 1, self.p.vocab_size), dtype=np.float32)
        logits.data.copy_from_device_async(self.logits.data, logits.nbytes)
        return logits

    def send_step(self, tokens, start_pos):
        """step <- [start_pos, token_0, ..., token_{bsz-1}], copied from the next row of
        step_host on the current stream. An asynchronous copy reads its (page-locked) source
        only when the stream gets to it, so a row may be written again only once the copy
        from it has run. Rather than wait for every step's copy before the next (one event wait
        and one record a step), the STEP_SLOTS rows are used in turn and one event, recorded
        after the last copy of a round, is waited on before the next round starts writing:
        by then it has long passed, since the caller reads the logits of most steps. As the
        other buffers, it assumes the steps of one decoder run on one stream."""
        if self.slot == 0:
            self.round_copied.synchronize()                  # every row of the last round read
        row = self.step_host[self.slot]
        row[0], row[1:1 + tokens.shape[0]] = start_pos, tokens[:, 0]
        stream = self.cp.cuda.get_current_stream()
        self.step.data.copy_from_host_async(row.ctypes.data, 4 * (1 + tokens.shape[0]), stream)
        self.slot = (self.slot + 1) % self.STEP_SLOTS
        if self.slot == 0:
            self.round_copied.record(stream)

    def greedy_steps(self, tokens, start_pos, n=1, use_graphs=True, *, then=0):
        """n steps of greedy decoding from tokens (bsz, 1) at start_pos, each step fed the ids
        the one before picked, with nothing beside the steps' CUDA graph: returns (backs, last),
        backs (n, 2 bsz) int32 on the host, step j's row as kernels.greedy_pick gives it (each
        row's argmax, then a flag per row, 1 where a logit is not finite), and last (bsz,
        vocab), the last step's logits on the GPU, for the caller to say where a flag came
        from; last is this decoder's buffer, valid until its next step, and None where steps
        are queued behind these (below), since they write it. 1 <= n <= MAX_STEPS
        (CudaDecoder.greedy_steps checks it, and then).

        __call__ costs a step three stream operations around its graph: the token's copy in,
        the logits' copy out, the pick's kernel and its copy. Each waits for the one before,
        and on the Llama-2-7B shape each costs 60 to 80 us however few bytes it moves (docs/
        kernels.md, "What the host adds to a step"). Here the graph does all of it: its first
        node copies the position and tokens from a page-locked row (the copy was recorded with
        the row's address, and reads what the row holds at each replay), and each step's
        greedy_pick writes the ids into page-locked memory in place and into the next step's
        input; the host writes the row, replays, waits for the steps and reads the ids. With
        n > 1 the host is not there between the steps at all (docs/generate.md, "Steps
        ahead"). A graph per (bsz, n), recorded at the first call for it, which runs its steps
        one by one.

        then > 0 queues `then` steps more behind these before waiting for them: a graph without
        the copy node, whose first step reads the input the last of these steps' greedy_pick
        wrote on the GPU, and whose ids go to the other half of picks_host. So the GPU does not
        stop while the host reads these ids and comes back: the next call takes the queued
        steps if it asks for exactly them (the same rows, position and count, fed the ids
        these picked), launching nothing but the steps it queues in turn (docs/generate.md,
        "Steps queued"). The queued steps outlive this call: they run on this stream after it
        returns, writing the KV cache, logits and step, so, as everywhere in this decoder, its
        work must stay on one stream. Any other call of this decoder drops them, and so must
        anything else that writes the cache they read (drop_queued: CudaDecoder does it for
        prompts); dropped, they still run, writing the cache past these positions, where
        nothing reads before it is written again."""
        bsz = tokens.shape[0]
        call = self._take_queued(tokens, start_pos, n)
        if call is None:
            graph = self.greedy_graphs.get((bsz, n)) if use_graphs else None
            if graph is None:
                return self._greedy_eagerly(tokens, start_pos, n, use_graphs, then)
            self.row_host[0], self.row_host[1:1 + bsz] = start_pos, tokens[:, 0]
            # Half 0 for a call not queued: steps queued and dropped that write it too were
            # launched before it, and the host waits for the event recorded after it.
            call = self._launch_greedy(graph, GreedyCall(bsz, start_pos, n, half=0))
        if then and use_graphs:
            self.queued = self._queue(GreedyCall(bsz, start_pos + n, then, half=1 - call.half))
        self.picked_events[call.half].synchronize()
        backs = self.picks_host[call.half, :n, :2 * bsz].copy()
        if self.queued is not None:
            self.queued.fed = backs[-1, :bsz]
        return backs, (self.logits[:bsz] if self.queued is None else None)

    def drop_queued(self):
        """Forget the steps greedy_steps queued, if any: a step or a prompt that does not come
        through greedy_steps is about to change the cache they read, so no call may take them.
        (They still run, before it, in stream order.)"""
        self.queued = None

    def _take_queued(self, tokens, start_pos, n):
        """The queued GreedyCall, if it is the one asked for (else it is dropped): None, or it."""
        q, self.queued = self.queued, None
        if q is None or (q.bsz, q.start_pos, q.n) != (tokens.shape[0], start_pos, n) \
                or not np.array_equal(q.fed, tokens[:, 0]):
            return None
        return q

    def _queue(self, q):
        """Launch q's steps behind the stream's last; None where the driver refused their
        graph."""
        self._record_queued(q.bsz, q.n)
        graph = self.queued_graphs[q.bsz, q.n, q.half]
        return None if graph is None else self._launch_greedy(graph, q)

    def _record_queued(self, bsz, n):
        """The graphs of n steps queued behind a call of bsz rows, recorded at the first need
        and for both halves at once: which half a call gets depends on the calls before it,
        and a graph recorded later, in the middle of a generation (or of a benchmark's timed
        pass), would stop the GPU for milliseconds. Every kernel they launch has run before,
        for a call of the same rows."""
        for half in (0, 1):
            if (bsz, n, half) not in self.queued_graphs:
                self.queued_graphs[bsz, n, half] = self._capture(
                    bsz, lambda: self._greedy_launches(bsz, n, fed=True, half=half),
                    refused="the steps of the next call are not queued")

    def _launch_greedy(self, graph, q):
        stream = self.cp.cuda.get_current_stream()
        graph.launch(stream)
        self.picked_events[q.half].record(stream)
        return q

    def _greedy_eagerly(self, tokens, start_pos, n, use_graphs, then):
        """greedy_steps without its graph, as generation.greedy takes a step (the copies beside
        it); the first call for (bsz, n) then records greedy_steps' own graph, as __call__
        records its own, and where `then` asks for steps queued behind it, their graphs, for
        the next call to queue with. Nothing is queued behind eager steps: they leave no input
        on the GPU."""
        bsz = tokens.shape[0]
        backs = np.empty((n, 2 * bsz), dtype=np.int32)
        for j in range(n):
            last = self(tokens, start_pos + j, use_graphs)[:, -1]            # (bsz, vocab)
            backs[j] = greedy_pick(last).get()
            tokens = backs[j, :bsz, None].astype(np.int64)                   # (bsz, 1)
        if use_graphs and (bsz, n) not in self.greedy_graphs:
            self.greedy_graphs[bsz, n] = self._capture(bsz, lambda: self._greedy_launches(bsz, n))
        if use_graphs and then and self.greedy_graphs[bsz, n] is not None:
            self._record_queued(bsz, then)
        return backs, last

    def _greedy_launches(self, bsz, n, fed=False, half=0):
        """greedy_steps' graph:

            row_host -> step                      a copy node: the first position and tokens
            run(bsz), greedy_pick -> picks_host[half, 0]      and into step: its ids, the
            run(bsz), greedy_pick -> picks_host[half, 1]      position + 1
            ...
            run(bsz), greedy_pick -> picks_host[half, n - 1]  and into step, for steps queued

        fed: no copy node; the first step reads what the last greedy_pick before it wrote
        (the graph of steps queued behind a call).

        The first step's input arrives by a copy node, not a kernel: a copy node ends before
        the next kernel starts, where a kernel's programmatic successors may start before it
        ends, and attention_decode reads the position before its grid_dependency_wait
        (decode.cu). The later steps' input is written by greedy_pick, and each step's first
        kernel (embed) is launched the ordinary way for that reason: it starts only once that
        greedy_pick has ended, and the step's other kernels only after it has started."""
        cp, vocab = self.cp, self.p.vocab_size
        if not fed:
            # (CuPy refuses a copy from the host while a stream captures; the runtime records it)
            cp.cuda.runtime.memcpyAsync(self.step.data.ptr, self.row_host.ctypes.data,
                                        4 * (1 + bsz), cp.cuda.runtime.memcpyHostToDevice,
                                        cp.cuda.get_current_stream().ptr)
        for j in range(n):
            self.run(bsz)
            KERNELS.launch("greedy_pick", (bsz,), (GREEDY_THREADS,),
                           (self.logits[:bsz], i32(vocab), i32(vocab),
                            device_address(self.picks_host[half, j]), i32(bsz), self.step))

    def programmatic(self, bsz):
        """Whether the graph of a step of bsz rows is captured with programmatic launches: one
        row always, batches where the model's weights are kept as stored (PROGRAMMATIC_ROWS,
        PROGRAMMATIC_PACKED_ROWS say why)."""
        return bsz <= (PROGRAMMATIC_PACKED_ROWS if self.packed else PROGRAMMATIC_ROWS)

    def _capture(self, bsz, launches=None, refused="decoding without graphs"):
        """Record run(bsz), or what launches() launches, into a CUDA graph (nothing executes
        while recording). Where programmatic(bsz), each kernel of the graph may start while the
        one before it finishes (cuda/pdl.py; the eager launches stay CuPy's own, cheaper from
        the host). Returns None, with a warning that ends with `refused` (what goes on
        without it), where the driver refuses, and the eager launches carry on."""
        cp = self.cp
        stream = cp.cuda.Stream(non_blocking=True)
        cp.cuda.get_current_stream().synchronize()
        programmatic = KERNELS.programmatic() if self.programmatic(bsz) else contextlib.nullcontext()
        try:
            with stream, programmatic:
                stream.begin_capture()
                try:
                    (launches or (lambda: self.run(bsz)))()
                finally:
                    graph = stream.end_capture()
            return graph
        except cp.cuda.runtime.CUDARuntimeError as e:
            warnings.warn(f"CUDA graph capture failed ({e}); {refused}")
            return None

    def attention_grid(self, bsz):
        """attention_decode's launch for bsz rows: (its width, float4 rows where head_dim
        allows, else floats; the grid, a block a head, row and split of the keys; the block)."""
        p = self.p
        width = 4 if p.head_dim % 4 == 0 else 1
        threads = attention_threads(width, bsz, p.n_heads)
        splits = attention_splits(bsz, p.max_seq_len, attention_chunk(width, p.head_dim, threads))
        return width, (p.n_heads, bsz, splits), (threads,)

    def run(self, bsz):
        """Launch one decode step for rows 0 .. bsz-1 on the current stream: one row in two
        launches a layer where halves.cu takes the model (run_halves), else five, with the
        norms left to the kernel after the products where defers_norms says so."""
        if bsz == 1 and self.halves is not None:
            self.run_halves()
        elif self.defers_norms(bsz):
            self.run_deferred(bsz)
        else:
            self.run_five(bsz)

    def run_five(self, bsz):
        """The step as 5 launches a layer, for rows 0 .. bsz-1."""
        h = self.h[:bsz]
        self.embed(bsz, h)                                  # h = tok_embeddings[token]
        for layer in self.layers:
            self.attention_launches(bsz, layer, h)          # h += attention(...)
            self.join(h)
            self.feed_forward_launches(bsz, layer, h)       # h += feed_forward(...)
            self.join(h)
        self.classify(bsz, h)                               # logits = output(norm(h))

    def attention_launches(self, bsz, layer, h):
        """h += wo @ attention(rope(wqkv @ rmsnorm(h))) for bsz rows: three launches."""
        p, (attn_norm, wqkv, wo, _, _, _, cache_k, cache_v) = self.p, layer
        qkv, att = self.qkv[:bsz], self.att[:bsz]
        matvec(h, wqkv, out=qkv, norm=attn_norm, eps=p.norm_eps, x16=self.x16_batches)
        self.attend(bsz, qkv, cache_k, cache_v, att)
        matvec(att, wo, out=h, accumulate=self.adds_residual, any_order=self.any_order,
               x16=self.x16_batches)

    def attend(self, bsz, qkv, cache_k, cache_v, att, row_ss=None):
        """RoPE on q and k, k and v into the cache at pos, attention: a block a head, row and
        split of the keys. row_ss: the rows' sums of squares of a norm wqkv left undone
        (run_deferred), or None."""
        p = self.p
        width, grid, block = self.attention_grid(bsz)
        KERNELS.launch(f"attention_decode<{width},{CACHE_TYPES[cache_k.dtype.name]}>", grid,
                       block, (qkv, self.step, self.freqs_cos, self.freqs_sin, cache_k, cache_v,
                               att, i32(p.n_heads), i32(p.n_kv_heads), i32(p.head_dim),
                               i32(p.max_seq_len), self.scale, self.split_parts, self.arrivals,
                               NULL if row_ss is None else row_ss, i32(p.dim),
                               np.float32(p.norm_eps)))

    def feed_forward_launches(self, bsz, layer, h):
        """h += w2 @ swiglu(w13 @ rmsnorm(h)) for bsz rows: two launches."""
        _, _, _, ffn_norm, w13, w2, _, _ = layer
        h13 = self.h13[:bsz]
        matvec(h, w13, out=h13, norm=ffn_norm, eps=self.p.norm_eps, x16=self.x16_batches)
        matvec(h13, w2, out=h, accumulate=self.adds_residual, swiglu=True,
               any_order=self.any_order, x16=self.x16_batches)

    # ---- batches with the norms deferred (defers_norms) ----

    def run_deferred(self, bsz):
        """run_five's launches with wqkv's and w13's RMSNorm left to the kernel after each.
        Their products and sums of squares are added by atomics into zeros, which a launch
        before them writes: embed_tokens zeroes layer 0's qkv, each wo the layer's h13, each
        w2 the next layer's qkv (its sums of squares with each). One GPU only (defers_norms):
        there is no join after the residual's updates."""
        p, h = self.p, self.h[:bsz]
        qkv, att, h13 = self.qkv[:bsz], self.att[:bsz], self.h13[:bsz]
        qkv_ss, h13_ss = self.qkv_ss[:bsz], self.h13_ss[:bsz]
        qkv_zero = self._cleared(self.qkv_flat, self.qkv, bsz)
        h13_zero = self._cleared(self.h13_flat, self.h13, bsz)
        self.embed(bsz, h, clear=qkv_zero)
        for attn_norm, wqkv, wo, ffn_norm, w13, w2, cache_k, cache_v in self.layers:
            qgemv_mma(h, wqkv, out=qkv, norm=attn_norm, eps=p.norm_eps, rms_out=qkv_ss,
                      x16=takes_x16(wqkv, self.x16_batches))
            self.attend(bsz, qkv, cache_k, cache_v, att, qkv_ss)
            qgemv_mma(att, wo, out=h, accumulate=True, any_order=True, clear=h13_zero,
                      x16=takes_x16(wo, self.x16_batches))
            qgemv_mma(h, w13, out=h13, norm=ffn_norm, eps=p.norm_eps, rms_out=h13_ss,
                      x16=takes_x16(w13, self.x16_batches))
            qgemv_mma(h13, w2, out=h, accumulate=True, swiglu=True, eps=p.norm_eps,
                      any_order=True, x_ss=(h13_ss, p.dim), clear=qkv_zero,
                      x16=takes_x16(w2, self.x16_batches))
        self.classify(bsz, h)

    # ---- one row in two launches a layer (halves.cu) ----

    def _halves(self):
        """halves_plan for this model where every weight of its layers is a float32 array, the
        KV cache (keys and values) float32 and takes_halves; else None."""
        p = self.p
        arrays = [a for layer in self.layers for a in layer]     # 6 weights, cache_k, cache_v
        if not (self.takes_halves and all(getattr(a, "dtype", None) == np.float32 for a in arrays)):
            return None
        return halves_plan(p.dim, p.head_dim, p.hidden_dim, n_heads=p.n_heads,
                           clusters=has_clusters(), sms=sm_count())

    def run_halves(self):
        """One row's step with halves.cu's launches: per layer attention_half and
        feed_forward_half (either as run_five's share, attention_launches or
        feed_forward_launches, where halves_plan left it out). Each
        of them reads the residual from one of three buffers and adds into the next (halves.cu
        says why), so launch i reads residuals[i % 3]; the step's first adds into residuals[1],
        which embed_tokens zeroes."""
        res, plan, i = [r[:1] for r in self.residuals], self.halves, 0
        self.embed(1, res[0], clear=res[1])
        for layer in self.layers:
            if plan.attention is None:
                self.attention_launches(1, layer, res[i % 3])
            else:
                self.attention_half(layer, res[i % 3], res[(i + 1) % 3], res[(i + 2) % 3])
                i += 1
            if plan.feed_forward is None:
                self.feed_forward_launches(1, layer, res[i % 3])
            else:
                self.feed_forward_half(layer, res[i % 3], res[(i + 1) % 3], res[(i + 2) % 3])
                i += 1
        self.classify(1, res[i % 3])

    def attention_half(self, layer, h, h_mid, clear):
        """h_mid += h + wo @ attention(...) (h_mid zero), clear = 0: a cluster a head."""
        p, (attn_norm, wqkv, wo, _, _, _, cache_k, cache_v) = self.p, layer
        P, smem, R = self.halves.attention
        KERNELS.launch(f"attention_half<{P},{HALVES_WARPS},{R}>", (R, p.n_heads),
                       (32 * HALVES_WARPS,),
                       (h, attn_norm, np.float32(p.norm_eps), wqkv, wo, self.step,
                        self.freqs_cos, self.freqs_sin, cache_k, cache_v, h_mid, clear,
                        i32(p.dim), i32(p.n_heads), i32(p.n_kv_heads), i32(p.head_dim),
                        self.scale), shared_mem=smem)

    def feed_forward_half(self, layer, h, h_next, clear):
        """h_next += h + w2 @ swiglu(...) (h_next zero), clear = 0: J hidden units a block,
        their rows of w13 in registers (feed_forward_half) or shared memory (_wide)."""
        p, (_, _, _, ffn_norm, w13, w2, _, _) = self.p, layer
        J, P, smem = self.halves.feed_forward
        name = f"feed_forward_wide<{P}>" if smem else f"feed_forward_half<{J},{P}>"
        KERNELS.launch(name, (p.hidden_dim // J,), (32 * J,),
                       (h, ffn_norm, np.float32(p.norm_eps), w13, w2, h_next, clear,
                        i32(p.dim), i32(p.hidden_dim)), shared_mem=smem)

    # What a tensor-parallel rank does differently (parallel/fused.py overrides these): whether
    # its products add the residual, what joins the ranks after each residual update, and how
    # the embedding and the logits are gathered from the ranks' columns.
    adds_residual = True

    def join(self, h):
        """After each residual update of h (bsz, dim): nothing on one GPU."""

    def embed(self, bsz, h, clear=None):
        # the step's first kernel, launched the ordinary way even where the others are
        # programmatic: it starts once all before it has ended (greedy_steps' greedy_pick,
        # which wrote the step's position and tokens), the rest of the step after it.
        # clear: a buffer it zeroes too (run_halves' or run_deferred's), or None
        KERNELS.launch("embed_tokens", (bsz,), (self.BLOCK,),
                       (self.step, self.tok_embeddings, h, NULL if clear is None else clear,
                        i32(0 if clear is None else clear.size), i32(self.p.dim)),
                       ordinary=True)

    def classify(self, bsz, h):
        matvec(h, self.output, out=self.logits[:bsz], norm=self.norm, eps=self.p.norm_eps,
               x16=self.x16_batches)


class GreedyCall:
    """A call of greedy_steps on the GPU: bsz rows, n steps from start_pos, its ids into half
    `half` of picks_host; fed, for a call queued behind another, the ids it reads (that call's
    last), once the host has them."""

    def __init__(self, bsz, start_pos, n, half):
        self.bsz, self.start_pos, self.n, self.half, self.fed = bsz, start_pos, n, half, None


def device_address(pinned):
    """The address a kernel reads or writes page-locked host memory (cupyx.empty_pinned) at,
    as a kernel argument: with unified addressing the host's own address, as the driver says."""
    cp = require_cupy()
    return np.uint64(cp.cuda.runtime.pointerGetAttributes(pinned.ctypes.data).devicePointer)


def matvec(x, w, any_order=False, x16=False, **kwargs):
    """x @ w.T for the few rows of one decode step, by how w is stored: qgemv reads a Packed
    weight as stored, gemv a float32 one. Both take out, accumulate, norm, eps and swiglu;
    any_order (the last bits may change from run to run) and x16 (x in one float16 part on the
    tensor cores) are qgemv's."""
    if isinstance(w, Packed):
        return qgemv(x, w, any_order=any_order, x16=x16, **kwargs)
    return gemv(x, w, **kwargs)
