"""Chat templates: the Jinja text a model's authors wrote to turn a conversation into the prompt
their model was trained on, rendered the way Hugging Face transformers' apply_chat_template
renders it, so minillama gives the model the same text, and so the same ids.

Where a template comes from (read_hf_template, and the GGUF reader's GGUFVocab):

    a GGUF file                  metadata `tokenizer.chat_template`
    a Hugging Face directory     chat_template.jinja, else tokenizer_config.json's `chat_template`:
                                 a string, or a list of {"name": ..., "template": ...} of which
                                 the one named "default" is used

How it is rendered (transformers' _compile_jinja_template and render_jinja_template):

    jinja2's ImmutableSandboxedEnvironment: a template reads what it is given and calls the
        helpers below, nothing else. Attributes starting with "_" are refused, so are the
        methods that change a list or dict in place: rendering never runs Python code.
        Its `*` and `+` refuse to build a string or list longer than MAX_RENDERED (Sandbox),
        and the output is counted as it is written; other ways to grow a string inside a
        template (`~` in a loop, `%` with a wide field, filters such as `center`) are bounded
        only by the memory, whose MemoryError is the template's failure like any other.
    trim_blocks, lstrip_blocks: a {% tag %}'s own line break and indentation are not output.
    {% break %} / {% continue %} (jinja2.ext.loopcontrols); {% generation %} marks the
        assistant's text for training and renders its body as it is.
    variables: messages, add_generation_prompt, tools and documents (None), and the
        tokenizer's special tokens as text: bos_token, eos_token, unk_token, pad_token.
    helpers: raise_exception(message), strftime_now(format), and a tojson filter that does
        not escape HTML (json.dumps(..., ensure_ascii=False)).

A template that does not compile, or fails while rendering (a raise_exception of its own, an
unsafe attribute, a type error, a macro calling itself for ever, more than MAX_RENDERED
characters), is a TokenizerError naming the template's source, and its line where jinja2 knows it.
"""
import json
import os
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import TokenizerError, shown


class ChatTemplate:
    """One chat template. `source` names where it was read, for error messages, e.g.
    "model.gguf: tokenizer.chat_template". Compiled on first use, so a model whose template is
    broken still loads and generates; only chatting with it fails."""

    def __init__(self, text, source):
        self.text, self.source = text, source
        self._compiled = None

    def __repr__(self):
        return f"ChatTemplate({self.source!r})"

    def render(self, messages, add_generation_prompt=True, **special_tokens):
        """The text of `messages` ([{"role": ..., "content": ...}, ...]); with
        add_generation_prompt, ending where the assistant's reply begins."""
        compiled = self.compile()
        try:
            chunks = compiled.generate(messages=messages, tools=None, documents=None,
                                       add_generation_prompt=add_generation_prompt,
                                       **special_tokens)
            return self.joined(chunks)
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError,
                AttributeError, ZeroDivisionError, OverflowError,
                RecursionError, MemoryError) as e:            # a macro calling itself for ever
            line = template_line(e.__traceback__)
            where = f", line {line}" if line else ""
            raise TokenizerError(f"{self.source}{where}: the chat template failed: "
                                 f"{type(e).__name__}: {shown(str(e), quote=False)}") from None

    def joined(self, chunks):
        """The rendered text, from the template's output as it is written: a template that
        writes more than MAX_RENDERED characters (a loop of loops) is stopped there, not after
        it has filled the memory."""
        text, size = [], 0
        for chunk in chunks:
            size += len(chunk)
            if size > MAX_RENDERED:
                raise TokenizerError(f"{self.source}: the chat template rendered more than "
                                     f"{MAX_RENDERED:,} characters")
            text.append(chunk)
        return "".join(text)

    def compile(self):
        if self._compiled is None:
            try:
                self._compiled = sandbox().from_string(self.text)
            except jinja2.TemplateSyntaxError as e:
                raise TokenizerError(f"{self.source}, line {e.lineno}: the chat template is not "
                                     f"valid Jinja: {shown(e.message, quote=False)}") from None
            except (RecursionError, MemoryError) as e:     # jinja2's parser recurses per ( or [
                raise TokenizerError(f"{self.source}: the chat template is nested too deeply "
                                     f"to compile ({type(e).__name__})") from None
        return self._compiled


