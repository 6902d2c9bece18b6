"""The k-quants on the GPU: qgemv_k (kernels/qgemv_k.cu) through the package's checked wrappers,
gemm_v6 through kquant_to_f16, CudaOps and FusedDecoder on models whose matrices are k-quant
super-blocks.

The conventions are test_cuda_formats.py's: fresh random inputs each run, odd sizes (N odd, K
any number of whole super-blocks of 256), batches 1..64, outputs poisoned with NaN, relative
errors in the norm against float64 of the weights the NumPy reference dequantizes
(formats.dequantize), held to 1e-5 for qgemv_k (it multiplies float32 x by exactly those
weights and sums in float32). The tensor cores see x and W rounded to float16: 2e-3 against
float64 of the rounded inputs. Models on the GPU are held to the CPU model with the same
stored weights: logits within 1e-4, greedy tokens identical.

The last tests need no GPU: the compile groups, and which models FusedDecoder covers.
"""
import numpy as np
import pytest

from minillama import formats
from minillama.checkpoints.random import random_weights
from minillama.formats import Packed
from minillama.model import ModelArgs, Transformer
from minillama.ops import CPU
from test_cuda import cuda, poison, product_err, rel_err  # noqa: F401  (fixtures and helpers)
from test_cuda_formats import (MODES, check_decode_path, check_prologues, covered,
                               decode_against_cpu, gpu_ops)
from test_formats import random_gguf
from test_kquants import MIXED, SCALES, kquant_blocks

gpu = pytest.mark.gpu
rng = np.random.default_rng()           # fresh inputs every run

NATIVE = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")       # qgemv_k reads every k-quant
SIZES = [(1, 256), (3, 512), (17, 4352), (127, 1024), (33, 11008)]    # (N, K)
BATCHES = (1, 2, 3, 5, 8, 9, 13, 64)


def kquant_weight(fmt, rows, cols):
    """Random super-blocks (every code and integer scale bit random), d and dmin over many
    octaves, both signs; with the float64 of the reference's weights."""
    w = formats.from_gguf(random_gguf(rng, fmt, rows, cols), fmt, (rows, cols))
    for plane in SCALES[fmt]:
        a = w.planes[plane]
        a[...] = rng.uniform(0.5, 2, a.shape) * 2.0 ** rng.integers(-14, -2, a.shape) \
            * rng.choice([-1, 1], a.shape)
    return w, formats.dequantize(w).astype(np.float64)


# ----------------------------------------------------------------------------
# qgemv_k.cu

@gpu
@pytest.mark.parametrize("fmt", NATIVE)
@pytest.mark.parametrize("N,K", SIZES)
def test_qgemv_k_matches_float64_of_the_dequantized_weights(cuda, cp, fmt, N, K):
    packed, w64 = kquant_weight(fmt, N, K)
    w = packed.map(cp.asarray)
    for M in BATCHES:
        x = rng.standard_normal((M, K)).astype(np.float32)
        out = poison(cp, (M, N))
        y = cuda.kernels.qgemv(cp.asarray(x), w, out=out)        # sends k-quants to qgemv_k
        assert y is out
        assert product_err(y, x.astype(np.float64), w64) < 1e-5, f"M={M}"


@gpu
@pytest.mark.parametrize("fmt", NATIVE)
def test_qgemv_k_prologues_accumulate_and_chunks(cuda, cp, fmt):
    packed, w64 = kquant_weight(fmt, 129, 2304)
    check_prologues(cp, cuda.kernels.qgemv, packed.map(cp.asarray), w64,
                    smems=(cuda.kernels.QGEMV_SMEM, 1),          # x whole, or a super-block
                    smem=1, blocks_per_sm=1)                     # at a time


