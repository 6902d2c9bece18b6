"""The command line: `minillama run|complete|info|tokenize ...` (also `python -m minillama`).

`run` takes llama2.c's flags and prints what llama2.c's `run` prints; `complete` is Meta's
example_text_completion.py without torchrun. Exit statuses (docs/troubleshooting.md):

    0    done (also when a reader of the output, e.g. `| head`, stops early)
    2    a mistake in the input or the environment: one line on stderr (a MiniLlamaError)
    1    the output could not be written (stdout on a full disk, /dev/full): one line; or a bug
         in minillama: a traceback and a request to report it
    130  interrupted (Ctrl-C)

Generated text printed to a terminal has its control characters taken out (terminal_text).
"""
import argparse
import codecs
import errno
import math
import os
import re
import sys
import traceback

from .errors import ArgumentError, MiniLlamaError, StreamError, check_tokenizer_path, shown

# Meta's example_text_completion.py prompts, used when `complete` is given none.
EXAMPLE_PROMPTS = [
    "I believe the meaning of life is",
    "Simply put, the theory of relativity states that ",
    "A brief message congratulating the team on the launch:\n\n        Hi everyone,\n\n"
    "        I just ",
    "Translate English to French:\n\n        sea otter => loutre de mer\n        peppermint => "
    "menthe poivrée\n        plush girafe => girafe peluche\n        cheese =>",
]


# ----------------------------------------------------------------------------
# argument types: each names the flag and the accepted range

def _number(kind, low=None, high=None, low_open=False):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {shown(text)}")
        if value != value or value in (float("inf"), float("-inf")) \
                or (low is not None and (value < low or (low_open and value == low))) \
                or (high is not None and value > high):
            bracket = "(" if low_open else "["
            raise argparse.ArgumentTypeError(
                f"expected a value in {bracket}{low if low is not None else '-inf'}, "
                f"{f'{high}]' if high is not None else 'inf)'}, got {shown(text, quote=False)}")
        return value
    return parse


positive_int = _number(int, 1)
seed_int = _number(int, 0, 2**64 - 1)          # what a 64-bit generator state can hold
non_negative_float = _number(float, 0.0)
probability = _number(float, 0.0, 1.0, low_open=True)


def add_device(p):
    from .checks import KV_DTYPES
    from .dtypes import WEIGHT_DTYPES
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the model runs (cuda needs CuPy and an NVIDIA GPU)")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, default=None,
                   help="weight storage: float32, float16 or bfloat16 (half the memory), int8 "
                        "(Q8_0 blocks, about a quarter) or q4_0 (4.5 bits a weight); default: "
                        "as the checkpoint stores them (on the CPU expanded to float32 when "
                        "that fits)")
    p.add_argument("--kv-dtype", dest="kv_dtype", choices=KV_DTYPES, default="float32",
                   help="the KV cache: float32, or float16 for half the memory (default "
                        "float32)")
    p.add_argument("--tensor-parallel", dest="tensor_parallel", type=positive_int, default=None,
                   metavar="N", help="split the model over N GPUs, one worker process each, "
                                     "joined by NCCL (Meta's layout; docs/parallel.md)")