def template_line(tb):
    """The template line a rendering error came from: jinja2 rewrites the traceback so that the
    template's own frames carry the file name "<template>" and the template's line numbers."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


# ----------------------------------------------------------------------------
# the environment, as transformers builds it

# The most text a template may render, or build as one string or list. A prompt has to fit
# the model's context: 128K tokens (Llama 3.1's) are about half a million characters of text,
# so 4M characters is far more than any prompt a model can take, and still a few MB that
# render and are refused in a fraction of a second (a template's `'x' * 10**8` took minutes
# and GBs before the prompt's length was ever checked).
MAX_RENDERED = 1 << 22


class Sandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, whose `*` and `+` refuse to build a string or list longer
    than MAX_RENDERED: one `'x' * 10**9` would fill the memory before any output is counted."""
    intercepted_binops = frozenset(("*", "+"))

    def call_binop(self, context, operator, left, right):
        size = result_size(operator, left, right)
        if size > MAX_RENDERED:
            raise jinja2.exceptions.SecurityError(f"{operator!r} would build a string or list "
                                                  f"of {size:,} (at most {MAX_RENDERED:,})")
        return super().call_binop(context, operator, left, right)


def result_size(operator, left, right):
    """The length of `left operator right` where it is a sequence repeated or joined (0 else),
    found without building it."""
    sequences = (str, list, tuple)
    if operator == "+":
        both = isinstance(left, sequences) and isinstance(right, sequences)
        return len(left) + len(right) if both else 0
    for seq, n in ((left, right), (right, left)):
        if isinstance(seq, sequences) and isinstance(n, int):
            return len(seq) * n
    return 0


def sandbox():
    """A sandboxed Jinja environment with transformers' settings, helpers and extensions."""
    env = Sandbox(trim_blocks=True, lstrip_blocks=True,
                  extensions=[jinja2.ext.loopcontrols, GenerationTag])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = make_dict
    env.globals["namespace"] = Namespace
    return env


def raise_exception(message):
    """What a template calls to refuse a conversation ("roles must alternate user/assistant")."""
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """jinja2's own tojson escapes <, > and & for HTML; chat templates want the plain JSON."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def strftime_now(format):
    """Today's date in a template ("Today Date: 29 Nov 2026", as Llama 3.1's writes it)."""
    return datetime.now().strftime(format)


def make_dict(*args, **kwargs):
    """dict(...) for templates: a plain function, so `dict.fromkeys` and the class itself are
    out of reach."""
    return dict(*args, **kwargs)


class Namespace(jinja2.utils.Namespace):
    """jinja2's namespace(), refusing attribute names that start with "_" (as transformers'
    TemplateNamespace does): `{% set ns.__x = ... %}` must not reach Python's internals."""

    def __init__(*args, **kwargs):          # jinja2's own signature trick: self is args[0]
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            Namespace.check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        Namespace.check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template cannot set the attribute "
                                                  f"{name!r} on a namespace")


class GenerationTag(jinja2.ext.Extension):
    """{% generation %} ... {% endgeneration %}: transformers uses it to find the assistant's
    text for training masks; in a prompt its body renders as it is, in a scope of its own."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


# ----------------------------------------------------------------------------
# a Hugging Face directory's template

def read_hf_template(folder):
    """The chat template of the Hugging Face model directory `folder`, or None if it has none:
    chat_template.jinja (how transformers saves one since 4.50), else tokenizer_config.json's
    `chat_template`."""
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        try:
            with open(jinja_path, encoding="utf-8") as f:
                return ChatTemplate(f.read(), jinja_path)
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{jinja_path}: cannot read the chat template ({e})") from None
    config_path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.isfile(config_path):
        return None
    try:
        with open(config_path, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        raise TokenizerError(f"{config_path}: not a readable JSON object ({e})") from None
    source = f"{config_path}: chat_template"
    if isinstance(template, list):          # named templates: transformers uses "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            names = shown(", ".join(map(str, named)), quote=False)
            raise TokenizerError(f"{source}: a list of named templates without one named "
                                 f"'default' (names: {names})")
        template, source = named["default"], f"{source} (the one named 'default')"
    if template is None:
        return None
    if not isinstance(template, str):
        raise TokenizerError(f"{source}: expected a string or a list of named templates, got "
                             f"{type(template).__name__}")
    return ChatTemplate(template, source)
