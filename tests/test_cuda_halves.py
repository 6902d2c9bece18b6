"""halves.cu: a one-row float32 layer in two launches (attention_half, feed_forward_half or
feed_forward_wide), each adding its blocks' products into the next residual by atomics;
FusedDecoder.run_halves around them. The kernels against float64 NumPy at odd sizes, the step
against the CPU model, and the plan's rule on the CPU (no GPU needed)."""
import re

import numpy as np
import pytest

from minillama.checkpoints.random import random_weights
from minillama.cuda import runtime
from minillama.cuda.kernels import HALVES_CLUSTER, HALVES_CLUSTERS, HALVES_J, HALVES_MAX_P, \
    HALVES_STATIC_SMEM, HALVES_WARPS, HALVES_WIDE_J, KERNELS, halves_plan
from minillama.model import ModelArgs, Transformer, apply_rotary_emb, precompute_freqs
from minillama.ops import CPU

from test_cuda import rand, rel_err, rng

gpu = pytest.mark.gpu


def rmsnorm64(x, g, eps):
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean() + eps) * g.astype(np.float64)


@pytest.fixture(scope="module")
def clusters(cp):
    from minillama.cuda.kernels import has_clusters
    if not has_clusters():
        pytest.skip("attention_half needs thread-block clusters (compute capability 9.0)")


# ----------------------------------------------------------------------------
# the plan, on the CPU

def test_halves_plan_takes_the_shapes_the_kernels_read():
    """The TinyStories shapes take both halves (J 16, P = dim / 128 rounded up); each half is
    refused alone where its kernel cannot read the shape, and neither where dim is past P 8."""
    optin = 227 * 1024
    p15 = halves_plan(288, 48, 768, n_heads=6, optin=optin, sms=132)
    assert p15.attention == (3, 4 * (3 * 6 * 288 + 36 * 48 + 288 + 5 * 48 + 2), 8)
    assert p15.feed_forward == (16, 3, 0)
    p110 = halves_plan(768, 64, 2048, optin=optin, choose=(8, False))
    assert p110.attention[::2] == (6, 8) and p110.feed_forward == (16, 6, 0)
    assert halves_plan(64, 8, 172, optin=optin).feed_forward == (4, 1, 0)   # 172 = 4 x 43
    assert halves_plan(64, 8, 40, optin=optin).feed_forward == (8, 1, 0)
    assert halves_plan(36, 6, 70, optin=optin) is None                   # tests' ODD shape
    assert halves_plan(288, 72, 768, optin=optin).attention is not None     # 72 % 8 == 0
    only_ff = halves_plan(300, 50, 768, optin=optin)                     # 50 % 4 != 0
    assert only_ff.attention is None and only_ff.feed_forward == (16, 3, 0)
    assert halves_plan(288, 48, 770, optin=optin).feed_forward is None   # no J divides
    assert halves_plan(288, 256, 768, optin=optin).attention is None     # head_dim > 128
    p1024 = halves_plan(1024, 64, 2816, n_heads=16, optin=optin, sms=132)
    assert p1024.attention[0] == HALVES_MAX_P
    assert halves_plan(1024, 128, 2816, optin=optin).attention is None   # 263 KiB of rows
    assert halves_plan(1028, 257, 2816, optin=optin) is None             # P 9
    assert halves_plan(288, 48, 768, clusters=False, optin=optin).attention is None
    small = halves_plan(1024, 64, 2816, optin=64 * 1024)               # shared memory
    assert small.attention is None and small.feed_forward == (16, 8, 0)