def build_parser():
    from .download import DEFAULT_MODEL, MODELS, RECOMMENDED
    parser = argparse.ArgumentParser(prog="minillama", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="llama2.c's run: generate or chat with a model")
    run.add_argument("checkpoint", nargs="?",
                     help="model file (llama2.c .bin, .gguf, ...); default: SmolLM2-135M-Instruct "
                          "(downloaded on first use, then cached), in chat mode")
    chat_default = RECOMMENDED[MODELS[DEFAULT_MODEL][0]]
    run.add_argument("-t", dest="temperature", type=non_negative_float, default=None,
                     help="temperature in [0, inf), 0 = greedy (default 1.0, llama2.c's; in chat "
                          "mode the model's recommendation, if it has one: "
                          f"{chat_default.temperature} for the default model, or its "
                          "generation_config.json's, or a GGUF's general.sampling.temp)")
    run.add_argument("-p", dest="topp", type=probability, default=None,
                     help="top-p in (0, 1] (default 0.9; in chat mode the model's "
                          f"recommendation, if it has one: {chat_default.top_p} for the default "
                          "model)")
    run.add_argument("-s", dest="seed", type=seed_int, default=0,
                     help="random seed in [0, 2**64), 0 = from the time (default 0)")
    run.add_argument("-n", dest="steps", type=positive_int, default=256,
                     help="steps, prompt included (default 256, capped at seq_len)")
    run.add_argument("-i", dest="prompt", default=None, help="input prompt")
    run.add_argument("-z", dest="tokenizer", default=None, help="tokenizer file")
    run.add_argument("-m", dest="mode", choices=["generate", "chat"], default=None,
                     help="default: generate, or chat for the default model")
    run.add_argument("-y", dest="system_prompt", default=None,
                     help="system prompt (chat); without it, asked for when stdin is a terminal "
                          "(always with llama2.c's [INST] format, as run.c does)")
    run.add_argument("--exact", action="store_true",
                     help="compute in llama2.c's order of operations, so a sampled run is "
                          "run.c's token for token (slower; CPU only; always on for llama2.c's "
                          "int8 files, as runq)")
    add_device(run)

    comp = sub.add_parser("complete", help="Meta's text completion on a batch of prompts")
    comp.add_argument("--ckpt_dir", required=True, help="checkpoint file or model directory")
    comp.add_argument("--tokenizer_path", default=None, help="tokenizer file")
    comp.add_argument("--max_seq_len", type=positive_int, default=128)
    comp.add_argument("--max_batch_size", type=positive_int, default=4)
    comp.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    comp.add_argument("--prompts_file", default=None, help="a text file, one prompt per line")
    comp.add_argument("--temperature", type=non_negative_float, default=0.6)
    comp.add_argument("--top_p", type=probability, default=0.9)
    comp.add_argument("--max_gen_len", type=positive_int, default=64)
    comp.add_argument("--logprobs", action="store_true", help="print each token's log-prob")
    comp.add_argument("--echo", action="store_true", help="include the prompt in the output")
    comp.add_argument("--seed", type=seed_int, default=1, help="random seed in [0, 2**64)")
    add_device(comp)

    info = sub.add_parser("info", help="architecture, parameters and memory of a model")
    info.add_argument("checkpoint")
    info.add_argument("--max_seq_len", type=positive_int, default=None)
    info.add_argument("--max_batch_size", type=positive_int, default=1)
    add_device(info)

    tok = sub.add_parser("tokenize", help="show the token ids the model sees for a text")
    tok.add_argument("text", nargs="?", default=None)
    tok.add_argument("-z", dest="tokenizer", required=True,
                     help="tokenizer file (a GGUF model carries its own)")
    tok.add_argument("--pieces", action="store_true", help="also print each token's piece")
    tok.add_argument("--chat", metavar="MESSAGE", default=None,
                     help="instead of a text: the ids of a one-turn chat with this user message, "
                          "as `run` gives them to the model (the model's chat template, or Llama "
                          "2's [INST] format), then the rendered text")
    tok.add_argument("-y", dest="system_prompt", default=None,
                     help="system prompt of the --chat turn (default: none, or the template's own)")

    down = sub.add_parser("download", help="fetch a model into the cache ($MINILLAMA_HOME or "
                                           "~/.cache/minillama) and print its files' paths")
    down.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=list(MODELS),
                      metavar="NAME", help=f"one of: {', '.join(MODELS)} (default {DEFAULT_MODEL})")
    down.add_argument("--force", action="store_true", help="fetch again even if cached")
    return parser


# ----------------------------------------------------------------------------
# generated text on a terminal

# C0 controls but tab, newline and carriage return; DEL; C1 controls (U+0080..U+009F). A model's
# vocabulary may hold pieces with ESC sequences that would move the cursor or retitle a window.
CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def terminal_text(text):
    """`text` without control characters, for printing generated text to a terminal."""
    return CONTROLS.sub("", text)


class TerminalBytes:
    """A binary stream for generated text on a terminal: the UTF-8 bytes written to it, in
    pieces as they come, are decoded (a character split across pieces waits for its end; a
    byte that is not UTF-8 becomes U+FFFD, as a UTF-8 terminal would show it, never a lone
    0x9b that an 8-bit terminal takes for CSI) and written without control characters."""

    def __init__(self, raw):
        self.raw = raw
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def write(self, data):
        self.raw.write(terminal_text(self.decoder.decode(bytes(data))).encode("utf-8"))

    def flush(self):
        self.raw.flush()


def stdout_bytes():
    """Where generated text goes: stdout's bytes through TerminalBytes on a terminal; as they
    are into a pipe or a file (llama2.c's exact bytes)."""
    out = sys.stdout.buffer
    return TerminalBytes(out) if sys.stdout.isatty() else out


# ----------------------------------------------------------------------------
# commands

