"""Hugging Face folders whose weights are pytorch_model.bin (issue 15: the seed's OpenLLaMA-3B as
published), against transformers' own forward and LlamaTokenizer.

transformers 5 no longer writes pytorch_model.bin (save_pretrained's safe_serialization=False is
gone), so `save_bin` writes it as transformers 4's save_pretrained(..., safe_serialization=False)
did: torch.save of the state_dict, split by huggingface_hub into pytorch_model-0000N-of-0000M.bin
with pytorch_model.bin.index.json past max_shard_size; transformers 5 still reads such folders,
which test_transformers_reads_what_save_bin_writes checks. One model is OpenLLaMA-shaped:
head_dim 100 (not a power of two), an untied classifier, rms eps 1e-6, float16 storage, and
OpenLLaMA's own config.json fields (transformers 4.28's: torch_dtype, no rope_theta, no
head_dim, no num_key_value_heads).

GPU tests are marked gpu: `PYTHONPATH=$PWD python -m pytest -q -m gpu tests/test_hf_bin.py`.
"""
import json
import os
import pickle
import zipfile

import numpy as np
import pytest

from conftest import greedy, max_rel_err, require_shared
from minillama.errors import CheckpointError, OutOfMemoryError
from minillama.loading import detect_format, load_model, open_checkpoint, read_checkpoint
from minillama.memory import fmt_bytes, plan_checkpoint
from minillama.model import Transformer
from minillama.ops import to_host

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from conftest import hf_greedy, hf_logits  # noqa: E402
from test_hf import hf_model  # noqa: E402  (needs torch)

gpu = pytest.mark.gpu
GiB = 1 << 30

# OpenLLaMA-3B's config.json: the fields openlm-research/open_llama_3b publishes
OPEN_LLAMA_3B = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 3200, "initializer_range": 0.02,
    "intermediate_size": 8640, "max_position_embeddings": 2048, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 26, "pad_token_id": 0,
    "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.28.0.dev0", "use_cache": True, "vocab_size": 32000}
# ... and a small model of its kind: 2 heads of 100 (head_dim 100), everything else as OpenLLaMA
OPEN_LLAMA_TINY = {**OPEN_LLAMA_3B, "hidden_size": 200, "intermediate_size": 536,
                   "num_attention_heads": 2, "num_hidden_layers": 2, "vocab_size": 71,
                   "max_position_embeddings": 64}
# OpenLLaMA's tokenizer_config.json (LlamaTokenizer; no `legacy` key)
OPEN_LLAMA_TOKENIZER_CONFIG = {
    "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
    "clean_up_tokenization_spaces": False, "model_max_length": 2048, "pad_token": None,
    "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>"}
SEED_PROMPT = "Q: What is the largest animal?\nA:"


def save_bin(model, folder, max_shard_size=None, config=None):
    """transformers 4's save_pretrained(folder, safe_serialization=False): config.json (the
    model's own, or `config` as given) and its state_dict through torch.save, sharded as
    huggingface_hub splits it."""
    from huggingface_hub import split_torch_state_dict_into_shards
    os.makedirs(folder, exist_ok=True)
    if config is None:
        model.config.save_pretrained(folder)
    else:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    state_dict = model.state_dict()
    split = split_torch_state_dict_into_shards(
        state_dict, filename_pattern="pytorch_model{suffix}.bin",
        **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    for file, names in split.filename_to_tensors.items():
        torch.save({n: state_dict[n].contiguous() for n in names}, os.path.join(folder, file))
    if split.is_sharded:
        with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
            json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, f)


def open_llama(config, seed):
    """(reference: a float32 LlamaForCausalLM holding float16-rounded weights, the float16 copy
    a file stores), of an OpenLLaMA config.json's shape."""
    cfg = {k: v for k, v in config.items()
           if k not in ("architectures", "torch_dtype", "transformers_version")}
    reference = hf_model(seed=seed, **{**cfg, "rope_theta": 10000.0,
                                       "num_key_value_heads": cfg["num_attention_heads"]})
    with torch.no_grad():              # the values the file will hold, computed in float32
        for prm in reference.parameters():
            prm.copy_(prm.half().float())
    stored = transformers.LlamaForCausalLM(reference.config).half()
    stored.load_state_dict(reference.state_dict())
    return reference, stored


