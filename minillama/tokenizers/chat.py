"""Chat formats: how a conversation becomes the text a chat model was trained on.

A tokenizer carries one, `tokenizer.chat`, chosen when the tokenizer is loaded (chat_format): the
model's own chat template when it has one (a GGUF's `tokenizer.chat_template`, a Hugging Face
directory's chat_template.jinja or tokenizer_config.json; see template.py), else Llama 2's [INST]
format. Each format gives the two chat loops what they need:

    encode_dialog(tokenizer, dialog) -> ids        a whole dialog ending in a user message, for
                                                   Meta's chat_completion (generation.py)
    next_turn(tokenizer, dialog, fed) -> Turn      what llama2.c's chat loop (run.py) feeds next,
                                                   when the ids `fed` are already in the KV cache
"""
import os
import re
from typing import List, NamedTuple

from ..errors import ArgumentError, TokenizerError
from .template import ChatTemplate, read_hf_template

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"


class Turn(NamedTuple):
    """The next user turn of a chat: keep the first `keep` ids already fed (the KV cache is
    valid up to there), then feed `ids`. `text` is what the format rendered, for display."""
    keep: int
    ids: List[int]
    text: str


def resume(ids, fed, text):
    """The turn that feeds the dialog's ids after the longest prefix the KV cache already holds
    (`fed`); at least one id is fed, since its logits give the reply."""
    keep = 0
    while keep < min(len(fed), len(ids) - 1) and fed[keep] == ids[keep]:
        keep += 1
    return Turn(keep, ids[keep:], text)


class ChatFormat:
    """What every chat format answers. next_turn here is llama2.c's: whatever was fed stays, and
    the last user message is rendered on its own (render_turn), the system prompt into the
    first turn only."""

    def render_turn(self, system, user, first_turn):
        raise NotImplementedError

    def encode_dialog(self, tokenizer, dialog):
        raise NotImplementedError

    def next_turn(self, tokenizer, dialog, fed):
        system = dialog[0]["content"] if dialog[0]["role"] == "system" else ""
        text = self.render_turn(system, dialog[-1]["content"], first_turn=not fed)
        return Turn(len(fed), tokenizer.encode(text, bos=True, eos=False), text)


class Llama2Chat(ChatFormat):
    """Llama 2's format: a user message inside [INST] ... [/INST], the system prompt inside
    <<SYS>> tags at the start of the first user message; each exchange is BOS ... EOS."""

    @staticmethod
    def instruction(text):
        return f"{B_INST} {text} {E_INST}"

    @staticmethod
    def with_system(system, user):
        """The first user message with the system prompt in front of it."""
        return B_SYS + system + E_SYS + user

    def render_turn(self, system, user, first_turn):
        """One turn of llama2.c's chat: the system prompt, if any, goes into the first only."""
        return self.instruction(self.with_system(system, user) if first_turn and system else user)

    def encode_dialog(self, tokenizer, dialog):
        """As Meta's chat_completion builds it: the system message merged into the first user
        message, each (user, assistant) exchange encoded between BOS and EOS, then the last
        user message after a BOS."""
        if dialog and dialog[0]["role"] == "system":
            if len(dialog) < 2:
                raise ArgumentError("dialog: a system message must be followed by a user message")
            dialog = [{"role": dialog[1]["role"],
                       "content": self.with_system(dialog[0]["content"], dialog[1]["content"])}
                      ] + dialog[2:]
        roles_ok = (all(m["role"] == "user" for m in dialog[::2])
                    and all(m["role"] == "assistant" for m in dialog[1::2]))
        if not dialog or not roles_ok or dialog[-1]["role"] != "user":
            raise ArgumentError("dialog: roles must be 'system' (optional), then alternate "
                                "'user' and 'assistant', ending with 'user'")
        dialog_tokens = sum([tokenizer.encode(
            f"{self.instruction(prompt['content'].strip())} {answer['content'].strip()} ",
            bos=True, eos=True) for prompt, answer in zip(dialog[::2], dialog[1::2])], [])
        dialog_tokens += tokenizer.encode(self.instruction(dialog[-1]["content"].strip()),
                                          bos=True, eos=False)
        return dialog_tokens


class TemplateChat(ChatFormat):
    """The model's own chat template (template.py), rendered as transformers' apply_chat_template
    renders it and encoded as it encodes it: with add_special_tokens=False (a template writes its
    own BOS, if the model wants one), the special tokens the template writes as text
    (<|im_start|>, <s>, </s>) becoming their ids. A template's default system message (SmolLM2
    has one) is there whenever the dialog brings none."""

    def __init__(self, template: ChatTemplate):
        self.template = template

    def __repr__(self):
        return f"TemplateChat({self.template.source!r})"

    def render(self, tokenizer, dialog):
        """The template's text for `dialog`, ending where the assistant's reply begins."""
        check_dialog(dialog)
        return self.template.render(dialog, add_generation_prompt=True,
                                    **special_token_texts(tokenizer))

    def encode_dialog(self, tokenizer, dialog):
        return encode_rendered(tokenizer, self.render(tokenizer, dialog))

    def next_turn(self, tokenizer, dialog, fed):
        """The whole dialog rendered again, as transformers would render it, and fed from the
        first id that differs from what the KV cache holds: usually all of it is kept (the
        model's reply and its EOS are what the template writes too), but a template may write
        the reply differently (trimmed, say), and then the cache is rewound to where it does."""
        text = self.render(tokenizer, dialog)
        ids = encode_rendered(tokenizer, text)
        if not ids:
            raise TokenizerError(f"{self.template.source}: the chat template rendered an empty "
                                 f"prompt")
        return resume(ids, fed, text)