def find_tokenizer(checkpoint, given, carried=None):
    """-z if given; else a tokenizer the checkpoint carries; else tokenizer.bin beside it."""
    if check_tokenizer_path("-z", given):
        return given
    if carried:
        return carried
    beside = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "tokenizer.bin")
    if os.path.exists(beside):
        return beside
    raise ArgumentError(f"-z: no tokenizer given and none found for {checkpoint} "
                        f"(looked for {beside})")


def cmd_run(args):
    import time
    from .devices import get_ops
    from .exact import runs_runq
    from .loading import build_model, open_checkpoint
    from .run import chat, generate
    from .sampler import Llama2cSampler
    from .tokenizers import Llama2Chat, load_tokenizer
    checkpoint, mode = args.checkpoint, args.mode
    if checkpoint is None:                       # the default model: an instruct model, so chat
        from .download import model_path
        checkpoint, mode = str(model_path()), mode or "chat"
    mode = mode or "generate"
    if mode == "chat" and sys.stdin is None:
        raise StreamError("stdin is closed; chat reads the user's turns from it (give it a "
                          "terminal or a file, or use -m generate)")
    if args.tensor_parallel:                # the workers read the weights; here, the header
        from .loading import read_checkpoint
        ckpt = read_checkpoint(checkpoint)
    else:
        ops = get_ops(args.device)
        # run feeds one token per forward (the prompt too, as run.c does): plan for that
        ckpt = open_checkpoint(checkpoint, dtype=args.dtype, device=args.device, prompt_len=1,
                               kv_dtype=args.kv_dtype)
    tokenizer = load_tokenizer(find_tokenizer(checkpoint, args.tokenizer, ckpt.tokenizer_path),
                               vocab_size=ckpt.params.vocab_size, header=ckpt.header)
    if args.tensor_parallel:
        from .parallel.workers import start
        model = start(ckpt, args.tensor_parallel, args.dtype, args.kv_dtype, prompt_len=1)
    else:
        model = build_model(ckpt, ops, args.kv_dtype)
    if mode == "generate" and not tokenizer.encode(args.prompt or "", bos=True, eos=False):
        raise ArgumentError(f"-i: {checkpoint} has no BOS token to start from an empty "
                            f"prompt; give one with -i, or chat with -m chat")
    seed = args.seed if args.seed > 0 else int(time.time())     # llama2.c: 0 means the clock
    # llama2.c's int8 files are runq's: on the CPU, decoded in runq's order of operations
    exact = args.exact or (args.device == "cpu" and not args.tensor_parallel
                            and runs_runq(model))
    temperature, topp = run_sampling(args, checkpoint, mode, ckpt.header)
    sampler = Llama2cSampler(ckpt.params.vocab_size, temperature, topp, seed, exact)
    try:
        if mode == "generate":
            generate(model, tokenizer, sampler, args.prompt, args.steps, out=stdout_bytes(),
                     exact=exact)
        else:
            # run.c asks for a system prompt first; piped input holds only user turns, so ask
            # only a terminal, except in llama2.c's own format (its chat output stays run.c's)
            ask = sys.stdin.isatty() or isinstance(tokenizer.chat, Llama2Chat)
            chat(model, tokenizer, sampler, args.prompt, args.system_prompt, args.steps,
                 out=stdout_bytes(), ask_system=ask, exact=exact)
    finally:
        if args.tensor_parallel:
            model.close()


def run_sampling(args, checkpoint, mode, header=None):
    """(temperature, top-p): -t and -p when given; else in chat mode what the model recommends
    (chat_defaults.py; header: the checkpoint's, as its reader parsed it), and llama2.c's
    defaults otherwise."""
    from .chat_defaults import LLAMA2C, chat_sampling
    given = args.temperature is not None and args.topp is not None
    default = chat_sampling(checkpoint, header) if mode == "chat" and not given else LLAMA2C
    return (default.temperature if args.temperature is None else args.temperature,
            default.top_p if args.topp is None else args.topp)