MODELS = {  # name -> (reference model, model to save, config.json to write or None)
    "gqa": lambda: (hf_model(seed=1),) * 2 + (None,),     # float32: its own reference
    "open_llama": lambda: open_llama(OPEN_LLAMA_TINY, seed=2) + (OPEN_LLAMA_TINY,),
}


@pytest.fixture(scope="module", params=[(m, s) for m in MODELS for s in (None, "20KB")],
                ids=lambda p: f"{p[0]}-{'sharded' if p[1] else 'single'}")
def saved(request, tmp_path_factory):
    """(folder of pytorch_model.bin files, the transformers model they must agree with)."""
    name, shard = request.param
    reference, stored, config = MODELS[name]()
    folder = tmp_path_factory.mktemp(f"{name}-{shard}")
    save_bin(stored, folder, shard, config)
    return folder, reference, name


# ----------------------------------------------------------------------------
# pytorch_model.bin, single and sharded, on the CPU

def test_save_bin_writes_what_transformers_4_wrote(saved):
    folder, _, _ = saved
    files = sorted(os.listdir(folder))
    assert not any(f.endswith(".safetensors") for f in files)
    if "pytorch_model.bin" not in files:
        index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 1 and shards[0] == f"pytorch_model-00001-of-{len(shards):05d}.bin"
        assert set(files) >= set(shards)


def test_transformers_reads_what_save_bin_writes(saved):
    folder, reference, _ = saved
    again = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokens = [[1, 30, 7, 64, 5]]
    np.testing.assert_array_equal(hf_logits(again, tokens), hf_logits(reference, tokens))


def test_logits_and_greedy_match_transformers(saved):
    folder, reference, name = saved
    assert detect_format(folder) == "hf"
    mine = load_model(folder, max_seq_len=40, max_batch_size=2, dtype="float32")
    if name == "open_llama":
        p = mine.params
        assert (p.head_dim, p.norm_eps, p.max_seq_len) == (100, 1e-6, 40)
        assert mine.output is not mine.tok_embeddings
    tokens = np.random.default_rng(3).integers(0, 71, size=(2, 13))
    assert max_rel_err(mine.forward(tokens, 0), hf_logits(reference, tokens)) < 1e-4
    mine = load_model(folder, max_seq_len=40)
    prompt = [1, 30, 7, 64]
    assert greedy(mine.forward, prompt, 24) == hf_greedy(reference, prompt, 24)


def test_weights_are_read_as_stored(saved):
    folder, _, name = saved
    ckpt = read_checkpoint(folder)
    assert {w.format for w in ckpt.weights.values()} == ({"f16"} if name == "open_llama"
                                                         else {"f32"})
    assert "pytorch_model" in ckpt.source and "safetensors" not in ckpt.source


def test_one_shard_given_loads_the_whole_model(saved):
    folder, reference, _ = saved
    first = sorted(f for f in os.listdir(folder) if f.endswith(".bin"))[0]
    mine = load_model(folder / first, max_seq_len=16, dtype="float32")
    tokens = np.arange(1, 9)[None]
    assert max_rel_err(mine.forward(tokens, 0), hf_logits(reference, tokens)) < 1e-4


