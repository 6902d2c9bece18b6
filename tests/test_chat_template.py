"""Chat templates rendered as transformers renders them (tokenizers/template.py, chat.py), the chat
loop and `tokenize --chat` built on them, and the chat sampling defaults (chat_defaults.py).

The oracle is transformers itself: its renderer (render_jinja_template) on the same templates, and
its apply_chat_template on SmolLM2's GGUF (the tokenizer built from the file, offline) and on
Hugging Face directories written here around Llama 2's tokenizer.model."""
import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from minillama.chat_defaults import LLAMA2C, chat_sampling
from minillama.download import DEFAULT_MODEL, MODELS as REGISTRY, cache_dir
from minillama.errors import CheckpointError, TokenizerError
from minillama.model import ModelArgs
from minillama.checkpoints.random import random_weights
from minillama.tokenizers import Llama2Chat, TemplateChat, load_tokenizer
from minillama.tokenizers.template import ChatTemplate, read_hf_template

from conftest import MODELS, require_shared
from tests.tools.writers import gpt2_tokens, gpt2_vocab, write_gguf

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")       # everything here is read from local files

QUESTION = "What is the largest animal?"
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Llama 2 chat's template as Meta's Hugging Face repository ships it
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}"
          "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
          "{% for message in loop_messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate "
          "user/assistant/user/assistant/...') }}"
          "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + "
          "message['content'] %}"
          "{% else %}{% set content = message['content'] %}{% endif %}"
          "{% if message['role'] == 'user' %}"
          "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
          "{% endif %}{% endfor %}")
# Zephyr's (TinyLlama-Chat's): EOS written as text after every message
ZEPHYR = ("{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
          "{{ '<|user|>\\n' + message['content'] + eos_token }}\n"
          "{% elif message['role'] == 'system' %}\n"
          "{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
          "{% elif message['role'] == 'assistant' %}\n"
          "{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
          "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n"
          "{% endif %}\n{% endfor %}")
# the features templates use, each once: whitespace control, loop controls, namespace, tojson,
# dict, strftime_now, {% generation %}, filters
FEATURES = """{%- set ns = namespace(n=0, sys=none) -%}
{% for m in messages %}
    {% if m.role == 'system' %}{% set ns.sys = m.content %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    <{{ m.role }} n="{{ ns.n }}">{{ m.content | trim }}</{{ m.role }}>
    {% if m.role == 'assistant' %}
        {% generation %}[{{ m.content | length }}]{% endgeneration %}
    {% endif %}
    {% if ns.n > 4 %}{% break %}{% endif %}
{% endfor %}
{{ dict(system=ns.sys, count=ns.n, tag="<b>&</b>", name="日本") | tojson }}
{{ strftime_now("%Y") }}{{ bos_token }}{{ eos_token }}
{%- if add_generation_prompt %}
<assistant>
{%- endif %}"""

DIALOGS = {
    "one turn": [{"role": "user", "content": QUESTION}],
    "one turn, system": [{"role": "system", "content": "Answer in one sentence."},
                         {"role": "user", "content": QUESTION}],
    "three turns": [{"role": "user", "content": "Hi there!"},
                    {"role": "assistant", "content": "Hello! How can I help you today?"},
                    {"role": "user", "content": QUESTION},
                    {"role": "assistant", "content": " The blue whale. "},
                    {"role": "user", "content": "And on land?  "}],
    "three turns, system": [{"role": "system", "content": "You are terse. Très terse: 日本."},
                            {"role": "user", "content": "Hi there!"},
                            {"role": "assistant", "content": "Hello!"},
                            {"role": "user", "content": QUESTION},
                            {"role": "assistant", "content": "The blue whale."},
                            {"role": "user", "content": "And on land?"}],
}
SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def hf_render(template, dialog, add_generation_prompt=True, **special_tokens):
    from transformers.utils.chat_template_utils import render_jinja_template
    rendered, _ = render_jinja_template(conversations=[dialog], chat_template=template,
                                        add_generation_prompt=add_generation_prompt,
                                        **special_tokens)
    return rendered[0]


def hf_ids(hf_tokenizer, dialog):
    out = hf_tokenizer.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# ----------------------------------------------------------------------------
# the renderer against transformers'