@gpu
@pytest.mark.parametrize("fmt", NATIVE)
def test_kquant_to_f16_rounds_the_reference_weights(cuda, cp, fmt):
    packed, w64 = kquant_weight(fmt, 37, 768)
    f16 = cuda.kernels.kquant_to_f16(packed.map(cp.asarray))
    assert isinstance(f16, Packed) and f16.format == "f16" and f16.shape == (37, 768)
    with np.errstate(over="ignore"):
        want = formats.dequantize(packed).astype(np.float16)
    assert np.array_equal(f16.data.get().view(np.uint16), want.view(np.uint16))


@gpu
@pytest.mark.parametrize("fmt", NATIVE)
@pytest.mark.parametrize("M,N,K", [(1, 8, 256), (65, 77, 1024), (300, 1000, 4352)])
def test_gemm_v5_on_kquants_matches_float64_of_the_16bit_inputs(cuda, cp, fmt, M, N, K):
    packed, w64 = kquant_weight(fmt, N, K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    c = cuda.kernels.gemm_v5(cuda.kernels.to_16bit(cp.asarray(x)), packed.map(cp.asarray),
                             out=poison(cp, (M, N)))
    ref = x.astype(np.float16).astype(np.float64) @ w64.astype(np.float16).astype(np.float64).T
    assert rel_err(c, ref) < 2e-3


@gpu
def test_qgemv_k_rejects_misuse(cuda, cp):
    from minillama.errors import DeviceError
    k = cuda.kernels
    w = kquant_weight("q4_k", 8, 256)[0].map(cp.asarray)
    x = cp.ones((2, 256), np.float32)
    cases = [(lambda: k.qgemv(cp.ones((2, 512), np.float32), w), "(N, K)"),
             (lambda: k.qgemv(x, w, accumulate=True), "accumulate"),
             (lambda: k.qgemv(x, w, norm=x[0], swiglu=True), "one"),
             (lambda: k.qgemv_k(x, formats.quantize(np.ones((8, 256), np.float32), "q4_0")
                                .map(cp.asarray)), "q4_k"),
             (lambda: k.qgemv(x, kquant_weight("q5_k", 8, 256)[0]), "CuPy array"),
             (lambda: k.qgemv(x, w, out=cp.empty((2, 9), np.float32)), "out")]
    for call, words in cases:
        with pytest.raises(DeviceError, match=words.replace("(", r"\(").replace(")", r"\)")):
            call()


# ----------------------------------------------------------------------------
# CudaOps and models

@gpu
@pytest.mark.parametrize("fmt", NATIVE)
def test_cuda_ops_linear_keeps_kquants_packed(cuda, cp, fmt):
    ops = cuda.CudaOps()
    packed, w64 = kquant_weight(fmt, 45, 512)
    w = ops.weight(packed)
    assert isinstance(w, Packed) and w.format == fmt and w.nbytes == packed.nbytes
    assert all(isinstance(a, cp.ndarray) for a in w.planes.values())
    for lead in [(1, 1), (3, 1), (2, 5), (64, 1)]:       # up to 64 rows: qgemv_k, float32 x
        x = rng.standard_normal(lead + (512,)).astype(np.float32)
        got = ops.linear(x, w)
        assert got.shape == lead + (45,)
        assert rel_err(got, x.astype(np.float64) @ w64.T) < 1e-5, f"rows {lead}"
    w16 = w64.astype(np.float16).astype(np.float64)
    for lead in [(65, 1), (3, 70)]:                       # more rows: gemm_v5 on a float16 copy
        x = rng.standard_normal(lead + (512,)).astype(np.float32)
        ref = x.astype(np.float16).astype(np.float64) @ w16.T
        assert rel_err(ops.linear(x, w), ref) < 2e-3, f"rows {lead}"


# matrices of whole super-blocks: dim 256, hidden 512, 4 heads of 64 sharing 2 kv heads
KQ_GPU_ARGS = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, hidden_dim=512,
                   max_seq_len=48, max_batch_size=3)


