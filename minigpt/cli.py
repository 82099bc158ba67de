"""The `minigpt` command: `generate`, `chat`, `serve` and `export` over a model directory; `plots` of runs.

Design choices
- Plain argparse subcommands, one small function per command; `main(argv) -> int` so tests call it
  in-process and the console script (`minigpt = "minigpt.cli:main"`) exits with its return value.
- Bad input is the user's mistake, not a crash: every usage error (argparse's own included) is one
  line `error: ...` on stderr naming the flag, and exit code 2. Value ranges are checked by the
  argparse `type=` functions, so they fail before the model is loaded; checkpoint and tokenizer
  problems become the same one-line errors. Genuine bugs still raise with a traceback.
- torch and the model code are imported inside the commands: `minigpt --help` and argument
  errors answer at once instead of after a second of importing torch.
- The model directory says how to talk to it: `config.json` `chat_template` set (a fine-tuned
  model) -> the prompt is wrapped in the chat template (`minigpt.template`), unless `--raw`. Raw text
  (base models) starts after `<|endoftext|>`, the document separator the model saw in pretraining,
  so an empty prompt means "start a new document". Generation stops at `<|endoftext|>` either way.
- A chat model's output is only the response; a raw prompt is echoed and then continued, so the
  text reads as one document.
- Streaming decodes the whole generated id list at every token and prints the new suffix, holding
  back while the text ends in U+FFFD: a byte-level token can end in the middle of a multi-byte
  character. Replies are at most a few hundred tokens, so re-decoding costs nothing noticeable,
  and streamed output is byte-for-byte the non-streamed output.
- Untrusted text: a `--prompt` or chat line that is not valid UTF-8 (e.g. `$'\xff'`) is refused
  with one line, exit 2 (rather than guessed at with U+FFFD), naming the flag or stdin line.
  `--max_new_tokens` is capped at MAX_NEW_TOKENS (65536, 256 windows of the largest context
  trained here): a typo must not mean a run that never ends.
- `export` refuses an OUT_DIR that is, or is inside, the model directory (or contains it), and
  writes atomically (`minigpt.export`).
- `--seed` seeds one generator used for all samples of the run: samples differ from each other
  and the whole run is reproducible.
- `chat` keeps the conversation within the context: before each answer, while the encoded
  conversation plus `--max_new_tokens` exceeds `block_size`, the oldest user/assistant turn is
  dropped for good (the system message stays), and the user is told. The room kept for the answer
  is capped at half the context, so a large `--max_new_tokens` does not erase the history every
  turn (an answer that runs longer slides the sampler's window instead). Ctrl-C during an answer
  stops that answer (the partial text stays in the history, as the user saw it); Ctrl-D or
  `/quit` leaves; `/reset` starts over. Non-tty stdin is read line by line, without a prompt,
  so the chat can be scripted and tested. Notices go to stderr, answers to stdout.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:  # imported for real inside the commands (see the module docstring)
    import torch
    from tokenizers import Tokenizer

    from minigpt.model import GPT

DEFAULT_CHECKPOINT = "out/finetune"
HISTORY_FILE = Path("~/.minigpt_history")
QUIT_COMMANDS = ("/quit", "/exit")
MAX_NEW_TOKENS = 65536
CHAT_HELP = "commands: /reset (start over), /quit or Ctrl-D (leave), Ctrl-C (stop the answer)"


class CLIError(Exception):
    """A usage error: printed as one `error: ...` line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors raise CLIError (one line, exit 2) instead of printing usage and exiting.

    Subparsers are built with the parent's class, so this covers every subcommand."""

    def error(self, message: str):  # type: ignore[override]
        raise CLIError(message)


# --- argument types: range checks happen while parsing, before anything is loaded ---------------