@pytest.mark.parametrize("template", [CHATML, LLAMA2, ZEPHYR, FEATURES],
                         ids=["chatml", "llama2", "zephyr", "features"])
@pytest.mark.parametrize("name", list(DIALOGS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_what_transformers_renders(template, name, add_generation_prompt):
    dialog = DIALOGS[name]
    ours = ChatTemplate(template, "test").render(dialog, add_generation_prompt, **SPECIALS)
    assert ours == hf_render(template, dialog, add_generation_prompt, **SPECIALS)


def test_tojson_is_plain_json_and_generation_renders_its_body():
    text = ChatTemplate(FEATURES, "test").render(DIALOGS["three turns, system"], **SPECIALS)
    assert '"tag": "<b>&</b>", "name": "日本"' in text            # not HTML-escaped, not \u
    assert "[15]" in text and "<assistant>" in text


# ----------------------------------------------------------------------------
# errors: the template's source and line, and nothing run but the template

def test_a_template_that_does_not_compile_names_its_source_and_line():
    template = ChatTemplate("{% for m in messages %}\n{{ m.content }\n{% endfor %}", "model.gguf: "
                            "tokenizer.chat_template")
    with pytest.raises(TokenizerError, match=r"^model\.gguf: tokenizer\.chat_template, line 2: "
                                             r"the chat template is not valid Jinja"):
        template.render(DIALOGS["one turn"])


def test_raise_exception_names_the_source_and_line():
    template = ChatTemplate(LLAMA2.replace("{% for message", "\n\n{% for message"), "cfg.json")
    dialog = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(TokenizerError, match=r"^cfg\.json, line 3: the chat template failed: "
                                             r"TemplateError: Conversation roles must alternate"):
        template.render(dialog, **SPECIALS)


@pytest.mark.parametrize("text", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('echo pwned').read() }}",
    "{{ messages.append(1) }}",                         # the immutable sandbox: no changes
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{{ raise_exception.__globals__['os'] }}",
    "{{ range(10**9) | list | length }}",
])
def test_the_sandbox_runs_nothing_but_the_template(text):
    with pytest.raises(TokenizerError, match=r"^evil, line 1: the chat template failed: "
                                             r"(SecurityError|OverflowError|UndefinedError)"):
        ChatTemplate(text, "evil").render(DIALOGS["one turn"])


@pytest.mark.parametrize("text,match", [
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
     r"^deep, line 1: the chat template failed: RecursionError"),
    ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",     # jinja2's parser recurses per (
     r"^deep: the chat template is nested too deeply to compile \(RecursionError\)$"),
])
def test_a_template_recursing_too_deeply_names_its_source(text, match):
    with pytest.raises(TokenizerError, match=match):
        ChatTemplate(text, "deep").render(DIALOGS["one turn"])


DOUBLING = ("{% set ns = namespace(s='x') %}{% for i in range(24) %}{% set ns.s = ns.s + ns.s %}"
            "{% endfor %}{{ ns.s | length }}")


@pytest.mark.parametrize("text,match", [
    ("{{ 'x' * 100000000 }}", r"line 1: the chat template failed: SecurityError: '\*' would "
                              r"build a string or list of 100,000,000 \(at most 4,194,304\)"),
    ("{{ ([0] * 10**8) | length }}", r"SecurityError: '\*' would build"),
    (DOUBLING, r"SecurityError: '\+' would build a string or list of 8,388,608"),
    ("{% for i in range(3000) %}{{ 'x' * 3000 }}{% endfor %}",
     r"^huge: the chat template rendered more than 4,194,304 characters$"),
])
def test_a_template_building_a_huge_text_is_refused_at_once(text, match):
    """Refused as the text is built (`*`, `+`) or written, before it fills the memory: these
    took seconds (`'x' * 10**9` minutes and GBs) and only then met the prompt's length check."""
    start = time.perf_counter()
    with pytest.raises(TokenizerError, match=match):
        ChatTemplate(text, "huge").render(DIALOGS["one turn"])
    assert time.perf_counter() - start < 0.5