def read_prompts(args):
    """The --prompt's and the --prompts_file's lines (blank ones skipped); Meta's examples only
    where neither option was given: a prompts file that holds none is a mistake to say, not a
    reason to complete four prompts nobody asked for."""
    if args.prompt is None and args.prompts_file is None:
        return EXAMPLE_PROMPTS
    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                lines = [line.rstrip("\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ArgumentError(f"--prompts_file: cannot read {args.prompts_file}: {e}")
        if not lines:
            raise ArgumentError(f"--prompts_file: {shown(args.prompts_file, quote=False)} holds "
                                f"no prompts (expected one a line; blank lines are skipped)")
        prompts += lines
    return prompts


def cmd_complete(args):
    from .generation import Llama
    prompts = read_prompts(args)
    if len(prompts) > args.max_batch_size:
        raise ArgumentError(f"--max_batch_size: {len(prompts)} prompts do not fit a batch of "
                            f"{args.max_batch_size}")
    generator = Llama.build(args.ckpt_dir, args.tokenizer_path, args.max_seq_len,
                            args.max_batch_size, device=args.device, seed=args.seed,
                            dtype=args.dtype, kv_dtype=args.kv_dtype,
                            tensor_parallel=args.tensor_parallel)
    try:
        results = generator.text_completion(prompts, temperature=args.temperature,
                                            top_p=args.top_p, max_gen_len=args.max_gen_len,
                                            logprobs=args.logprobs, echo=args.echo)
    finally:
        if args.tensor_parallel:
            generator.model.close()
    printable = terminal_text if sys.stdout.isatty() else str
    for prompt, result, cut in zip(prompts, results, generator.cut_at_max_seq_len):
        print(prompt)
        print(f"> {printable(result['generation'])}", flush=True)
        if cut:
            print(f"minillama: note: this completion stopped at max_seq_len "
                  f"({generator.model.params.max_seq_len} tokens, prompt included) before "
                  f"--max_gen_len {args.max_gen_len}; raise --max_seq_len for more", file=sys.stderr)
        if args.logprobs:
            for piece, lp in zip(result["tokens"], result["logprobs"]):
                print(f"  {piece!r:>16} {lp:9.4f}")
        print("\n==================================\n")


def describe(ckpt, max_seq_len, max_batch_size, kv_dtype="float32"):
    """Lines for `minillama info`."""
    from collections import Counter
    from .dtypes import Q8_GROUPS, source_format
    from .memory import fmt_bytes, kv_cache_bytes
    from .model import classifier_is_embedding, weight_shapes
    p = ckpt.params
    shapes = weight_shapes(p)
    tied = classifier_is_embedding(ckpt.weights)
    n_params = sum(math.prod(s) for name, s in shapes.items()
                   if not (tied and name == "output.weight"))
    stored = {id(w): w for w in ckpt.weights.values()}       # a tied array counts once
    weight_bytes = sum(w.nbytes for w in stored.values())
    kinds = Counter(source_format(w) for w in stored.values()).most_common()
    words = {Q8_GROUPS: "llama2.c's int8 groups"}
    seq = max_seq_len or p.max_seq_len
    kv_bytes = kv_cache_bytes(p, seq, max_batch_size, kv_dtype)
    return [
        f"file            {ckpt.path} ({ckpt.fmt})",
        *([f"weights from    {ckpt.source}"] if ckpt.source else []),
        f"architecture    llama: dim {p.dim}, {p.n_layers} layers, {p.n_heads} heads "
        f"({p.n_kv_heads} kv heads, head_dim {p.head_dim}), hidden_dim {p.hidden_dim}, "
        f"vocab {p.vocab_size}, rope theta {p.rope_theta:g}{rope_scaling_words(p)}, "
        f"norm eps {p.norm_eps:g}",
        f"classifier      {'shared with the embedding' if tied else 'separate'}",
        f"parameters      {n_params:,}",
        f"weights         {weight_bytes:,} bytes as stored ({fmt_bytes(weight_bytes)})",
        f"stored as       {', '.join(f'{words.get(f, f)} x {n}' for f, n in kinds)} (tensors "
        f"by format, in the file)",
        f"kv cache        {kv_bytes:,} bytes ({fmt_bytes(kv_bytes)}) for max_seq_len {seq} "
        f"x max_batch_size {max_batch_size} ({kv_dtype})",
    ]


def rope_scaling_words(p):
    """Llama 3's RoPE scaling, for info: the four numbers, or a GGUF's largest divisor."""
    s = p.rope_scaling
    if s is not None:
        return (f" (llama3 scaling: factor {s.factor:g}, low/high freq factors "
                f"{s.low_freq_factor:g}/{s.high_freq_factor:g}, original context "
                f"{s.original_max_position_embeddings})")
    if p.rope_freq_factors is not None:
        return f" (llama3 scaling: rope_freqs, slow pairs / {max(p.rope_freq_factors):g})"
    return ""


def cmd_info(args):
    from .loading import read_checkpoint
    from .memory import plan_checkpoint
    # read_checkpoint leaves the weights on disk where the format allows: info reads headers
    ckpt = read_checkpoint(args.checkpoint, args.max_seq_len, args.max_batch_size)
    print("\n".join(describe(ckpt, args.max_seq_len, args.max_batch_size, args.kv_dtype)))
    if args.tensor_parallel:            # every GPU holds equal slices: rank 0's plan is each one's
        from .parallel.loading import plan_rank, shard_checkpoint
        shard, weights = shard_checkpoint(ckpt, 0, args.tensor_parallel)
        print(plan_rank(ckpt.params, shard, weights, args.dtype, "cuda",
                        kv_dtype=args.kv_dtype).format())
        return
    print(plan_checkpoint(ckpt, args.dtype, args.device, kv_dtype=args.kv_dtype).format())
    print(chat_sampling_line(args.checkpoint, ckpt.header))


def chat_sampling_line(checkpoint, header=None):
    """The sampling `run -m chat` uses for this model without -t / -p, and where it comes from."""
    from .chat_defaults import chat_sampling
    s = chat_sampling(checkpoint, header)
    return f"chat sampling   temperature {s.temperature}, top-p {s.top_p} ({s.source})"


def cmd_tokenize(args):
    from .tokenizers import load_tokenizer
    if (args.text is None) == (args.chat is None):
        raise ArgumentError("tokenize: give either a text or --chat MESSAGE")
    if args.system_prompt is not None and args.chat is None:
        raise ArgumentError("-y: a system prompt needs --chat MESSAGE")
    tokenizer = load_tokenizer(check_tokenizer_path("-z", args.tokenizer))
    if args.chat is None:
        ids, text = tokenizer.encode(args.text, bos=True, eos=False), None
    else:           # the first turn of `minillama run -m chat`, exactly
        dialog = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
        dialog.append({"role": "user", "content": args.chat})
        turn = tokenizer.chat.next_turn(tokenizer, dialog, fed=[])
        ids, text = turn.ids, turn.text
    print(" ".join(str(i) for i in ids))
    if args.pieces:
        print(" ".join(f"{i}:{tokenizer.piece(i)!r}" for i in ids))
    if text is not None:
        print(text, end="" if text.endswith("\n") else "\n")


def cmd_download(args):
    from .download import download
    for path in download(args.name, force=args.force):
        print(path)


COMMANDS = {"run": cmd_run, "complete": cmd_complete, "info": cmd_info,
            "tokenize": cmd_tokenize, "download": cmd_download}


def say(line):
    """One line on stderr, if there is a stderr to write to."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (AttributeError, OSError, ValueError):       # stderr closed too: nowhere to say it
        pass


def silence_stdout():
    """Point stdout at /dev/null, so the interpreter's last flush at exit cannot fail again
    (what Python's documentation suggests for a broken pipe)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        pass


# errno values of a write that failed for a reason outside minillama (a full disk, /dev/full,
# a closed or vanished descriptor, a hardware error): one line and exit 1, not a bug report
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EBADF)


def main(argv=None):
    import numpy as np
    for stream in (sys.stdin, sys.stdout):
        # Bytes that are not UTF-8 (in argv, in chat input) arrive as surrogate escapes, as in
        # a C locale; in any locale they go to the tokenizer, and back out, as those bytes.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    args = build_parser().parse_args(argv)              # usage errors: argparse exits with 2
    try:
        if sys.stdout is None:                          # started with stdout closed (>&-)
            raise StreamError("stdout is closed; minillama writes its output there (redirect "
                              "it to a file or /dev/null instead)")
        # NumPy's warnings about NaN/inf would come before the one clear error that
        # check_finite gives (naming the layer), so they are not shown
        with np.errstate(all="ignore"):
            COMMANDS[args.command](args)
        sys.stdout.flush()                              # a full disk shows here, not at exit
    except MiniLlamaError as e:
        say(f"minillama: error: {e}")
        return 2
    except KeyboardInterrupt:
        say("\nminillama: interrupted")                 # end the half-printed line first
        return 130
    except BrokenPipeError:                               # e.g. `minillama run ... | head`
        sys.stderr.close()
        return 0
    except OSError as e:
        if e.errno not in WRITE_ERRORS or e.filename is not None:
            return internal_error()
        silence_stdout()
        say(f"minillama: error: cannot write the output ({e.strerror})")
        return 1
    except Exception:
        return internal_error()
    return 0


def internal_error():
    traceback.print_exc()
    say("minillama: internal error (a bug in minillama, not in your input); please report it "
        "with the lines above")
    return 1