def test_halves_plan_puts_both_launches_on_the_gpu_at_once():
    """The first pair whose blocks all fit on the SMs at once: stories15M's 48 + 48 blocks as
    before; stories110M's 96 + 128 do not fit 132 SMs, clusters of 4 and the wide feed-forward
    (48 + 64) do; with SMs enough for all, clusters of 8 and registers; where no pair fits,
    the same. The wide kernel's shared memory, and choose."""
    optin = 227 * 1024
    p15 = halves_plan(288, 48, 768, n_heads=6, optin=optin, sms=132)
    assert p15.attention[2] == 8 and p15.feed_forward[2] == 0
    p110 = halves_plan(768, 64, 2048, n_heads=12, optin=optin, sms=132)
    assert p110.attention == (6, 4 * (3 * 16 * 768 + 192 * 64 + 768 + 5 * 64 + 2), 4)
    assert p110.feed_forward == (32, 6, 4 * 64 * 768)
    assert p110.blocks(12, 2048) == 48 + 64
    def pair(sms):
        plan = halves_plan(768, 64, 2048, n_heads=12, optin=optin, sms=sms)
        return plan.attention[2], plan.feed_forward[2] > 0
    # 224, 176, 160, 112 blocks: the registers' feed-forward first, clusters of 8 before 4
    assert [pair(sms) for sms in (224, 176, 175, 160, 159, 132, 112)] == [
        (8, False), (4, False), (8, True), (8, True), (4, True), (4, True), (4, True)]
    assert pair(100) == (8, False)                                      # none fits
    with pytest.raises(ValueError, match="n_heads"):
        halves_plan(768, 64, 2048, optin=optin, sms=132)
    # clusters of 4 only where clusters of 8 take the shape (head_dim 12: S 3 is never run)
    odd = halves_plan(96, 12, 256, n_heads=8, optin=optin, sms=132)
    assert odd.attention is None and odd.feed_forward == (16, 1, 0)
    assert halves_plan(96, 12, 256, optin=optin, choose=(4, False)).attention is None
    assert halves_plan(64, 8, 172, clusters=False).feed_forward == (4, 1, 0)   # no GPU asked
    assert halves_plan(64, 8, 172, optin=optin, choose=(4, True)).feed_forward is None
    # at dim 1024 neither fits shared memory: clusters of 4 (261 KiB) nor the wide rows (264 KiB)
    assert halves_plan(1024, 64, 2048, optin=optin, choose=(4, True)) is None
    assert halves_plan(1024, 64, 2048, optin=optin, choose=(8, True)).feed_forward is None
    assert halves_plan(768, 64, 2048, n_heads=12, optin=optin).attention[2] == 8   # no sms given


def test_halves_constants_are_the_kernels():
    """kernels.py's copies of halves.cu's constants, and attention_half's static shared memory
    (decode.cu's WarpSoftmax, of ATTN_WARPS and ATTN_HEAD_DIM), as the plan counts it."""
    halves = (runtime.kernel_dir() / "halves.cu").read_text()
    decode = (runtime.kernel_dir() / "decode.cu").read_text()
    assert f"constexpr int HALVES_CLUSTER = {HALVES_CLUSTER};" in halves
    assert f"constexpr int HALVES_WARPS = {HALVES_WARPS};" in halves
    warps = int(re.search(r"constexpr int ATTN_WARPS = (\d+);", decode).group(1))
    head_dim = int(re.search(r"constexpr int ATTN_HEAD_DIM = (\d+);", decode).group(1))
    assert HALVES_STATIC_SMEM == 4 * (2 * warps + warps * head_dim)
    assert HALVES_WARPS <= warps and "halves.cu" in runtime.KERNEL_FILES
    names = set(KERNELS.templates)
    assert all(f"attention_half<{P},{HALVES_WARPS},{R}>" in names and
               all(f"feed_forward_half<{j},{P}>" in names for j in HALVES_J) and
               f"feed_forward_wide<{P}>" in names
               for P in range(1, HALVES_MAX_P + 1) for R in HALVES_CLUSTERS)
    assert HALVES_CLUSTERS[0] == HALVES_CLUSTER
    assert f"constexpr int J = {HALVES_WIDE_J};" in halves


# ----------------------------------------------------------------------------
# the kernels against float64

@gpu
@pytest.mark.parametrize("dim,hidden,wide", [
    (36, 40, False), (132, 20, False), (288, 768, False), (768, 2048, False), (1024, 48, False),
    (8, 12, False), (36, 96, True), (132, 64, True), (288, 768, True), (768, 2048, True),
    (876, 64, True), (8, 32, True)])