def test_hf_directory_templates(tmp_path):
    """chat_template.jinja first, else tokenizer_config.json's string, or its list of named
    templates (the one named "default"), as transformers reads a directory."""
    assert read_hf_template(tmp_path) is None
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"bos_token": "<s>"}))
    assert read_hf_template(tmp_path) is None
    config.write_text(json.dumps({"chat_template": CHATML}))
    assert read_hf_template(tmp_path).text == CHATML
    config.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "x"},
                                                    {"name": "default", "template": ZEPHYR}]}))
    found = read_hf_template(tmp_path)
    assert found.text == ZEPHYR and "named 'default'" in found.source
    config.write_text(json.dumps({"chat_template": [{"name": "rag", "template": "x"}]}))
    with pytest.raises(TokenizerError, match="without one named 'default' \\(names: rag\\)"):
        read_hf_template(tmp_path)
    config.write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: not a readable JSON"):
        read_hf_template(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(LLAMA2)
    assert read_hf_template(tmp_path).text == LLAMA2


# ----------------------------------------------------------------------------
# SmolLM2: the ids transformers' apply_chat_template gives, default system message included

@pytest.fixture(scope="module")
def smollm2_path():
    path = cache_dir() / REGISTRY[DEFAULT_MODEL][0]
    if not path.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"SmolLM2 is not in {cache_dir()} (CI downloads it first)")
        pytest.skip(f"SmolLM2 is not in {cache_dir()}: python -m minillama download")
    return path


@pytest.fixture(scope="module")
def smollm2_tokenizers(smollm2_path):
    hf = transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent),
                                                    gguf_file=smollm2_path.name)
    return load_tokenizer(smollm2_path), hf


@pytest.mark.parametrize("name", list(DIALOGS))
def test_smollm2_prompt_ids_equal_transformers(smollm2_tokenizers, name):
    ours, hf = smollm2_tokenizers
    dialog = DIALOGS[name]
    assert isinstance(ours.chat, TemplateChat)
    assert ours.chat.render(ours, dialog) == hf.apply_chat_template(
        dialog, add_generation_prompt=True, tokenize=False)
    assert ours.chat.encode_dialog(ours, dialog) == hf_ids(hf, dialog)
    if dialog[0]["role"] != "system":           # SmolLM2's template brings its own
        assert ours.chat.render(ours, dialog).startswith(
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_smollm2_chat_turns_feed_what_transformers_renders(smollm2_tokenizers):
    """The chat loop's turns, one after the other: the ids in the KV cache after each turn are
    transformers' ids for the dialog so far (the model's reply ends with its EOS, <|im_end|>)."""
    ours, hf = smollm2_tokenizers
    dialog, fed = [], []
    for message in DIALOGS["three turns, system"]:
        dialog.append(message)
        if message["role"] == "assistant":
            fed += ours.encode(message["content"], bos=False, eos=False) + [ours.eos_id]
        elif message["role"] == "user":
            turn = ours.chat.next_turn(ours, dialog, fed)
            assert turn.keep == len(fed)                # nothing fed is taken back
            fed = fed[:turn.keep] + turn.ids
            assert fed == hf_ids(hf, dialog)


def test_tokenize_chat_prints_the_ids_and_the_text(smollm2_tokenizers, smollm2_path):
    ours, hf = smollm2_tokenizers
    for system in (None, "Answer in one sentence."):
        args = ["tokenize", "-z", str(smollm2_path), "--chat", QUESTION]
        dialog = [{"role": "user", "content": QUESTION}]
        if system:
            args += ["-y", system]
            dialog.insert(0, {"role": "system", "content": system})
        r = subprocess.run([sys.executable, "-m", "minillama", *args], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        ids, text = r.stdout.split("\n", 1)
        assert [int(i) for i in ids.split()] == hf_ids(hf, dialog)
        assert text == hf.apply_chat_template(dialog, add_generation_prompt=True, tokenize=False)


def test_tokenize_needs_a_text_or_chat():
    from minillama.cli import main
    for argv in (["tokenize", "-z", "x"], ["tokenize", "-z", "x", "text", "--chat", "hi"],
                 ["tokenize", "-z", "x", "text", "-y", "sys"]):
        err = io.StringIO()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "stderr", err)
            assert main(argv) == 2
        assert "minillama: error: " in err.getvalue()
        assert ("either a text or --chat" in err.getvalue() or "-y: a system prompt needs --chat"
                in err.getvalue())


# ----------------------------------------------------------------------------
# the test models' templates: a GGUF written here, Hugging Face directories around tokenizer.model

def chatml_vocab(w):
    """The small byte-level vocabulary of tests/tools/writers.py, with SmolLM2's real template."""
    gpt2_vocab(w, SMOLLM2_TEMPLATE, add_bos=False)


SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TINY = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=48,
                 vocab_size=len(gpt2_tokens()), max_seq_len=512)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    gguf = pytest.importorskip("gguf")
    path = tmp_path_factory.mktemp("gguf") / "tiny-chat.gguf"
    write_gguf(path, TINY, random_weights(TINY), gguf.GGMLQuantizationType.F32, chatml_vocab)
    return path