class Llama3Chat(ChatFormat):
    """Llama 3's format, as Meta's ChatFormat (llama_models) writes it: after
    <|begin_of_text|>, each message is a header, its content and <|eot_id|>,

        <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>

    and the assistant's reply follows an assistant header. The tags are special tokens; the
    model ends its reply with <|eot_id|>, one of the tokenizer's stop_tokens. Tool calls
    (role 'ipython', <|python_tag|>, <|eom_id|>) are not supported."""

    @staticmethod
    def header(role):
        return f"{START_HEADER}{role}{END_HEADER}\n\n"

    def message(self, role, content):
        return self.header(role) + content + EOT

    def render_turn(self, system, user, first_turn):
        """One turn of llama2.c's chat, ending where the assistant's reply begins. The loop feeds
        back the <|eot_id|> that ended the last reply, so a later turn starts with a header."""
        text = self.message("system", system) if first_turn and system else ""
        return text + self.message("user", user) + self.header("assistant")

    def encode_dialog(self, tokenizer, dialog):
        """As Meta's ChatFormat.encode_dialog_prompt: BOS, every message, an assistant header.
        Headers and <|eot_id|> are the special tokens themselves; a message's text is encoded
        as plain text (encode_ordinary, as Meta's encode does), so a tag typed into a message
        stays text."""
        if not dialog or dialog[-1]["role"] != "user":
            raise ArgumentError("dialog: expected 'system', 'user' and 'assistant' messages, "
                                "ending with a 'user' message")
        special = {tag: _special_id(tokenizer, tag) for tag in (START_HEADER, END_HEADER, EOT)}

        def header(role):
            return [special[START_HEADER], *tokenizer.encode_ordinary(role),
                    special[END_HEADER], *tokenizer.encode_ordinary("\n\n")]
        ids = [tokenizer.bos_id]
        for m in dialog:
            ids += header(m["role"]) + tokenizer.encode_ordinary(m["content"]) + [special[EOT]]
        return ids + header("assistant")

    def next_turn(self, tokenizer, dialog, fed):
        """The whole dialog encoded again (one BOS, at the start) and fed from the first id that
        differs from what the KV cache holds: ChatFormat's turn by turn would put a BOS before
        every turn."""
        ids = self.encode_dialog(tokenizer, dialog)
        return resume(ids, fed, tokenizer.decode(ids))


def _special_id(tokenizer, tag):
    """The id of special token `tag`, which the tokenizer must encode as one token."""
    ids = tokenizer.encode(tag, bos=False, eos=False)
    if len(ids) != 1:
        raise ArgumentError(f"tokenizer {tokenizer.path} has no special token {tag}, which "
                            f"Llama 3's chat format needs")
    return ids[0]


def check_dialog(dialog):
    if not dialog or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                             and isinstance(m.get("content"), str) for m in dialog) \
            or dialog[-1]["role"] != "user":
        raise ArgumentError("dialog: expected messages with string 'role' and 'content', "
                            "ending with a 'user' message")


def special_token_texts(tokenizer):
    """The special tokens a template may write, as text: bos_token, eos_token ... (those the
    tokenizer has), as transformers passes its special_tokens_map."""
    ids = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id,
           "unk_token": tokenizer.unk_id, "pad_token": tokenizer.pad_id}
    return {name: tokenizer.piece(i) for name, i in ids.items() if i >= 0}


def encode_rendered(tokenizer, text):
    """The ids of a rendered template. The control tokens written in it as text become their
    own ids; the text between them is encoded without BOS or EOS. (Byte-level BPE cuts its
    special tokens out by itself; a SentencePiece-style encoder would spell "<s>" letter by
    letter.)"""
    specials = {tokenizer.piece(i): i for i in sorted(tokenizer.control_ids)}
    specials.pop("", None)
    ids, pos = [], 0

    def encode(piece):                  # text between special tokens
        if pos == 0 or tokenizer.prefix_after_special:
            return tokenizer.encode(piece, bos=False, eos=False)
        return tokenizer.encode(piece, bos=False, eos=False, dummy_prefix=False)
    if specials:
        pattern = "|".join(map(re.escape, sorted(specials, key=len, reverse=True)))
        for m in re.finditer(pattern, text):
            if m.start() > pos:
                ids += encode(text[pos:m.start()])
            ids.append(specials[m.group()])
            pos = m.end()
    if pos < len(text):
        ids += encode(text[pos:])
    return ids


def chat_format(template, source="chat template"):
    """The format of a model whose chat template (Jinja text, or None) was read from `source`
    (named in errors, e.g. "model.gguf: tokenizer.chat_template"): the template when there is
    one, else Llama 2's [INST] format."""
    if isinstance(template, str) and template.strip():
        return TemplateChat(ChatTemplate(template, source))
    return Llama2Chat()


def chat_beside(tokenizer_path):
    """The chat format for a tokenizer file in a Hugging Face model directory: the directory's
    chat template (chat_template.jinja or tokenizer_config.json) if it has one, else Llama 2's."""
    template = read_hf_template(os.path.dirname(os.path.abspath(tokenizer_path)))
    return TemplateChat(template) if template is not None else Llama2Chat()
