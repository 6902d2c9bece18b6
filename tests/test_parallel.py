"""Tensor parallelism on the CPU: Meta's layout in a simulated world of N ranks in one process
(threads, the all-reduce as a sum), checked against the unsharded model; every storage format
sliced; Meta's 2-shard checkpoints read shard k on rank k; the TCP rendezvous; the refusals."""
import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import greedy, max_rel_err
from minillama import formats
from minillama.checkpoints.random import random_weights
from minillama.dtypes import LazyTensor, store_weights
from minillama.errors import ArgumentError, DeviceError
from minillama.loading import read_checkpoint
from minillama.model import ModelArgs, Transformer, weight_shapes
from minillama.ops import CPU
from minillama.parallel import loading as tp_loading
from minillama.parallel.comm import (Rendezvous, SimulatedWorld, free_port, nccl_id_bytes,
                                     nccl_id_tuple)
from minillama.parallel.model import ShardedTransformer
from minillama.parallel.slicing import (check_world, shard_args, shard_weights, slice_weight,
                                        split_axis)
from minillama.quant import Q8Tensor, quantize_q8


def gqa_args(world, **kw):
    """A tiny GQA model Meta's layout can cut into `world` ranks: 2 query heads per kv head,
    every cut dimension a multiple of world; odd sizes elsewhere."""
    kv = 2 * world if world > 1 else 3
    return ModelArgs(**{**dict(dim=8 * 2 * kv, n_layers=2, n_heads=2 * kv, n_kv_heads=kv,
                               vocab_size=29 * world, hidden_dim=22 * world, max_seq_len=24,
                               max_batch_size=2), **kw})


def sharded_forward(p, weights, world, calls, dtype=None, kv_dtype="float32"):
    """[each call's logits] from rank 0 of a simulated world; every rank must agree."""
    sim = SimulatedWorld(world)

    def rank_main(rank, comm):
        args = shard_args(p, rank, world)
        model = ShardedTransformer(args, store_weights(shard_weights(weights, p, rank, world),
                                                       dtype), CPU, comm, kv_dtype)
        return [model.forward(tokens, pos) for tokens, pos in calls]
    results = sim.run(rank_main)
    for rank in range(1, world):                    # all-gathered: the same on every rank
        for a, b in zip(results[0], results[rank]):
            np.testing.assert_array_equal(a, b)
    return results[0]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_simulated_world_equals_the_unsharded_model(world):
    p = gqa_args(world)
    weights = random_weights(p, seed=world)
    tokens = np.random.default_rng(world).integers(0, p.vocab_size, size=(2, 9))
    calls = [(tokens, 0), (tokens[:, :1], 9), (tokens[:, 1:3], 10)]     # prompt, then the cache
    reference = Transformer(p, weights)
    for got, (t, pos) in zip(sharded_forward(p, weights, world, calls), calls):
        want = reference.forward(t, pos)
        assert got.shape == want.shape
        assert max_rel_err(got, want) < 1e-5


def test_simulated_world_greedy_tokens_and_tied_classifier():
    p = gqa_args(2)
    weights = random_weights(p, seed=7, tied=True)
    want = greedy(Transformer(p, weights).forward, [1, 5, 9], 12)
    sim = SimulatedWorld(2)

    def rank_main(rank, comm):
        model = ShardedTransformer(shard_args(p, rank, 2),
                                   store_weights(shard_weights(weights, p, rank, 2)), CPU, comm)
        return greedy(model.forward, [1, 5, 9], 12)
    assert sim.run(rank_main) == [want, want]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8", "q4_0"])
def test_every_storage_format_sharded(dtype):
    """Slicing then storing equals storing then slicing: rows cut whole, columns on block
    boundaries, so each rank's blocks are the unsharded model's blocks."""
    p = gqa_args(2, dim=128, hidden_dim=128, vocab_size=64)
    weights = random_weights(p, seed=11)
    whole = store_weights(weights, dtype)
    for rank in range(2):
        mine = store_weights(shard_weights(weights, p, rank, 2), dtype)
        for name, w in shard_weights(whole, p, rank, 2).items():
            assert type(mine[name]) is type(w), name
            a, b = (np.asarray(formats.dequantize(x)) if isinstance(x, formats.Packed)
                    else np.asarray(x) for x in (mine[name], w))
            np.testing.assert_array_equal(a, b, err_msg=name)
    tokens = np.array([[1, 2, 3, 4]])
    want = Transformer(p, whole).forward(tokens, 0)
    got = sharded_forward(p, weights, 2, [(tokens, 0)], dtype)[0]
    assert max_rel_err(got, want) < 1e-5