def kquant_model_weights(p, formats_of, tied=False):
    """random_weights(p)'s norms, and every matrix random super-blocks of formats_of(short
    name), weights of about 0.05 (test_kquants.kquant_blocks)."""
    weights = random_weights(p, seed=int(rng.integers(1 << 30)), tied=tied)
    stored = {}
    for name, w in weights.items():
        if w.ndim == 1:
            stored[name] = w
        elif not (tied and name == "output.weight"):
            fmt = formats_of(name.split(".")[-2])
            stored[name] = formats.from_gguf(kquant_blocks(fmt, *w.shape), fmt, w.shape, name)
    if tied:
        stored["output.weight"] = stored["tok_embeddings.weight"]
    return stored


@gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", NATIVE + ("mixed",))
def test_kquant_model_on_the_gpu_matches_the_cpu(cuda, cp, kind, mode):
    p = ModelArgs(**KQ_GPU_ARGS)
    weights = kquant_model_weights(p, (lambda s: MIXED[s]) if kind == "mixed" else (lambda s: kind),
                                   tied=kind == "q6_k")
    ops = gpu_ops(cuda, mode)
    gpu_model, cpu_model = Transformer(p, weights, ops), Transformer(p, weights, CPU)
    if kind != "mixed":
        for w in (gpu_model.layers[0].attention.wqkv, gpu_model.layers[1].feed_forward.w2,
                  gpu_model.output):                      # kept as stored, on the GPU
            assert isinstance(w, Packed) and w.format == kind
    decode_against_cpu(ops, gpu_model, cpu_model, p.vocab_size)
    check_decode_path(ops, gpu_model, mode)


@gpu
@pytest.mark.parametrize("fmt", NATIVE)
def test_a_long_kquant_prompt_goes_through_the_tensor_cores(cuda, cp, fmt):
    """3 x 30 = 90 rows: gemm_v6 on a float16 copy of each k-quant matrix, x rounded to float16;
    held to 5e-3 as test_cuda_formats holds the other formats."""
    p = ModelArgs(**KQ_GPU_ARGS)
    weights = kquant_model_weights(p, lambda s: fmt)
    gpu_model, cpu_model = Transformer(p, weights, cuda.CudaOps()), Transformer(p, weights, CPU)
    prompt = rng.integers(0, p.vocab_size, size=(3, 30))
    assert rel_err(gpu_model.forward(prompt, 0), cpu_model.forward(prompt, 0)) < 5e-3


# ----------------------------------------------------------------------------
# no GPU needed

def test_each_kquant_has_its_compile_group():
    from minillama.cuda import kernels, runtime
    assert runtime.KERNEL_FILES.index("qgemv_k.cu") > runtime.KERNEL_FILES.index("matmul.cu")
    for fmt in NATIVE:
        kernel = formats.FORMATS[fmt].KERNEL[fmt]
        for rows in kernels.QGEMV_ROWS:
            for pro in kernels.GEMV_PROLOGUES.values():
                assert f"qgemv_k<Fmt{kernel},{rows},{pro}>" in kernels.KERNELS.groups[fmt]
        assert f"kquant_to_f16<Fmt{kernel}>" in kernels.KERNELS.groups[fmt]
        assert fmt in kernels.PACKED_KERNEL_FORMATS
    source = runtime.kernel_source()
    for name in ("FmtQ2_K", "FmtQ3_K", "FmtQ4_K", "FmtQ5_K", "FmtQ6_K", "qgemv_k(",
                 "kquant_to_f16("):
        assert name in source


def test_fused_decoder_covers_the_native_kquants():
    w = formats.from_gguf(random_gguf(rng, "q4_k", 64, 256), "q4_k", (64, 256))
    p = ModelArgs(**KQ_GPU_ARGS)
    for fmt in NATIVE:
        assert covered(formats.from_gguf(random_gguf(rng, fmt, 64, 256), fmt, (64, 256)), params=p)
    assert covered(w, np.float16, params=p)