def test_tiny_gguf_template_ids_equal_transformers(tiny_gguf):
    ours = load_tokenizer(tiny_gguf)
    assert isinstance(ours.chat, TemplateChat)
    assert ours.chat.template.source == f"{tiny_gguf}: tokenizer.chat_template"
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_gguf.parent),
                                                    gguf_file=tiny_gguf.name)
    for dialog in DIALOGS.values():
        assert ours.chat.encode_dialog(ours, dialog) == hf_ids(hf, dialog)


@pytest.mark.parametrize("template", [LLAMA2, ZEPHYR], ids=["llama2", "zephyr"])
def test_llama_vocabulary_gguf_template_ids_equal_transformers(tmp_path, template):
    """A GGUF with a `llama` (SentencePiece-style) vocabulary renders its template too: <s> and
    </s> cut out of the text, the text after them encoded without the dummy prefix, as
    transformers encodes with the tokenizer it converts from the GGUF."""
    gguf = pytest.importorskip("gguf")
    require_shared()
    from minillama.tokenizers import Llama2cTokenizer
    from tests.tools.writers import llama_vocab
    p = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=48, vocab_size=32000,
                  max_seq_len=64)

    def vocab(w):
        llama_vocab(Llama2cTokenizer(MODELS / "tokenizer.bin"))(w)
        w.add_chat_template(template)
    path = tmp_path / "llama-vocab-chat.gguf"
    write_gguf(path, p, random_weights(p), gguf.GGMLQuantizationType.F32, vocab)
    ours = load_tokenizer(path)
    assert isinstance(ours.chat, TemplateChat)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for dialog in DIALOGS.values():
        assert ours.chat.encode_dialog(ours, dialog) == hf_ids(hf, dialog)


def hf_llama_dir(folder, config=None, jinja=None):
    """A Hugging Face tokenizer directory: Llama 2's tokenizer.model (legacy, as Llama 2's own
    tokenizer_config.json has it) and a chat template."""
    require_shared()
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(MODELS / "tokenizer.model", folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "legacy": True, "add_bos_token": True}, **(config or {}))))
    if jinja is not None:
        (folder / "chat_template.jinja").write_text(jinja)
    return folder


@pytest.mark.parametrize("form", ["string", "named list", "jinja file"])
@pytest.mark.parametrize("template", [LLAMA2, ZEPHYR], ids=["llama2", "zephyr"])
def test_hf_directory_template_ids_equal_transformers(tmp_path, form, template):
    config = {"string": {"chat_template": template},
              "named list": {"chat_template": [{"name": "default", "template": template},
                                               {"name": "rag", "template": "{{ 1/0 }}"}]},
              "jinja file": {}}[form]
    folder = hf_llama_dir(tmp_path / "hf", config, template if form == "jinja file" else None)
    ours = load_tokenizer(folder / "tokenizer.model")
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert isinstance(ours.chat, TemplateChat)
    for dialog in DIALOGS.values():
        assert ours.chat.encode_dialog(ours, dialog) == hf_ids(hf, dialog)


def test_llama2_template_gives_metas_own_ids(tmp_path):
    """Llama 2's Hugging Face template and Meta's chat_completion (Llama2Chat) agree."""
    ours = load_tokenizer(hf_llama_dir(tmp_path / "hf", {"chat_template": LLAMA2}) /
                          "tokenizer.model")
    for dialog in DIALOGS.values():
        dialog = [dict(m, content=m["content"].strip()) for m in dialog]
        assert ours.chat.encode_dialog(ours, dialog) == Llama2Chat().encode_dialog(ours, dialog)


