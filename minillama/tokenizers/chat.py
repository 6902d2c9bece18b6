"""Chat formats: how a conversation becomes the text a chat model was trained on.

A tokenizer carries one, `tokenizer.chat`, chosen when the tokenizer is loaded: Llama 2's [INST]
format, unless the file names another (a GGUF whose chat template is ChatML). Each format gives
the two chat loops what they need:

    render_turn(system, user, first_turn) -> str   one user turn, for llama2.c's chat (run.py)
    encode_dialog(tokenizer, dialog) -> ids        a whole dialog ending in a user message, for
                                                   Meta's chat_completion (generation.py)
"""
from ..errors import ArgumentError

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"


class Llama2Chat:
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


class ChatML:
    """ChatML, the format of SmolLM2 and many others: each message is
    <|im_start|>role\\ncontent<|im_end|>\\n, and the assistant's reply follows
    <|im_start|>assistant\\n. The tags are special tokens: the tokenizer must encode them whole
    (byte-level BPE does, from the GGUF's token types). The model ends its reply with
    <|im_end|>, its EOS."""

    @staticmethod
    def message(role, content):
        return f"{IM_START}{role}\n{content}{IM_END}\n"

    def render_turn(self, system, user, first_turn):
        """One turn of llama2.c's chat, ending where the assistant's reply begins. The loop feeds
        back the <|im_end|> that ended the last reply; a later turn starts with the newline that
        follows it. No system message is written when none is given (a template's built-in
        default, if it has one, is not inserted)."""
        text = self.message("system", system) if first_turn and system else ""
        text += self.message("user", user) + f"{IM_START}assistant\n"
        return text if first_turn else "\n" + text

    def encode_dialog(self, tokenizer, dialog):
        """As the ChatML template renders the dialog with add_generation_prompt."""
        if not dialog or not all(isinstance(m.get("role"), str)
                                 and isinstance(m.get("content"), str) for m in dialog) \
                or dialog[-1]["role"] != "user":
            raise ArgumentError("dialog: expected messages with string 'role' and 'content', "
                                "ending with a 'user' message")
        text = "".join(self.message(m["role"], m["content"]) for m in dialog)
        return tokenizer.encode(text + f"{IM_START}assistant\n", bos=True, eos=False)


class Llama3Chat:
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


def _special_id(tokenizer, tag):
    """The id of special token `tag`, which the tokenizer must encode as one token."""
    ids = tokenizer.encode(tag, bos=False, eos=False)
    if len(ids) != 1:
        raise ArgumentError(f"tokenizer {tokenizer.path} has no special token {tag}, which "
                            f"Llama 3's chat format needs")
    return ids[0]


def chat_format(template):
    """The format a chat template (a GGUF's `tokenizer.chat_template`, Jinja) writes: ChatML if
    it writes <|im_start|> tags, else (or with no template) Llama 2's."""
    if isinstance(template, str) and IM_START in template:
        return ChatML()
    return Llama2Chat()