def test_slicing_packed_q8_groups_and_lazy_tensors():
    w = np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)
    for fmt in ("f16", "bf16", "q8_0", "q4_0", "q4_1"):
        packed = formats.quantize(w, fmt)
        full = formats.dequantize(packed)
        np.testing.assert_array_equal(formats.dequantize(slice_weight(packed, 0, 2, 5)), full[2:5])
        np.testing.assert_array_equal(formats.dequantize(slice_weight(packed, 1, 32, 64)),
                                      full[:, 32:])
        lazy = LazyTensor(packed.shape, fmt, lambda: packed)
        cut = slice_weight(lazy, 1, 0, 32)
        assert cut.shape == (6, 32) and cut.format == fmt
        np.testing.assert_array_equal(np.asarray(cut), full[:, :32])
    with pytest.raises(ArgumentError, match=r"q8_0 blocks of 32 values.*16:64"):
        slice_weight(formats.quantize(w, "q8_0"), 1, 16, 64, "layers.0.feed_forward.w2.weight")
    q, s = quantize_q8(w, 16)
    q8 = Q8Tensor(q, s, 16)
    cut = slice_weight(q8, 1, 16, 48)
    np.testing.assert_array_equal(cut.q, q[:, 16:48])
    np.testing.assert_array_equal(cut.s, s[:, 1:3])
    with pytest.raises(ArgumentError, match="Q8 groups of 16"):
        slice_weight(q8, 1, 8, 40)


def test_split_axes_are_metas():
    assert split_axis("layers.3.attention.wq.weight") == 0
    assert split_axis("layers.3.feed_forward.w3.weight") == 0
    assert split_axis("output.weight") == 0
    assert split_axis("layers.3.attention.wo.weight") == 1
    assert split_axis("layers.3.feed_forward.w2.weight") == 1
    assert split_axis("tok_embeddings.weight") == 1
    assert split_axis("layers.3.ffn_norm.weight") is None


def test_world_sizes_that_do_not_cut_the_model_are_refused():
    p = ModelArgs(dim=64, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=64, hidden_dim=64)
    with pytest.raises(ArgumentError, match=r"^tensor_parallel: 4 GPUs cannot share 2 kv heads"):
        check_world(p, 4)
    with pytest.raises(ArgumentError, match=r"^tensor_parallel: vocab_size 63 does not split"):
        check_world(ModelArgs(dim=64, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=63,
                              hidden_dim=64), 2)
    assert check_world(p, 2) == 2


# ----------------------------------------------------------------------------
# Meta's checkpoints: shard k on rank k

def write_meta_shards(folder, p, weights, n_shards, torch_dtype=None):
    """tests/test_meta.py's write_meta: torch.save, one file per rank, cut by torch.chunk."""
    pytest.importorskip("torch")
    from test_meta import write_meta
    params = dict(dim=p.dim, n_layers=p.n_layers, n_heads=p.n_heads, n_kv_heads=p.n_kv_heads,
                  vocab_size=p.vocab_size, multiple_of=2, norm_eps=p.norm_eps)
    return write_meta(folder, weights, n_shards, torch_dtype, params=params)