def test_tensors_the_model_does_not_use_are_skipped(tmp_path):
    """Files written before transformers 4.31 carry each layer's RoPE table as a tensor,
    model.layers.N.self_attn.rotary_emb.inv_freq; minillama computes its own."""
    model = hf_model(seed=10)
    save_bin(model, tmp_path)
    sd = torch.load(tmp_path / "pytorch_model.bin")
    for i in range(model.config.num_hidden_layers):
        sd[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    mine = load_model(tmp_path, max_seq_len=16)
    tokens = np.arange(1, 9)[None]
    assert max_rel_err(mine.forward(tokens, 0), hf_logits(model, tokens)) < 1e-4


# ----------------------------------------------------------------------------
# both present: safetensors is read, and info says so

def test_safetensors_is_preferred_when_both_are_present(tmp_path, capsys):
    from minillama.cli import main
    hf_model(seed=4).save_pretrained(tmp_path)                 # model.safetensors
    save_bin(hf_model(seed=5), tmp_path)                       # other weights, same shape
    ckpt = read_checkpoint(tmp_path)
    assert ckpt.source == ("model.safetensors; pytorch_model.bin files also here, not read: "
                           "safetensors is preferred")
    mine = load_model(tmp_path, max_seq_len=16)
    tokens = np.arange(1, 9)[None]
    assert max_rel_err(mine.forward(tokens, 0), hf_logits(hf_model(seed=4), tokens)) < 1e-4
    assert main(["info", str(tmp_path)]) == 0
    assert f"weights from    {ckpt.source}\n" in capsys.readouterr().out


def test_a_bin_file_named_otherwise_or_without_config_is_not_hugging_face(tmp_path):
    """Only pytorch_model*.bin are Hugging Face weights: llama2.c's files end in .bin too."""
    from minillama.checkpoints.hf import is_hf
    save_bin(hf_model(seed=6), tmp_path)
    assert is_hf(tmp_path) and is_hf(tmp_path / "pytorch_model.bin")
    os.rename(tmp_path / "pytorch_model.bin", tmp_path / "model.bin")
    assert not is_hf(tmp_path) and not is_hf(tmp_path / "model.bin")
    with pytest.raises(CheckpointError, match="not a model file"):
        detect_format(tmp_path)
    os.rename(tmp_path / "model.bin", tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").unlink()
    assert not is_hf(tmp_path) and not is_hf(tmp_path / "pytorch_model.bin")


# ----------------------------------------------------------------------------
# a pickle that runs code is refused, without running it

class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):                   # unpickling calls os.system("touch marker")
        return os.system, (f"touch {self.marker}",)


def _write_bin(path, obj):
    """A torch.save-shaped zip whose data.pkl pickles `obj`."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("pytorch_model/data.pkl", pickle.dumps(obj, protocol=2))
        z.writestr("pytorch_model/byteorder", "little")


@pytest.mark.parametrize("payload", ["state_dict_entry", "whole_file"])
def test_a_code_running_pickle_is_refused_without_running(tmp_path, payload):
    save_bin(hf_model(seed=7), tmp_path)
    marker = tmp_path / "ran"
    obj = RunsCode(marker)
    _write_bin(tmp_path / "pytorch_model.bin",
               {"model.norm.weight": obj} if payload == "state_dict_entry" else obj)
    pickle.loads(pickle.dumps(RunsCode(tmp_path / "proof")))   # the payload does run when
    assert (tmp_path / "proof").exists()                       # pickle is left to it
    with pytest.raises(CheckpointError, match="refusing to load global '(posix|os|nt).system'"):
        open_checkpoint(tmp_path)
    assert not marker.exists()


def test_a_compressed_member_is_refused(tmp_path):
    """torch.save stores members uncompressed; a compressed one could be a zip bomb."""
    save_bin(hf_model(seed=8), tmp_path)
    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path) as z:
        members = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members:
            z.writestr(name, data)
    with pytest.raises(CheckpointError, match="compressed"):
        open_checkpoint(tmp_path)


# ----------------------------------------------------------------------------
# OpenLLaMA-3B: the memory plan, from a file of its shape

@pytest.fixture(scope="module")
def open_llama_3b(tmp_path_factory):
    """OpenLLaMA-3B's config.json and a pytorch_model.bin of its names and shapes in float16,
    each tensor one stored value expanded (stride 0), so the file is a few kB: enough for
    everything but the numbers."""
    folder = tmp_path_factory.mktemp("open_llama_3b")
    with open(folder / "config.json", "w") as f:
        json.dump(OPEN_LLAMA_3B, f)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**OPEN_LLAMA_3B)).state_dict().items()}
    torch.save({n: torch.ones(1, dtype=torch.float16).expand(s) for n, s in shapes.items()},
               folder / "pytorch_model.bin")
    assert os.path.getsize(folder / "pytorch_model.bin") < 1 << 20
    return folder


def test_open_llama_3b_shape_and_info(open_llama_3b, capsys):
    from minillama.cli import main
    ckpt = read_checkpoint(open_llama_3b)
    p = ckpt.params
    assert (p.dim, p.n_layers, p.n_heads, p.n_kv_heads, p.head_dim) == (3200, 26, 32, 32, 100)
    assert (p.hidden_dim, p.vocab_size, p.norm_eps, p.max_seq_len) == (8640, 32000, 1e-6, 2048)
    assert main(["info", str(open_llama_3b)]) == 0
    out = capsys.readouterr().out
    assert "head_dim 100" in out and "norm eps 1e-06" in out
    assert "classifier      separate" in out and "parameters      3,426,473,600" in out
    assert "weights from    pytorch_model.bin\n" in out and "f16 x 237" in out   # 26 x 9 + 3


def test_open_llama_3b_fits_a_12_gib_card_in_float16_not_in_float32(open_llama_3b):
    """The seed's run: complete's --max_seq_len 128 --max_batch_size 4, on a 12 GiB card."""
    ckpt = read_checkpoint(open_llama_3b, max_seq_len=128, max_batch_size=4)
    for dtype in (None, "float16"):                          # as stored is float16
        plan = plan_checkpoint(ckpt, dtype, "cuda", 12 * GiB)
        # the linear weights in float16, the embedding table and the norms in float32
        assert plan.check().fits and 7.0e9 < plan.weights < 7.1e9
    plan = plan_checkpoint(ckpt, "float32", "cuda", 12 * GiB, host_budget=8 * GiB)
    assert plan.weights > 12 * GiB                           # 13.7 GB
    with pytest.raises(OutOfMemoryError) as e:
        plan.check()
    msg = str(e.value)
    assert "\n" not in msg and "12.0 GiB is free (given)" in msg
    for fits in ("float16", "bfloat16", "int8", "q4_0"):
        total = plan_checkpoint(ckpt, fits, "cuda", 12 * GiB).total
        assert f"--dtype {fits} ({fmt_bytes(total)})" in msg
    assert "--max_seq_len" not in msg and "--device cpu" not in msg


# ----------------------------------------------------------------------------
# the seed's prompt: transformers' LlamaTokenizer with OpenLLaMA's tokenizer_config.json

@pytest.fixture
def tokenizer_dir(tmp_path):
    shared = require_shared()
    pytest.importorskip("google.protobuf", reason="transformers reads tokenizer.model with it")
    os.symlink(shared / "models" / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(OPEN_LLAMA_TOKENIZER_CONFIG))
    return tmp_path


@pytest.mark.parametrize("legacy", [None, True, False])
def test_seed_prompt_ids_equal_transformers_llama_tokenizer(tokenizer_dir, legacy):
    """OpenLLaMA's config names no `legacy`: transformers 4 took legacy=True, transformers 5
    takes False. For a prompt without special tokens written in it the two agree, and
    minillama (SentencePiece with BOS, as Meta's generate encodes) agrees with both."""
    from minillama.tokenizers import load_tokenizer
    hf = transformers.LlamaTokenizer.from_pretrained(
        tokenizer_dir, **({} if legacy is None else {"legacy": legacy}))
    mine = load_tokenizer(tokenizer_dir / "tokenizer.model")
    ids = mine.encode(SEED_PROMPT, bos=True, eos=False)
    assert ids == hf(SEED_PROMPT).input_ids
    assert ids[0] == 1 and 13 in ids                          # BOS, and "\n" as <0x0A>
    assert mine.decode(ids) == hf.decode(ids, skip_special_tokens=True) == SEED_PROMPT


# ----------------------------------------------------------------------------
# the seed's run, with minillama's flags, on an OpenLLaMA-shaped model of the tokenizer's size

def test_seed_run_matches_transformers_generate(tmp_path, capsys):
    """`minillama complete --ckpt_dir DIR --prompt $'Q: ...\\nA:' --max_gen_len 32
    --temperature 0 --dtype float16` and its Llama.build equivalent give the tokens of the
    seed's `model.generate(input_ids, max_new_tokens=32)` (greedy, stopping at EOS)."""
    shared = require_shared()
    from minillama.cli import main
    from minillama.generation import Llama
    config = {**OPEN_LLAMA_TINY, "vocab_size": 32000, "max_position_embeddings": 2048}
    reference, stored = open_llama(config, seed=9)
    save_bin(stored, tmp_path, config=config)
    os.symlink(shared / "models" / "tokenizer.model", tmp_path / "tokenizer.model")

    generator = Llama.build(str(tmp_path), max_seq_len=128, max_batch_size=4, dtype="float16")
    prompt = generator.tokenizer.encode(SEED_PROMPT, bos=True, eos=False)
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                 pad_token_id=0)[0, len(prompt):].tolist()
    want = out[:out.index(2)] if 2 in out else out                    # Meta's cut at EOS
    got = generator.generate([prompt], max_gen_len=32, temperature=0)[0][0]
    assert got == want
    assert main(["complete", "--ckpt_dir", str(tmp_path), "--prompt", SEED_PROMPT,
                 "--max_gen_len", "32", "--temperature", "0", "--dtype", "float16"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{SEED_PROMPT}\n> {generator.tokenizer.decode(want)}\n")


# ----------------------------------------------------------------------------
# on the GPU: the generic path, the fused decoder, and its CUDA graphs

@gpu
@pytest.mark.parametrize("mode", ["generic", "fused", "fused+graphs"])
def test_logits_and_greedy_match_transformers_on_the_gpu(cp, saved, mode):
    from minillama.cuda import CudaOps
    from minillama.cuda.fused import FusedDecoder
    folder, reference, name = saved
    ops = CudaOps(fused_decode=mode != "generic", graphs=mode == "fused+graphs")
    ckpt = open_checkpoint(folder, max_seq_len=40, max_batch_size=2, device="cuda")
    model = Transformer(ckpt.params, ckpt.weights, ops)
    assert FusedDecoder.covers(model)                         # head_dim 100 included
    tokens = np.random.default_rng(3).integers(0, 71, size=(2, 13))
    assert max_rel_err(to_host(model.forward(tokens, 0)), hf_logits(reference, tokens)) < 1e-4
    model = Transformer(ckpt.params, ckpt.weights, ops)
    forward = ops.decoder(model)
    prompt = [1, 30, 7, 64]
    assert greedy(lambda t, pos: to_host(forward(t, pos)), prompt, 24) == \
        hf_greedy(reference, prompt, 24)
    # the fused steps' logits, not only their argmax, against transformers
    ids = [1, 30, 7, 64] + hf_greedy(reference, prompt, 6)
    forward(np.array([ids[:4]]), 0)
    want = hf_logits(reference, [ids])[0]
    for pos in range(4, len(ids)):
        got = to_host(forward(np.array([[ids[pos]]]), pos))[0, -1]
        assert max_rel_err(got, want[pos]) < 1e-4, f"position {pos}"


@gpu
@pytest.mark.parametrize("dtype", [None, "float32"])
def test_batched_decode_matches_transformers_on_the_gpu(cp, saved, dtype):
    """Two rows a step, through the decoder the backend picks for the model: the weights as
    the file stores them (float16 for OpenLLaMA), or expanded to float32."""
    from minillama.cuda import CudaOps
    folder, reference, _ = saved
    ops = CudaOps()
    ckpt = open_checkpoint(folder, max_seq_len=40, max_batch_size=2, dtype=dtype, device="cuda")
    model = Transformer(ckpt.params, ckpt.weights, ops)
    forward = ops.decoder(model)
    ids = np.random.default_rng(5).integers(0, 71, size=(2, 12))
    want = hf_logits(reference, ids)                          # (2, 12, vocab)
    forward(ids[:, :4], 0)
    for pos in range(4, ids.shape[1]):
        got = to_host(forward(ids[:, pos:pos + 1], pos))[:, -1]
        assert max_rel_err(got, want[:, pos]) < 1e-4, f"position {pos}"