def test_without_a_template_llama2s_format_stays(tmp_path):
    require_shared()
    for path in (MODELS / "tokenizer.model", MODELS / "tok512.bin"):
        assert isinstance(load_tokenizer(path).chat, Llama2Chat)


# ----------------------------------------------------------------------------
# the chat loop (run.py) with a template

class Replier:
    """A stand-in model: the next token is `answer[token]`, EOS for any other token; so after a
    prompt ending in "\n" it replies " the and" and then EOS."""
    class ops:
        @staticmethod
        def decoder(model):
            return model.forward

    def __init__(self, tok):
        self.params = argparse.Namespace(max_seq_len=400, vocab_size=tok.n_words)
        reply = tok.encode(" the and", bos=False, eos=False)
        newline = tok.encode("\n", bos=False, eos=False)
        self.answer = dict(zip(newline + reply, reply + [tok.eos_id]))
        self.eos = tok.eos_id

    def forward(self, tokens, pos):
        logits = np.zeros((1, 1, self.params.vocab_size), np.float32)
        logits[0, 0, self.answer.get(int(tokens[0, 0]), self.eos)] = 1.0
        return logits


def test_chat_loop_feeds_the_template_dialog(tiny_gguf):
    """Three turns through run.chat on the tiny GGUF: what the model has been fed when each
    user turn starts is the template's rendering of the dialog so far."""
    from minillama.run import chat
    from minillama.sampler import Llama2cSampler
    tok = load_tokenizer(tiny_gguf)
    turns, original = [], tok.chat.next_turn

    def next_turn(tokenizer, dialog, fed):
        turn = original(tokenizer, dialog, fed)
        turns.append((list(dialog), fed[:turn.keep] + turn.ids))
        return turn
    out = io.BytesIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tok.chat, "next_turn", next_turn)
        chat(Replier(tok), tok, Llama2cSampler(tok.n_words, 0.0), "hi", None, 400,
             inp=io.StringIO("and the\nin on\n"), out=out, ask_system=False)
    assert [len(dialog) for dialog, _ in turns] == [1, 3, 5]
    for dialog, fed in turns:
        assert fed == tok.chat.encode_dialog(tok, dialog)
    assert turns[-1][0][1] == {"role": "assistant", "content": " the and"}
    assert out.getvalue().startswith(b"Assistant:  the and\n")
    assert b"system prompt" not in out.getvalue()


# ----------------------------------------------------------------------------
# the chat sampling defaults

def test_chat_sampling_defaults(tmp_path, smollm2_path):
    assert (chat_sampling(smollm2_path).temperature, chat_sampling(smollm2_path).top_p) == \
        (0.2, 0.9)
    require_shared()
    assert chat_sampling(MODELS / "stories260K.bin") == LLAMA2C
    folder = tmp_path / "hf"
    folder.mkdir()
    assert chat_sampling(folder) == LLAMA2C
    config = folder / "generation_config.json"
    config.write_text(json.dumps({"bos_token_id": 1}))
    assert chat_sampling(folder) == LLAMA2C                 # sets no sampling
    config.write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    assert (chat_sampling(folder).temperature, chat_sampling(folder).top_p) == (0.6, 0.9)
    config.write_text(json.dumps({"temperature": 0.7}))
    assert (chat_sampling(folder).temperature, chat_sampling(folder).top_p) == (0.7, 1.0)
    config.write_text(json.dumps({"do_sample": False, "temperature": 0.7}))
    assert chat_sampling(folder).temperature == 0.0        # transformers decodes greedily
    config.write_text(json.dumps({"top_p": 1.5}))
    with pytest.raises(CheckpointError, match="generation_config.json: top_p is 1.5, expected"):
        chat_sampling(folder)


def test_gguf_sampling_metadata(tmp_path):
    gguf = pytest.importorskip("gguf")

    def vocab(w):
        chatml_vocab(w)
        w.add_float32("general.sampling.temp", 0.7)
        w.add_float32("general.sampling.top_p", 0.8)
    path = tmp_path / "m.gguf"
    write_gguf(path, TINY, random_weights(TINY), gguf.GGMLQuantizationType.F32, vocab)
    s = chat_sampling(path)
    assert (s.temperature, s.top_p) == (0.7, 0.8)
    assert s.source == f"{path}: general.sampling"
    from minillama.checkpoints.gguf import read_gguf
    assert chat_sampling(path, read_gguf(path)) == s      # from the header a reader has parsed