@pytest.mark.parametrize("torch_dtype", [None, "bfloat16"])
def test_meta_two_shards_load_on_two_ranks_without_a_merge(tmp_path, monkeypatch, torch_dtype):
    p = gqa_args(2, hidden_dim=44, max_seq_len=24, max_batch_size=2)
    weights = random_weights(p, seed=5)
    torch = pytest.importorskip("torch")
    stored = write_meta_shards(tmp_path, p, weights, 2,
                               getattr(torch, torch_dtype) if torch_dtype else None)
    merged = []                                       # reads of a merged weight
    from minillama.checkpoints import meta
    real = meta.read_shard
    opened = []
    monkeypatch.setattr(meta, "read_shard", lambda path: opened.append(path) or real(path))
    monkeypatch.setattr(tp_loading, "read_shard", meta.read_shard)
    ckpt = read_checkpoint(tmp_path, max_seq_len=24, max_batch_size=2)
    for name, w in ckpt.weights.items():              # reading a merged weight would fail
        if split_axis(name) is not None:
            monkeypatch.setattr(w, "read", lambda: merged.append(1) or 1 / 0)
    ranks = []
    for rank in range(2):
        args, shard, _ = tp_loading.open_shard(ckpt, rank, 2, device=None)
        ranks.append((args, shard))
    assert not merged
    assert [o.rsplit("/", 1)[-1] for o in opened[-2:]] == ["consolidated.00.pth",
                                                          "consolidated.01.pth"]
    assert ranks[1][1]["layers.0.attention.wo.weight"].shape == (p.dim, p.dim // 2)
    # and the two ranks' model equals the merged model
    tokens = np.random.default_rng(2).integers(0, p.vocab_size, size=(2, 6))
    want = Transformer(p, stored).forward(tokens, 0)
    sim = SimulatedWorld(2)
    got = sim.run(lambda rank, comm: ShardedTransformer(*ranks[rank], CPU, comm).forward(tokens, 0))
    assert max_rel_err(got[0], want) < 1e-5


def test_meta_checkpoint_with_another_shard_count_is_sliced(tmp_path):
    pytest.importorskip("torch")
    p = gqa_args(2, hidden_dim=44)
    weights = random_weights(p, seed=6)
    write_meta_shards(tmp_path, p, weights, 1)
    ckpt = read_checkpoint(tmp_path, max_seq_len=24, max_batch_size=2)
    assert tp_loading.meta_shard(ckpt, 0, 2) is None           # 1 shard, 2 ranks: slice it
    _, shard, _ = tp_loading.open_shard(ckpt, 1, 2, device=None)
    np.testing.assert_array_equal(shard["layers.1.feed_forward.w2.weight"],
                                  weights["layers.1.feed_forward.w2.weight"][:, 22:])


def test_the_memory_plan_is_per_gpu():
    p = ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=32000, hidden_dim=13824,
                  max_seq_len=2048, max_batch_size=1)
    from minillama.memory import plan_memory
    whole = plan_memory(p, "float16", 2048, 1, "cuda", budget=80 << 30)
    lazy = {name: LazyTensor(shape, "f16", None) for name, shape in weight_shapes(p).items()}
    args = shard_args(p, 0, 2)
    half = tp_loading.plan_rank(p, args, shard_weights(lazy, p, 0, 2), "float16", "cuda",
                                budget=80 << 30)
    assert half.kv_cache * 2 == whole.kv_cache
    assert abs(half.weights * 2 - whole.weights) < 0.01 * whole.weights
    assert "per GPU: rank 0 of 2" in half.format()
    tight = tp_loading.plan_rank(p, args, shard_weights(lazy, p, 0, 2), "float16", "cuda",
                                 budget=12 << 30)
    assert not tight.fits and any("--dtype int8" in o for o in tight.options)
    assert any("--tensor-parallel 4" in o for o in tight.options)


# ----------------------------------------------------------------------------
# the rendezvous, on one machine

def test_rendezvous_hands_rank_0s_bytes_to_every_rank():
    port, world = free_port(), 4
    got = [None] * world

    def rank_main(rank):
        got[rank] = Rendezvous("127.0.0.1", port, rank, world).share_bytes(
            lambda: bytes(range(128)), timeout=20)
    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (3, 1, 2, 0)]
    for t in threads:                  # the others start first: they wait for rank 0
        t.start()
    for t in threads:
        t.join()
    assert got == [bytes(range(128))] * world


def test_rendezvous_from_torchruns_environment_and_its_errors():
    env = dict(MASTER_ADDR="10.0.0.1", MASTER_PORT="29500", RANK="1", WORLD_SIZE="2")
    assert Rendezvous.from_env(env) == Rendezvous("10.0.0.1", 29500, 1, 2)
    with pytest.raises(ArgumentError, match="^MASTER_PORT: not set"):
        Rendezvous.from_env({**env, "MASTER_PORT": ""})
    with pytest.raises(ArgumentError, match="^RANK: expected an integer"):
        Rendezvous.from_env({**env, "RANK": "one"})
    with pytest.raises(ArgumentError, match="expected 0 <= RANK < WORLD_SIZE"):
        Rendezvous.from_env({**env, "RANK": "2"})
    with pytest.raises(DeviceError, match="could not reach rank 0 at 127.0.0.1"):
        Rendezvous("127.0.0.1", free_port(), 1, 2).share_bytes(lambda: b"", timeout=0.3)