def test_feed_forward_half_against_float64(cp, dim, hidden, wide):
    """h_next = h + w2 @ (silu(w1 @ n) * (w3 @ n)), n = rmsnorm(h): every J the plan takes
    (16, 8, 4) with the rows in registers, P from 1 to 8, and feed_forward_wide (J 32, its
    rows in shared memory), P from 1 to 7 (876: the most an H200's shared memory holds), dims
    that are not multiples of 128. h_next starts at zero, the
    buffer to clear as NaN (zeroed by the launch); h and the weights are left as they were."""
    J, P, smem = halves_plan(dim, 8, hidden, clusters=False, choose=(8, wide)).feed_forward
    name = f"feed_forward_wide<{P}>" if wide else f"feed_forward_half<{J},{P}>"
    assert (smem > 0) == wide and (J == HALVES_WIDE_J) == wide
    x, g = rand(1, dim), rand(dim, scale=0.5) + 1
    w13, w2 = rand(2 * hidden, dim, scale=dim ** -0.5), rand(dim, hidden, scale=hidden ** -0.5)
    eps = 1e-5
    n = rmsnorm64(x[0], g, eps)
    a1, a3 = w13[:hidden].astype(np.float64) @ n, w13[hidden:].astype(np.float64) @ n
    ref = x[0] + w2.astype(np.float64) @ (a1 / (1 + np.exp(-a1)) * a3)
    X, G, W13, W2 = (cp.asarray(a) for a in (x, g, w13, w2))
    Y, Z = cp.zeros((1, dim), dtype=np.float32), cp.full((1, dim), np.nan, dtype=np.float32)
    KERNELS.launch(name, (hidden // J,), (32 * J,),
                   (X, G, np.float32(eps), W13, W2, Y, Z, runtime.i32(dim), runtime.i32(hidden)),
                   shared_mem=smem)
    assert rel_err(Y[0], ref) < 1e-5
    assert (Z.get() == 0).all()
    assert np.array_equal(X.get(), x) and np.array_equal(W2.get(), w2)


def attention_reference(x, g, eps, wqkv, wo, cache_k, cache_v, pos, nh, nkv, hd, cos, sin):
    """float64: h + wo @ attention at pos, the cache rows 0 .. pos - 1 as given, row pos the
    new key (rotated) and value; returns (h_mid, the new key row, the new value row)."""
    qkv = wqkv.astype(np.float64) @ rmsnorm64(x, g, eps)
    heads = qkv.reshape(1, 1, nh + 2 * nkv, hd)
    rot = apply_rotary_emb(heads[:, :, :nh + nkv], cos[pos:pos + 1], sin[pos:pos + 1])[0, 0]
    q, k_new, v_new = rot[:nh], rot[nh:], heads[0, 0, nh + nkv:]
    keys = np.concatenate([cache_k[:pos].astype(np.float64), k_new[None]])      # (pos + 1, nkv, hd)
    values = np.concatenate([cache_v[:pos].astype(np.float64), v_new[None]])
    out = np.empty((nh, hd))
    for h in range(nh):
        kv = h // (nh // nkv)
        s = keys[:, kv] @ q[h] / np.sqrt(hd)
        p = np.exp(s - s.max())
        out[h] = p @ values[:, kv] / p.sum()
    return x + wo.astype(np.float64) @ out.reshape(-1), k_new, v_new


@gpu
@pytest.mark.parametrize("dim,nh,nkv,hd,pos", [
    (64, 8, 2, 8, 0), (64, 8, 2, 8, 5), (288, 6, 6, 48, 127), (288, 6, 6, 48, 128),
    (288, 6, 3, 48, 300), (768, 12, 12, 64, 60), (768, 12, 4, 64, 1000), (256, 2, 1, 128, 200),
    (1024, 16, 4, 64, 3), (288, 6, 6, 48, 2100)])
@pytest.mark.parametrize("R", HALVES_CLUSTERS)
def test_attention_half_against_float64(cp, clusters, dim, nh, nkv, hd, pos, R):
    """h_mid = h + wo @ attention(rope(wqkv @ rmsnorm(h))) at pos, the new key and value into
    the cache at pos, rows before it untouched and rows after it never read (NaN). Positions in
    one chunk of keys (every block of the cluster attends alone: 0 to 128) and in several (the
    blocks take chunks in turn and meet in the records: 200 to 1000; 2100, 17 chunks, so that
    blocks load a second and a third), grouped-query heads,
    head_dim 8 (a block one row of each of q, k, v) to 128, P 1 to 8; clusters of 8 and of 4."""
    launch = halves_plan(dim, hd, 4 * dim, choose=(R, False)).attention
    if launch is None:
        pytest.skip(f"clusters of {R} need more shared memory than the GPU's for this shape")
    P, smem, _ = launch
    max_seq, eps = pos + 3, 1e-5
    x, g = rand(dim), rand(dim, scale=0.5) + 1
    wqkv = rand((nh + 2 * nkv) * hd, dim, scale=dim ** -0.5)
    wo = rand(dim, nh * hd, scale=(nh * hd) ** -0.5)
    cos, sin = precompute_freqs(hd, max_seq)
    start_k, start_v = rand(max_seq, nkv, hd), rand(max_seq, nkv, hd)
    start_k[pos:], start_v[pos:] = np.nan, np.nan
    ref, k_new, v_new = attention_reference(x, g, eps, wqkv, wo, start_k, start_v, pos, nh, nkv,
                                            hd, cos, sin)
    cache_k, cache_v = cp.asarray(start_k), cp.asarray(start_v)
    step = cp.asarray(np.array([pos, 0], dtype=np.int32))
    Y, Z = cp.zeros((1, dim), dtype=np.float32), cp.full((1, dim), np.nan, dtype=np.float32)
    KERNELS.launch(f"attention_half<{P},{HALVES_WARPS},{R}>", (R, nh),
                   (32 * HALVES_WARPS,),
                   (cp.asarray(x[None]), cp.asarray(g), np.float32(eps), cp.asarray(wqkv),
                    cp.asarray(wo), step, cp.asarray(cos), cp.asarray(sin), cache_k, cache_v,
                    Y, Z, runtime.i32(dim), runtime.i32(nh), runtime.i32(nkv), runtime.i32(hd),
                    np.float32(1.0 / np.sqrt(hd))), shared_mem=smem)
    assert rel_err(Y[0], ref) < 1e-5
    assert (Z.get() == 0).all()
    got_k, got_v = cache_k.get(), cache_v.get()
    assert rel_err(got_k[pos], k_new) < 1e-6 and rel_err(got_v[pos], v_new) < 1e-6
    assert np.array_equal(got_k[:pos], start_k[:pos]) and np.array_equal(got_v[:pos], start_v[:pos])
    assert np.isnan(got_k[pos + 1:]).all() and np.isnan(got_v[pos + 1:]).all()


# ----------------------------------------------------------------------------
# the step

def halves_model(cuda, n_layers, deterministic=False, max_seq_len=160, w=None, hidden=172):
    """A model both halves take (GQA, J 4: hidden 172), on the GPU and the CPU; its weights w
    (random ones by default) and ops."""
    p = ModelArgs(dim=64, n_layers=n_layers, n_heads=8, n_kv_heads=2, vocab_size=301,
                  hidden_dim=hidden, max_seq_len=max_seq_len, max_batch_size=2)
    w = random_weights(p, seed=int(rng.integers(1 << 30)), scale=0.5) if w is None else w
    ops = cuda.CudaOps(persistent=False, deterministic=deterministic)
    return Transformer(p, w, ops), Transformer(p, w, CPU), ops, w


@gpu
@pytest.mark.parametrize("n_layers", [3, 4, 5])
@pytest.mark.parametrize("pair", [None, (4, True)])
def test_one_row_steps_take_two_launches_a_layer_and_match_the_cpu(clusters, monkeypatch,
                                                                    n_layers, pair):
    """The one-row step through run_halves (2 launches a layer, embed_tokens and the
    classifier) against the CPU model within 1e-4, position by position through the cache's
    first chunk and past it (alone, then the records), through the graph; layer counts that
    leave the residual in each of its three buffers at the step's end (the step's first launch
    adds into the buffer embed_tokens zeroed, whatever the last one zeroed); two rows still take
    the five launches. With the plan's pair, and with stories110M's on an H200 (clusters of 4,
    feed_forward_wide: hidden 192)."""
    import functools
    import minillama.cuda as cuda
    from minillama.cuda import fused
    if pair:
        monkeypatch.setattr(fused, "halves_plan", functools.partial(halves_plan, choose=pair))
    gpu_model, cpu_model, ops, _ = halves_model(cuda, n_layers, hidden=192 if pair else 172)
    forward = ops.decoder(gpu_model)
    tokens = np.array([[7]])
    for pos in range(0, 150):
        got = forward(tokens, pos)
        want = cpu_model.forward(tokens, pos)
        assert rel_err(got, want) < 1e-4, f"position {pos}"
        tokens = want[:, -1].argmax(-1).reshape(1, 1)
    decoder = ops._decoders[gpu_model]
    assert decoder.launches_per_step[1] == 2 * n_layers + 2
    if pair:
        assert decoder.halves.attention[2] == 4 and decoder.halves.feed_forward[0] == 32
    assert decoder.graphs[1] is not None
    two = rng.integers(0, 301, size=(2, 1))
    assert rel_err(forward(two, 150), cpu_model.forward(two, 150)) < 1e-4
    assert decoder.launches_per_step[2] == 5 * n_layers + 2


@gpu
def test_deterministic_decoding_keeps_five_launches_and_its_bits(clusters):
    """CudaOps(deterministic=True): no halves (5 launches a layer at one row) and the same
    logits bit for bit from two decoders of one model, step after step; greedy steps through
    the halves pick the deterministic decoder's tokens, their logits within 1e-5 of its."""
    import minillama.cuda as cuda
    one, _, ops_one, w = halves_model(cuda, 4, deterministic=True)
    two, _, ops_two, _ = halves_model(cuda, 4, deterministic=True, w=w)
    fast, _, ops_fast, _ = halves_model(cuda, 4, w=w)
    f_one, f_two, f_fast = (ops.decoder(m) for ops, m in
                            ((ops_one, one), (ops_two, two), (ops_fast, fast)))
    tokens = np.array([[5]])
    for pos in range(40):
        a, b = f_one(tokens, pos), f_two(tokens, pos)
        assert np.array_equal(a.get(), b.get()), f"position {pos}"
        tokens = a[:, -1].argmax(-1).get().reshape(1, 1)
    assert ops_one._decoders[one].halves is None and ops_fast._decoders[fast].halves is not None
    assert ops_one._decoders[one].launches_per_step[1] == 5 * 4 + 2
    tokens = np.array([[5]])
    for pos in range(0, 40, 8):                    # 8 steps a call, the picks on the GPU
        backs, last = f_fast.greedy_steps(tokens, pos, 8)
        for j in range(8):                         # each step fed the halves' own pick before
            fed = tokens if j == 0 else backs[j - 1, :1].reshape(1, 1).astype(np.int64)
            want = f_one(fed, pos + j)[0, -1].get()
            first, second = np.argsort(want)[::-1][:2]
            # the sums' order moves the logits by ~1e-6 at most: a tie that close may go
            # either way, any other pick must be the deterministic decoder's
            close = want[first] - want[second] <= 1e-5 * np.abs(want).max()
            assert backs[j, 0] in ((first, second) if close else (first,)), f"{pos + j}"
        assert rel_err(last, want) < 1e-5
        tokens = backs[-1, :1].reshape(1, 1).astype(np.int64)


@gpu
@pytest.mark.parametrize("case", ["no clusters", "no J"])
def test_a_half_left_out_runs_as_the_five_launches_share(clusters, monkeypatch, case):
    """Where halves_plan leaves one half out, run_halves launches that half as run_five's share
    in place, in the residual buffer the other half's launches read and add into: on a GPU
    without clusters (the attention half as three launches; the default on an A100), and where
    no J divides hidden_dim (hidden 170: the feed-forward half as two). Logits against the CPU
    over 40 positions, and the launches a step."""
    import minillama.cuda as cuda
    from minillama.cuda import fused
    if case == "no clusters":
        monkeypatch.setattr(fused, "has_clusters", lambda: False)
    hidden = 172 if case == "no clusters" else 170
    p = ModelArgs(dim=64, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=301,
                  hidden_dim=hidden, max_seq_len=48, max_batch_size=1)
    w = random_weights(p, seed=int(rng.integers(1 << 30)), scale=0.5)
    ops = cuda.CudaOps(persistent=False)
    gpu_model, cpu_model = Transformer(p, w, ops), Transformer(p, w, CPU)
    forward = ops.decoder(gpu_model)
    tokens = np.array([[3]])
    for pos in range(40):
        want = cpu_model.forward(tokens, pos)
        assert rel_err(forward(tokens, pos), want) < 1e-4, f"position {pos}"
        tokens = want[:, -1].argmax(-1).reshape(1, 1)
    plan = ops._decoders[gpu_model].halves
    per_layer = 3 + 1 if case == "no clusters" else 1 + 2
    assert (plan.attention is None) == (case == "no clusters")
    assert (plan.feed_forward is None) == (case == "no J")
    assert ops._decoders[gpu_model].launches_per_step[1] == per_layer * p.n_layers + 2


def test_deterministic_default_reads_the_environment(monkeypatch):
    """MINILLAMA_DETERMINISTIC=1 makes CudaOps deterministic where the caller does not say
    (the command line's way to ask); unset, or anything else, not."""
    from minillama.cuda.backend import deterministic_default
    monkeypatch.delenv("MINILLAMA_DETERMINISTIC", raising=False)
    assert deterministic_default() is False
    for value, want in (("1", True), ("0", False), ("yes", False)):
        monkeypatch.setenv("MINILLAMA_DETERMINISTIC", value)
        assert deterministic_default() is want


def test_x16_batches_default_reads_the_environment(monkeypatch):
    """x in one float16 part on the batches' tensor cores unless MINILLAMA_X16_BATCHES=0 asks
    for two: unset, 1, or anything else, one part."""
    from minillama.cuda.backend import x16_batches_default
    monkeypatch.delenv("MINILLAMA_X16_BATCHES", raising=False)
    assert x16_batches_default() is True
    for value, want in (("1", True), ("0", False), ("yes", True), ("", True)):
        monkeypatch.setenv("MINILLAMA_X16_BATCHES", value)
        assert x16_batches_default() is want