def _float_in(name: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    """An argparse type: a float for which `ok` holds; argparse prefixes the flag to the message."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value != value or not ok(value):  # NaN passes no range check
            raise argparse.ArgumentTypeError(f"must be {name}, got {text}")
        return value

    return parse


def _int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        return value

    return parse


def _device(text: str) -> str:
    kind, _, index = text.partition(":")
    if text in ("auto", "cpu", "mps") or (kind == "cuda" and (not index or index.isdigit())):
        return text
    raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda, cuda:N or mps, got {text!r}")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint_path", default=DEFAULT_CHECKPOINT,
                   help=f"model directory (default: {DEFAULT_CHECKPOINT})")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by `generate` and `chat`."""
    _add_model_args(p)
    p.add_argument("--tokenizer_path", default=None,
                   help="tokenizer.json (default: the one in the model directory; must match its hash)")
    p.add_argument("--max_new_tokens", type=_int_at_least(1, MAX_NEW_TOKENS), default=200,
                   help=f"tokens to generate at most, 1..{MAX_NEW_TOKENS} (default: %(default)s)")
    p.add_argument("--temperature", type=_float_in(">= 0", lambda t: t >= 0), default=0.8,
                   help="sampling temperature; 0 = greedy (default: 0.8)")
    p.add_argument("--top_k", type=_int_at_least(0), default=50,
                   help="sample from the k most likely tokens; 0 = off (default: 50)")
    p.add_argument("--top_p", type=_float_in("in (0, 1]", lambda x: 0 < x <= 1), default=0.95,
                   help="nucleus sampling mass, in (0, 1]; 1 = off (default: 0.95)")
    p.add_argument("--repetition_penalty", type=_float_in("> 0", lambda x: x > 0), default=1.0,
                   help="divide the logits of tokens already in the context (CTRL); 1 = off")
    p.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    p.add_argument("--device", type=_device, default="auto",
                   help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="minigpt", description="Talk to and export minigpt models; plot their training runs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate text from a prompt",
                         description="Generate text from a prompt (instruction-tuned models get "
                                     "the chat template automatically).")
    gen.add_argument("--prompt", default="",
                     help="the prompt; may be empty for a base model (starts a new document)")
    _add_sampling_args(gen)
    gen.add_argument("--num_samples", type=_int_at_least(1), default=1,
                     help="independent samples to draw, decoded as one batch unless --stream "
                          "(default: 1)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    gen.add_argument("--raw", action="store_true",
                     help="send the prompt as plain text, even to an instruction-tuned model")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive multi-turn chat",
                          description=f"Chat with an instruction-tuned model. {CHAT_HELP}.")
    _add_sampling_args(chat)
    chat.set_defaults(max_new_tokens=128)  # answers are shorter; leaves room for the history
    chat.add_argument("--system", default=None, help="an optional system message, kept on /reset")
    chat.set_defaults(func=cmd_chat)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a chat page",
                         description="Serve the model over an OpenAI-compatible API "
                                     "(/v1/chat/completions, /v1/completions, /v1/models, /health) "
                                     "and a chat page at /. Needs the `serve` extra.")
    _add_model_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    srv.add_argument("--port", type=_int_at_least(0), default=8000, help="port (default: %(default)s)")
    srv.add_argument("--max_tokens", type=_int_at_least(1), default=512,
                     help="cap on a request's max_tokens (default: %(default)s)")
    srv.add_argument("--name", default=None,
                     help="model name in the API (default: the checkpoint directory's name)")
    srv.add_argument("--device", type=_device, default="auto",
                     help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps (default: auto)")
    srv.set_defaults(func=cmd_serve)

    exp = sub.add_parser("export", help="export a model directory to another format",
                         description="Export a model directory, e.g. for Hugging Face transformers.")
    exp.add_argument("out_dir", metavar="OUT_DIR", help="directory to write")
    exp.add_argument("--format", choices=["hf", "gguf"], default="hf",
                     help="hf: transformers LlamaForCausalLM + tokenizer with chat template; "
                          "gguf: one OUT_DIR/NAME-DTYPE.gguf file for llama.cpp (needs `gguf`)")
    exp.add_argument("--dtype", choices=["f32", "f16", "q8_0"], default="f16",
                     help="gguf weight type (default: %(default)s)")
    exp.add_argument("--project_dir", default=".",
                     help="hf: the pipeline's directory, read for the model card's data and "
                          "metrics (data/processed/*/stats.json, metrics/*.json; default: .)")
    exp.add_argument("--push-to-hub", dest="push_to_hub", metavar="REPO_ID", default=None,
                     help="hf: upload the exported directory to this Hugging Face Hub repo")
    exp.add_argument("--private", action="store_true", help="with --push-to-hub: a private repo")
    _add_model_args(exp)
    exp.set_defaults(func=cmd_export)

    plots = sub.add_parser("plots", help="render the DVC curves of the workspace and experiments",
                           description="Render the curves declared in dvc.yaml (workspace and "
                                       "--exp experiments) to PNG files and one self-contained "
                                       "HTML page that needs no network (minigpt.plots).")
    plots.add_argument("--exp", action="append", default=[], metavar="NAME",
                       help="an experiment (or any git revision) to overlay; repeat for more")
    plots.add_argument("--out", default="plots", metavar="DIR",
                       help="directory to write (default: plots)")
    plots.set_defaults(func=cmd_plots)
    return parser


# --- loading ------------------------------------------------------------------------------------

@dataclass
class Loaded:
    """A model ready to generate with, and how to talk to it."""

    model: GPT
    tok: Tokenizer
    config: dict
    device: torch.device
    is_chat: bool
    """config.json names a chat template: prompts are wrapped in it."""
    eot: int
    """<|endoftext|>: starts raw prompts, ends every generation."""
    slid: bool = False
    """The sampler's window has slid once already this run (the notice is shown once)."""
    pending: list = field(default_factory=list)
    """Notices raised while an answer is being printed, shown after it (`flush_notices`)."""

    def warn_slide(self, message: str) -> None:
        """The sampler's context-overflow notice: one `warning:` line on stderr, once per run
        (the sampler says it once per call; --num_samples and chat turns make many calls).
        It arrives mid-answer, so it waits for the answer's end: on a terminal, where stdout and
        stderr share the screen, it must not land inside the answer's line."""
        if not self.slid:
            self.pending.append(f"warning: {message}")
            self.slid = True

    def flush_notices(self) -> None:
        """Print the notices held back during an answer, each on its own stderr line."""
        for line in self.pending:
            print(line, file=sys.stderr, flush=True)
        self.pending.clear()


def resolve_device(name: str) -> torch.device:
    """auto -> cuda > mps > cpu; an explicit device that is not available is a usage error."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise CLIError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not has_mps:
        raise CLIError("--device mps: MPS is not available on this machine")
    return torch.device(name)


def _check_tokenizer(path: str, config: dict) -> Tokenizer:
    """Load --tokenizer_path and check it is the tokenizer the model was trained with."""
    from minigpt.tokenizer import TokenizerError, load_tokenizer, tokenizer_hash

    try:
        tok = load_tokenizer(path)
        got = tokenizer_hash(path)
    except TokenizerError as e:
        raise CLIError(f"--tokenizer_path: {e}") from None
    want = config.get("tokenizer_hash")
    if want and got != want:
        raise CLIError(f"--tokenizer_path {path}: tokenizer hash {got} does not match the "
                       f"model's ({want} in config.json)")
    return tok


def utf8_text(text: str, where: str) -> str:
    """`text` (argv or a stdin line), refused with one line if it held bytes that are not UTF-8
    (Python keeps them as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = ord(text[e.start])
        what = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"U+{char:04X}"
        raise CLIError(f"{where} is not valid UTF-8 ({what} at character {e.start + 1})") from None
    return text


def load(checkpoint_path: str, device_name: str = "cpu", tokenizer_path: str | None = None) -> Loaded:
    """The model directory (and optional separate tokenizer), with usage errors as CLIError."""
    from minigpt.template import TEMPLATE_NAME
    from minigpt.checkpoint import CheckpointError, check_vocab, load_model
    from minigpt.tokenizer import EOT, TokenizerError, check_special_tokens, special_id

    device = resolve_device(device_name)
    try:
        model, tok, config = load_model(checkpoint_path, device)
        check_special_tokens(tok, f"{checkpoint_path}/tokenizer.json")  # ids 0..4 per FORMATS.md
    except (CheckpointError, TokenizerError) as e:
        raise CLIError(f"--checkpoint_path: {e}") from None  # e names the path
    if tokenizer_path is not None:
        tok = _check_tokenizer(tokenizer_path, config)
        try:  # ids past the embedding would crash
            check_vocab(tok, config, model.config.vocab_size, tokenizer_path)
        except CheckpointError as e:
            raise CLIError(f"--tokenizer_path {e}") from None
    template = config.get("chat_template")
    if template not in (None, TEMPLATE_NAME):
        raise CLIError(f"--checkpoint_path {checkpoint_path}: unknown chat_template {template!r} "
                       f"(this version knows {TEMPLATE_NAME})")
    model.eval()
    return Loaded(model, tok, config, device, template == TEMPLATE_NAME, special_id(tok, EOT))


# --- generation ---------------------------------------------------------------------------------

class TextStream:
    """Incremental detokenizer: push ids, get back the text that is now safe to print.

    Decodes all ids so far and returns what was not yet returned, except while the text ends in
    U+FFFD (an incomplete UTF-8 sequence that the next token may complete). `finish` returns the
    rest, so the pieces always add up to `decode(ids)`."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.ids: list[int] = []
        self.sent = 0

    def text(self) -> str:
        from minigpt.tokenizer import decode

        return decode(self.tok, self.ids)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.text()
        if text.endswith("\ufffd"):
            return ""
        return self._take(text)

    def finish(self) -> str:
        return self._take(self.text())

    def _take(self, text: str) -> str:
        new, self.sent = text[self.sent:], len(text)
        return new


def _write(text: str, out=None) -> None:
    out = out or sys.stdout
    if text:
        out.write(text)
        out.flush()


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A seeded generator on the model's device (where sampling happens), or None for OS entropy."""
    import torch

    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def sample_ids(m: Loaded, ids: list[int], args: argparse.Namespace, generator,
               on_token: Callable[[int], None] | None = None) -> list[int]:
    """New token ids for the prompt `ids`, without the closing <|endoftext|>."""
    from minigpt.sample import generate

    try:
        new = generate(m.model, ids, args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k or None, top_p=args.top_p,
                       repetition_penalty=args.repetition_penalty, stop_ids=[m.eot],
                       generator=generator, on_token=on_token, on_window=m.warn_slide)
    except ValueError as e:  # the sampler's own argument checks; ours should have caught them
        raise CLIError(str(e)) from None
    return new[:-1] if new and new[-1] == m.eot else list(new)


def batch_ids(m: Loaded, ids: list[int], args: argparse.Namespace, generator) -> list[list[int]]:
    """args.num_samples continuations of `ids` from one batched decode, each without its closing
    <|endoftext|>."""
    from minigpt.sample import generate_batch

    try:
        rows = generate_batch(m.model, ids, args.max_new_tokens, args.num_samples,
                              temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty, stop_ids=[m.eot],
                              generator=generator, on_window=m.warn_slide)
    except ValueError as e:
        raise CLIError(str(e)) from None
    return [r[:-1] if r and r[-1] == m.eot else list(r) for r in rows]


def stream_ids(m: Loaded, ids: list[int], args: argparse.Namespace, generator,
               stream: TextStream) -> list[int]:
    """sample_ids, printing text through `stream` as it comes. On Ctrl-C the decoded text is
    printed and the interrupt propagates; `stream.ids` holds what was generated until then."""

    def on_token(token_id) -> None:
        if int(token_id) != m.eot:
            _write(stream.push(token_id))

    try:
        return sample_ids(m, ids, args, generator, on_token)
    finally:
        _write(stream.finish())


def prompt_ids(m: Loaded, prompt: str, raw: bool) -> list[int]:
    """The ids a prompt becomes: the chat template for a chat model, else <|endoftext|> + text."""
    from minigpt.template import encode_prompt
    from minigpt.tokenizer import encode_text

    if m.is_chat and not raw:
        if not prompt.strip():
            raise CLIError("--prompt is empty; an instruction-tuned model needs an instruction "
                           "(or pass --raw to start from <|endoftext|>)")
        return encode_prompt(m.tok, prompt)
    return [m.eot] + encode_text(m.tok, prompt)


def cmd_generate(args: argparse.Namespace) -> int:
    from minigpt.tokenizer import decode

    utf8_text(args.prompt, "--prompt")  # before the (slow) model load
    m = load(args.checkpoint_path, args.device, args.tokenizer_path)
    ids = prompt_ids(m, args.prompt, args.raw)
    echo = "" if (m.is_chat and not args.raw) else args.prompt  # raw text is continued, not answered
    generator = make_generator(args.seed, m.device)
    if args.stream:  # one sample at a time, printed as it comes
        samples = None
    elif args.num_samples == 1:
        samples = [sample_ids(m, ids, args, generator)]
    else:  # one batched decode: N samples cost little more than one
        samples = batch_ids(m, ids, args, generator)
    for i in range(args.num_samples):
        if i:
            print("---")
        _write(echo)
        if samples is None:
            stream_ids(m, ids, args, generator, TextStream(m.tok))
        else:
            _write(decode(m.tok, samples[i]))
        _write("\n")
        m.flush_notices()  # after the answer's newline: never inside its line
    return 0


# --- chat ---------------------------------------------------------------------------------------

def _line_reader(interactive: bool) -> Callable[[], str]:
    """input() with readline editing and history on a terminal; plain line reads otherwise."""
    if not interactive:
        number = 0

        def read() -> str:
            nonlocal number
            stream = getattr(sys.stdin, "buffer", sys.stdin)  # bytes: a bad line is reported
            raw = stream.readline()
            number += 1
            if not raw:
                raise EOFError
            try:
                line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            except UnicodeDecodeError as e:
                raise CLIError(f"stdin line {number} is not valid UTF-8 (byte 0x{raw[e.start]:02x} "
                               f"at byte {e.start + 1})") from None
            return line.rstrip("\r\n")

        return read
    try:
        import atexit
        import readline  # noqa: F401  (importing it gives input() line editing and history)

        history = HISTORY_FILE.expanduser()
        try:
            readline.read_history_file(history)
        except OSError:
            pass  # first run, or an unreadable file: start without history
        readline.set_history_length(1000)
        atexit.register(_save_history, readline, history)
    except ImportError:
        pass  # Windows without pyreadline: plain input() still works
    return lambda: utf8_text(input(">>> "), "input")


def _save_history(readline, path: Path) -> None:
    try:
        readline.write_history_file(path)
    except OSError:
        pass  # history is a convenience; never fail on exit because of it


def fit_conversation(tok: Tokenizer, messages: list[dict], limit: int) -> tuple[list[int], int]:
    """Encode `messages`, first dropping the oldest user/assistant turns (in place) while the ids
    are longer than `limit`. Keeps a leading system message and the last user message, so the
    result may still be too long: then the sampler slides its window. Returns (ids, turns dropped)."""
    from minigpt.template import encode_conversation

    first = 1 if messages and messages[0]["role"] == "system" else 0
    dropped = 0
    ids = encode_conversation(tok, messages, add_generation_prompt=True)
    while len(ids) > limit and len(messages) - first > 1:
        del messages[first:first + 2]  # one user message and the assistant reply to it
        dropped += 1
        ids = encode_conversation(tok, messages, add_generation_prompt=True)
    return ids, dropped


def _reply(m: Loaded, ids: list[int], args: argparse.Namespace, generator) -> str:
    """Stream one answer; Ctrl-C stops it and returns what was generated until then."""
    stream = TextStream(m.tok)
    try:
        stream_ids(m, ids, args, generator, stream)
        _write("\n")
    except KeyboardInterrupt:
        print("\n[stopped]", file=sys.stderr)
    m.flush_notices()
    return stream.text()


def cmd_chat(args: argparse.Namespace) -> int:
    m = load(args.checkpoint_path, args.device, args.tokenizer_path)
    if not m.is_chat:
        print(f"warning: {args.checkpoint_path} is not instruction-tuned (config.json has no "
              "chat_template); its answers will not follow the chat format", file=sys.stderr)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    # Room kept free for the answer: max_new_tokens, but at most half the context, so a long
    # --max_new_tokens does not wipe the history every turn (a longer answer slides the window).
    block_size = m.model.config.block_size
    limit = block_size - min(args.max_new_tokens, block_size // 2)
    generator = make_generator(args.seed, m.device)
    interactive = sys.stdin.isatty()
    read = _line_reader(interactive)
    if interactive:
        print(CHAT_HELP, file=sys.stderr)
    while True:
        try:
            line = read()
        except EOFError:
            break
        except KeyboardInterrupt:  # at the prompt: drop the line, like a shell; Ctrl-D leaves
            print(file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in QUIT_COMMANDS:
            break
        if text == "/reset":
            messages = list(start)
            print("[conversation cleared]", file=sys.stderr)
            continue
        if text in ("/help", "/?"):
            print(CHAT_HELP, file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        ids, dropped = fit_conversation(m.tok, messages, limit)
        if dropped:
            print(f"[dropped the oldest {dropped} turn(s) to fit the {block_size}-token "
                  "context]", file=sys.stderr)
        messages.append({"role": "assistant", "content": _reply(m, ids, args, generator)})
    if interactive:
        print(file=sys.stderr)  # leave the shell prompt on its own line after Ctrl-D
    return 0


# --- serve --------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from minigpt.serve import serve
    except ImportError as e:
        raise CLIError(f"serve needs FastAPI and uvicorn: pip install 'minigpt[serve]' ({e})") from None
    if args.port > 65535:
        raise CLIError(f"--port must be <= 65535, got {args.port}")
    m = load(args.checkpoint_path, args.device)
    serve(m, args.name or Path(args.checkpoint_path).resolve().name, args.host, args.port,
          args.max_tokens)
    return 0


# --- export -------------------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> int:
    from minigpt.card import model_card, push_to_hub
    from minigpt.template import CHAT_TEMPLATE_JINJA
    from minigpt.export import export_hf
    from minigpt.tokenizer import PAD, special_id

    src, dst = Path(args.checkpoint_path).resolve(), Path(args.out_dir).resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise CLIError(f"export to {args.out_dir}: OUT_DIR must be outside the model directory "
                       f"{args.checkpoint_path} (and not contain it)")
    m = load(args.checkpoint_path, "cpu")
    tokenizer_file = Path(args.checkpoint_path) / "tokenizer.json"  # the directory is self-contained
    if args.format == "gguf":
        try:
            from minigpt.export_gguf import export_gguf
        except ImportError as e:
            raise CLIError(f"--format gguf needs the gguf package: pip install gguf ({e})") from None
        name = Path(args.checkpoint_path).resolve().name
        try:
            out = export_gguf(m.model, tokenizer_file, Path(args.out_dir) / f"{name}-{args.dtype}.gguf",
                              dtype=args.dtype, name=name, chat_template=CHAT_TEMPLATE_JINJA,
                              eos_id=m.eot, pad_id=special_id(m.tok, PAD), bos_id=None)
        except (OSError, ValueError) as e:
            raise CLIError(f"export to {args.out_dir}: {e}") from None
        print(f"exported {args.checkpoint_path} to {out} (GGUF, llama, {args.dtype})", file=sys.stderr)
        return 0
    # The template goes into base models' exports too: harmless, and every export has the same
    # tokenizer_config.
    try:
        name = Path(args.checkpoint_path).resolve().name
        card = model_card(m.config, m.model.num_params(), name, args.project_dir)
        out = export_hf(m.model, tokenizer_file, args.out_dir,
                        chat_template=CHAT_TEMPLATE_JINJA,
                        eos_id=m.eot,  # <|endoftext|> ends every answer and document
                        pad_id=special_id(m.tok, PAD), bos_id=None,
                        extra_files={"README.md": card})  # inside the export: all or nothing
    except (OSError, ValueError) as e:  # an unwritable OUT_DIR, a tokenizer that does not fit
        raise CLIError(f"export to {args.out_dir}: {e}") from None
    print(f"exported {args.checkpoint_path} to {out} (Hugging Face LlamaForCausalLM, "
          "README.md model card)", file=sys.stderr)
    if args.push_to_hub:
        try:
            url = push_to_hub(out, args.push_to_hub, private=args.private)
        except ImportError as e:
            raise CLIError(f"--push-to-hub needs huggingface_hub: pip install huggingface_hub ({e})") from None
        except Exception as e:  # network, auth, a bad repo id: one line, the export stays on disk
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CLIError(f"--push-to-hub {args.push_to_hub}: {first}") from None
        print(f"uploaded {out} to {url}", file=sys.stderr)
    return 0


# --- plots --------------------------------------------------------------------------------------

def cmd_plots(args: argparse.Namespace) -> int:
    from minigpt.plots import PlotsError, make_plots

    try:
        files = make_plots(args.exp, args.out)
    except (PlotsError, OSError) as e:
        raise CLIError(str(e)) from None
    print(f"wrote {len(files) - 1} PNG file(s) and {files[-1]} (self-contained, works offline)",
          file=sys.stderr)
    return 0


# --- entry point --------------------------------------------------------------------------------

def _tolerant_stdout() -> None:
    """Model text may hold any character: on a non-UTF-8 console print '?' rather than crash."""
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "")
    if encoding != "utf8" and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 usage error, 130 interrupted)."""
    _tolerant_stdout()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except CLIError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a chat answer: leave quietly, shell convention
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `minigpt generate ... | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