def test_the_nccl_unique_id_survives_the_wire():
    uid = tuple(((i * 37) % 256) - 128 for i in range(128))        # signed chars, as CuPy's
    assert nccl_id_tuple(nccl_id_bytes(uid)) == uid


# ----------------------------------------------------------------------------
# the command line: refusals, one line and exit status 2 (no GPU needed)

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "minillama", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_cli_refuses_a_gpu_count_that_does_not_divide_the_kv_heads(shared):
    out = run_cli("complete", "--ckpt_dir", shared / "models/stories260K.bin", "--tokenizer_path",
                  shared / "models/tok512.bin", "--prompt", "Hi", "--tensor-parallel", 3)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "minillama: error: tensor_parallel: 3 GPUs cannot share 4 kv heads (n_kv_heads must be "
        "a multiple of the GPU count: each kv head stays on one GPU with the query heads that "
        "read it)"]


def test_cli_without_cupy_says_so(shared):
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here: the refusal without it cannot be seen")
    except ImportError:
        pass
    out = run_cli("run", shared / "models/stories260K.bin", "-z", shared / "models/tok512.bin",
                  "--tensor-parallel", 2, "-n", 8)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1
    assert "needs CuPy" in out.stderr


def test_info_shows_the_plan_per_gpu(shared):
    out = run_cli("info", shared / "models/stories260K.bin", "--tensor-parallel", 2)
    assert out.returncode == 0, out.stderr
    assert "memory plan: cuda (per GPU: rank 0 of 2)" in out.stdout
    assert "2 x 5 layers x 1 x 512 x 2 kv heads x 8 x 4 bytes" in out.stdout


# ----------------------------------------------------------------------------
# reading only the rank's bytes: a slice of a LazyTensor whose reader maps the file

def _lazy_tensors(kind, tmp_path):
    """{name: LazyTensor} of a small file written in `kind` (its 2-D weights only)."""
    rng = np.random.default_rng(1)
    arrays = {"a.weight": rng.standard_normal((6, 96)).astype(np.float32),
              "b.weight": rng.standard_normal((4, 64)).astype(np.float32)}
    if kind == "gguf":
        gguf = pytest.importorskip("gguf")
        from minillama.checkpoints.gguf import load_gguf
        from test_gguf import TINY, write_gguf
        p = ModelArgs(**TINY)
        path = write_gguf(tmp_path / "m.gguf", p, random_weights(p, seed=2),
                          gguf.GGMLQuantizationType.Q8_0)
        weights = load_gguf(path)[1]
        return {k: w for k, w in weights.items() if len(w.shape) == 2}
    if kind == "safetensors":
        st = pytest.importorskip("safetensors.numpy")
        from minillama.checkpoints.safetensors import read_safetensors
        st.save_file(arrays, str(tmp_path / "m.safetensors"))
        return read_safetensors(tmp_path / "m.safetensors")
    torch = pytest.importorskip("torch")
    from minillama.checkpoints.torchzip import load_pth
    torch.save({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in arrays.items()},
               tmp_path / "m.pth")
    return load_pth(tmp_path / "m.pth")