# the weights, the tokenizer and the chat sampling are all in a GGUF's header: starting a chat
# (or info, or complete) parses it once and hands it along (loading.Checkpoint.header)
GGUF_COMMANDS = {
    "run-chat": lambda path: ["run", path, "-m", "chat", "-i", QUESTION, "-n", "130"],
    "info": lambda path: ["info", path],
    "complete": lambda path: ["complete", "--ckpt_dir", path, "--prompt", QUESTION,
                              "--max_gen_len", "4"],
}


@pytest.mark.parametrize("command", list(GGUF_COMMANDS))
def test_a_gguf_header_is_parsed_once(tiny_gguf, monkeypatch, command):
    from minillama import cli
    from minillama.checkpoints import gguf
    parsed, parse = [], gguf._parse
    monkeypatch.setattr(gguf, "_parse", lambda path, buf: parsed.append(path) or parse(path, buf))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))            # the chat ends after one turn
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO()))
    assert cli.main(GGUF_COMMANDS[command](str(tiny_gguf))) == 0
    assert parsed == [str(tiny_gguf)]


def test_run_sampling_flags_win():
    from minillama.cli import build_parser, run_sampling
    require_shared()
    model = str(MODELS / "stories260K.bin")
    parse = build_parser().parse_args
    assert run_sampling(parse(["run", model]), model, "chat") == (1.0, 0.9)   # llama2.c's
    assert run_sampling(parse(["run", model, "-t", "0.5"]), model, "chat") == (0.5, 0.9)
    r = subprocess.run([sys.executable, "-m", "minillama", "run", "--help"],
                       capture_output=True, text=True, timeout=300)
    assert "0.2 for the default model" in " ".join(r.stdout.split())


def test_smollm2_defaults_in_info_and_run(smollm2_path):
    from minillama.cli import build_parser, run_sampling
    path = str(smollm2_path)
    args = build_parser().parse_args(["run", path])
    assert run_sampling(args, path, "chat") == (0.2, 0.9)
    assert run_sampling(args, path, "generate") == (1.0, 0.9)
    args = build_parser().parse_args(["run", path, "-t", "0", "-p", "0.5"])
    assert run_sampling(args, path, "chat") == (0.0, 0.5)
    r = subprocess.run([sys.executable, "-m", "minillama", "info", path], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "chat sampling   temperature 0.2, top-p 0.9 (SmolLM2-135M-Instruct's model card)" \
        in r.stdout


# ----------------------------------------------------------------------------
# `minillama run -i "What is the largest animal?"` with the default model

@pytest.mark.slow
def test_default_model_answers_without_asking_for_a_system_prompt(smollm2_tokenizers,
                                                                   smollm2_path, tmp_path):
    """No model, -i, stdin not a terminal: no "Enter system prompt", an answer; and what the
    model was fed is transformers' chat template of the question, default system message
    included (recorded in-process through the loop's one forward call, run.next_logits)."""
    ours, hf = smollm2_tokenizers
    prompt = hf_ids(hf, [{"role": "user", "content": QUESTION}])
    env = dict(os.environ, MINILLAMA_HOME=str(smollm2_path.parent))
    r = subprocess.run([sys.executable, "-m", "minillama", "run", "-i", QUESTION, "-t", "0",
                        "-n", str(len(prompt) + 6)], capture_output=True, timeout=600,
                       stdin=subprocess.DEVNULL, env=env)
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode()
    assert out.startswith("Assistant: The largest animal"), out
    assert "system prompt" not in out

    from minillama import cli, run
    fed = []
    real = run.next_logits

    def recording(forward, model, token, pos):
        fed[pos:] = [token]
        return real(forward, model, token, pos)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINILLAMA_HOME", str(smollm2_path.parent))
        mp.setattr(run, "next_logits", recording)
        mp.setattr(sys, "stdin", io.StringIO(""))
        mp.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO()))
        assert cli.main(["run", "-i", QUESTION, "-t", "0", "-n", str(len(prompt) + 1)]) == 0
    assert fed[:len(prompt)] == prompt