@pytest.mark.parametrize("kind", ["gguf", "safetensors", "pth"])
def test_a_slice_reads_only_its_own_bytes(kind, tmp_path):
    lazies = _lazy_tensors(kind, tmp_path)
    assert lazies and all(w.raw is not None for w in lazies.values())
    for name, w in lazies.items():
        rows, cols = w.shape
        for axis, (start, stop) in ((0, (rows // 2, rows)), (1, (32, 64))):     # whole blocks
            want = slice_weight(w.read(), axis, start, stop)
            cut = slice_weight(w, axis, start, stop, name)
            whole, w.read = w.read, None                # the slice must not read it all
            got = cut.read()
            w.read = whole
            if isinstance(want, formats.Packed):
                assert got.format == want.format and got.shape == want.shape
                for plane in want.planes:
                    np.testing.assert_array_equal(got.planes[plane], want.planes[plane])
            else:
                np.testing.assert_array_equal(got, want)


def test_bench_tp_shape_and_loop_on_the_cpu():
    from minillama.bench.tp import decode_rate, greedy_tokens, params_13b, params_of
    p = params_13b()
    assert (p.dim, p.n_layers, p.n_heads, p.hidden_dim, p.vocab_size) == (5120, 40, 40, 13824,
                                                                           32000)
    assert check_world(p, 2) == 2
    big = params_of("70B")                   # Llama-2-70B: 8 KV heads, cut 2 or 4 ways
    assert (big.dim, big.n_layers, big.n_heads, big.n_kv_heads, big.hidden_dim) == (
        8192, 80, 64, 8, 28672)
    assert check_world(big, 4) == 4 and check_world(big, 2) == 2
    assert params_of("70B", n_layers=3).n_layers == 3
    small = gqa_args(2)
    model = Transformer(small, random_weights(small, seed=9))
    assert greedy_tokens(model.forward, 8) == greedy(model.forward, [1], 8)
    rate, tokens = decode_rate(model.forward, 8)
    assert rate > 0 and tokens == greedy(model.forward, [1], 8)


class NumpyAsCupy:
    """Just the part of CuPy that bench/gpu7b.py's random_linear uses, on NumPy: enough to run
    bench/tp.py's seeded weights and RandomJob on the CPU."""
    float16, float32, uint8, uint16, uint32, int8 = (np.float16, np.float32, np.uint8,
                                                     np.uint16, np.uint32, np.int8)

    class random:
        """One generator per thread: the simulated ranks are threads of one process, where
        the real ones are processes, each with a generator of its own."""
        state = threading.local()

        @classmethod
        def seed(cls, seed):
            cls.state.rng = np.random.default_rng(seed)

        @classmethod
        def standard_normal(cls, shape, dtype):
            return cls.state.rng.standard_normal(shape, dtype=dtype)

        @classmethod
        def randint(cls, low, high, shape, dtype):
            return cls.state.rng.integers(low, high, shape, dtype=dtype)

        @classmethod
        def uniform(cls, low, high, shape, dtype):
            return cls.state.rng.uniform(low, high, shape).astype(dtype)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_bench_tp_random_job_slices_the_same_weights(monkeypatch, dtype):
    """RandomJob's ranks (each making every weight from its name's seed, keeping its slice)
    equal the whole model made from the same seeds."""
    from minillama.bench import gpu7b, tp
    monkeypatch.setattr(tp, "require_cupy", lambda: NumpyAsCupy)
    monkeypatch.setattr(gpu7b, "require_cupy", lambda: NumpyAsCupy)
    p = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=128,
                  max_seq_len=16, max_batch_size=1)
    whole = dict(tp.SeededGpuWeights(p, dtype))
    assert all(np.array_equal(np.asarray(formats.dequantize(w) if isinstance(w, formats.Packed)
                                         else w),
                              np.asarray(formats.dequantize(v) if isinstance(v, formats.Packed)
                                         else v))
               for w, v in zip(whole.values(), tp.SeededGpuWeights(p, dtype).values()))
    tokens = np.array([[1, 7, 3]])
    want = Transformer(p, store_weights(whole)).forward(tokens, 0)
    job = tp.RandomJob(p, dtype)
    got = SimulatedWorld(2).run(lambda rank, comm: job.open(rank, 2, CPU, comm).forward(tokens, 0))
    assert max_rel_err(got[0], want) < 1e-5


# ----------------------------------------------------------------------------
# the GPU's fused step, its control flow checked on the CPU: ShardedFusedDecoder.run with NumPy
# versions of decode.cu's kernels and of the gemv (what the kernels compute is tested against
# the CPU in tests/test_cuda.py; here what is checked is the step around them: the gathers,
# which rank adds the residual, the two all-reduces)

class NumpyKernels:
    """decode.cu's embed_tokens and attention_decode, on NumPy arrays."""
    launches = 0

    def launch(self, name, grid, block, args, shared_mem=0, ordinary=False):
        getattr(self, name.split("<")[0])(grid, *args)

    @staticmethod
    def embed_tokens(grid, step, table, out, clear, clear_count, dim):
        assert int(clear_count) == 0            # a rank zeroes nothing (no deferred norms)
        for b in range(grid[0]):
            out[b, :dim] = table[step[1 + b], :dim]

    @staticmethod
    def attention_decode(grid, qkv, step, cos, sin, cache_k, cache_v, out, nh, nkv, hd, max_seq,
                         scale, split_parts, arrivals, row_ss, norm_k, eps):
        assert int(row_ss) == 0                 # no norm left to it (no deferred norms)
        from minillama.model import apply_rotary_emb
        from minillama.ops import softmax
        pos, bsz = int(step[0]), grid[1]
        heads = qkv[:bsz].reshape(bsz, 1, nh + 2 * nkv, hd)
        qk = apply_rotary_emb(heads[:, :, :nh + nkv], cos[pos:pos + 1], sin[pos:pos + 1])
        cache_k[:bsz, pos] = qk[:, 0, nh:]
        cache_v[:bsz, pos] = heads[:, 0, nh + nkv:]
        for b in range(bsz):
            for h in range(nh):
                g = h // (nh // nkv)
                scores = cache_k[b, :pos + 1, g] @ (qk[b, 0, h] * scale)
                out[b, h * hd:(h + 1) * hd] = softmax(scores) @ cache_v[b, :pos + 1, g]


def numpy_matvec(x, w, out, accumulate=False, norm=None, eps=1e-5, swiglu=False,
                 any_order=False, x16=False):
    """fused.matvec in NumPy; any_order (the slices' sums in any order) and x16 (x in one
    float16 part on the tensor cores) change nothing here."""
    from minillama.model import rms_norm, silu
    if norm is not None:
        x = rms_norm(x, norm, eps)
    if swiglu:
        half = x.shape[1] // 2
        x = silu(x[:, :half]) * x[:, half:]
    y = x @ np.asarray(w).T
    out[...] = out + y if accumulate else y


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_fused_steps_control_flow_on_the_cpu(monkeypatch, world):
    import sys
    import types
    from minillama.cuda import fused as one_gpu
    from minillama.parallel import fused
    kernels = NumpyKernels()
    for module in (one_gpu, fused):                  # the step is one_gpu's, the hooks fused's
        monkeypatch.setattr(module, "KERNELS", kernels)
        monkeypatch.setattr(module, "matvec", numpy_matvec)
    monkeypatch.setitem(sys.modules, "cupyx", types.SimpleNamespace(empty_pinned=np.empty))
    cp = types.SimpleNamespace(zeros=np.zeros, cuda=types.SimpleNamespace(Event=lambda **_: None))
    p = gqa_args(world, max_batch_size=2)
    weights = random_weights(p, seed=13)
    tokens = np.array([[3, 1, 4, 1], [5, 9, 2, 6]])
    want = Transformer(p, weights)
    want.forward(tokens[:, :3], 0)
    want = want.forward(tokens[:, 3:], 3)[:, 0]                 # (2, vocab), position 3

    def rank_main(rank, comm):
        model = ShardedTransformer(shard_args(p, rank, world),
                                   store_weights(shard_weights(weights, p, rank, world)), CPU,
                                   comm)
        model.forward(tokens[:, :3], 0)                         # the prompt: the generic path
        on_gpu = types.SimpleNamespace(**{**vars(model), "ops": types.SimpleNamespace(xp=cp)})
        step = fused.ShardedFusedDecoder(on_gpu)
        step.step[:3] = [3, *tokens[:, 3]]
        step.run(2)
        return step.logits[:2].copy()
    for logits in SimulatedWorld(world).run(rank_main):
        assert max_rel_err(logits, want) < 1e-5


def test_the_rank_decoder_waits_after_every_gpu_step_and_releases_its_graphs():
    """RankDecoder on a stand-in GPU backend: every call (a prompt, a step) ends in
    wait(stream), the caller's (the parent polls there); on the CPU there is nothing to wait
    for. release_graphs drops the CUDA graphs (before NCCL's abort, which waits for them)."""
    import types
    from minillama.parallel.fused import RankDecoder
    p = gqa_args(1)
    calls, waits = [], []
    cuda = types.SimpleNamespace(get_current_stream=lambda: "stream 0")
    ops = types.SimpleNamespace(name="cuda", fused_decode=False, graphs=True,
                                xp=types.SimpleNamespace(cuda=cuda))
    model = types.SimpleNamespace(params=p, ops=ops,
                                  forward=lambda t, pos: calls.append((t.shape, pos)) or "logits")
    step = RankDecoder(model, wait=waits.append)
    assert step(np.array([[1, 2, 3]]), 0) == "logits" and step(np.array([[4]]), 3) == "logits"
    assert calls == [((1, 3), 0), ((1, 1), 3)] and waits == ["stream 0", "stream 0"]
    step.fused = types.SimpleNamespace(graphs={1: "graph"})
    step.release_graphs()
    assert step.fused.graphs == {}
    on_cpu = RankDecoder(types.SimpleNamespace(params=p, ops=CPU, forward=model.forward),
                         wait=waits.append)
    on_cpu(np.array([[5]]), 4)
    assert calls[-1] == ((1, 1), 4) and len(waits) == 2
