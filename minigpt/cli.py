"""The `minigpt` command: `generate`, `chat`, `serve` and `export` over a model directory; `plots` of runs.

Design choices
- Plain argparse subcommands; `main(argv) -> int`, so tests call it in-process. torch is imported
  inside the commands, so `--help` and argument errors answer at once.
- Bad input is the user's mistake, not a crash: every usage error (argparse's included) is one
  line `error: ...` naming the flag, exit 2; ranges are checked by the `type=` functions before
  the model loads. Genuine bugs still raise with a traceback.
- Loading and sampling are `minigpt.engine` (shared with `serve`): a chat model's prompt is wrapped
  in the chat template and only the response printed; `--raw` text follows `<|endoftext|>` and is
  echoed, then continued, so it reads as one document.
- Untrusted text: a `--prompt` or chat line that is not valid UTF-8 (e.g. `$'\xff'`) is refused
  with one line, exit 2 (rather than guessed at with U+FFFD), naming the flag or stdin line.
  `--max_new_tokens` is capped at MAX_NEW_TOKENS (65536, 256 windows of the largest context
  trained here): a typo must not mean a run that never ends. `--num_samples` is capped at
  MAX_NUM_SAMPLES (256): the samples are one batch, each row with its own KV cache, so 200,000
  asked for many GB at once. `--seed` is what torch's generator takes (0 .. 2**64-1).
- `export` refuses an OUT_DIR that is, or is inside, the model directory (or contains it), and
  writes atomically (`minigpt.export`). A README.md edited since the last export is kept, with a
  warning, instead of being replaced by a new card (`minigpt.card.card_edited`).
- `chat` keeps the conversation within the context: before each answer, while the encoded
  conversation plus `--max_new_tokens` exceeds `block_size`, the oldest turn is dropped for good
  (the system message stays) and the user told; the room kept for the answer is at most half the
  context. Ctrl-C stops an answer (its partial text stays in the history), Ctrl-D or `/quit`
  leaves, `/reset` starts over. Non-tty stdin is read line by line and notices go to stderr, so
  the chat can be scripted.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from minigpt.engine import (Loaded, Sampling, TextStream, UsageError, batch_ids, fit_conversation,
                            load, make_generator, prompt_ids, sample_ids, stream_ids, write_out)

DEFAULT_CHECKPOINT = "out/finetune"
HISTORY_FILE = Path("~/.minigpt_history")
QUIT_COMMANDS = ("/quit", "/exit")
MAX_NEW_TOKENS = 65536
MAX_NUM_SAMPLES = 256
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's largest
CHAT_HELP = "commands: /reset (start over), /quit or Ctrl-D (leave), Ctrl-C (stop the answer)"


class _Parser(argparse.ArgumentParser):
    """argparse, but errors raise UsageError (one line, exit 2) instead of printing usage and exiting.

    Subparsers are built with the parent's class, so this covers every subcommand."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


# --- argument types: range checks happen while parsing, before anything is loaded ---------------

def _float_in(name: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    """An argparse type: a float for which `ok` holds; argparse prefixes the flag to the message."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value):  # NaN and inf are never a setting
            raise argparse.ArgumentTypeError(f"must be {name} and finite, got {text}")
        if not ok(value):
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
    from minigpt.config import device_problem  # the params' rule and message

    if (problem := device_problem(text)) is not None:
        raise argparse.ArgumentTypeError(f"{problem} (got {text!r})")
    return text


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint_path", default=DEFAULT_CHECKPOINT,
                   help=f"model directory (default: {DEFAULT_CHECKPOINT})")


def _add_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=["fp32", "fp16", "int8"], default="fp32",
                   help="weights for CPU decoding: fp32 (exact), fp16, or int8 (per-channel "
                        "weights, inputs quantized per matmul) (default: fp32)")


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
    p.add_argument("--seed", type=_int_at_least(0, MAX_SEED), default=None,
                   help="random seed, for reproducible sampling (0..2**64-1)")
    p.add_argument("--device", type=_device, default="auto",
                   help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps (default: auto)")
    _add_dtype_arg(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="minigpt", description="Talk to and export minigpt models; plot their training runs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate text from a prompt",
                         description="Generate text from a prompt (instruction-tuned models get "
                                     "the chat template automatically).")
    gen.add_argument("--prompt", default="",
                     help="the prompt; may be empty for a base model (starts a new document)")
    _add_sampling_args(gen)
    gen.add_argument("--num_samples", type=_int_at_least(1, MAX_NUM_SAMPLES), default=1,
                     help=f"independent samples to draw, 1..{MAX_NUM_SAMPLES}, decoded as one "
                          "batch unless --stream (default: 1)")
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
    srv.add_argument("--api-key", "--api_key", dest="api_key", default=None,
                     help="require 'Authorization: Bearer KEY' on every request but the chat page "
                          "(which asks for it); default: $MINIGPT_API_KEY, else no key (a warning "
                          "when --host is not loopback)")
    srv.add_argument("--device", type=_device, default="auto",
                     help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps (default: auto)")
    _add_dtype_arg(srv)
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


def utf8_text(text: str, where: str) -> str:
    """`text` (argv or a stdin line), refused with one line if it held bytes that are not UTF-8
    (Python keeps them as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        char = ord(text[e.start])
        what = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"U+{char:04X}"
        raise UsageError(f"{where} is not valid UTF-8 ({what} at character {e.start + 1})") from None
    return text


# --- generation ---------------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> int:
    from minigpt.tokenizer import decode

    utf8_text(args.prompt, "--prompt")  # before the (slow) model load
    m = load(args.checkpoint_path, args.device, args.tokenizer_path, args.dtype)
    ids = prompt_ids(m, args.prompt, args.raw)
    echo = "" if (m.is_chat and not args.raw) else args.prompt  # raw text is continued, not answered
    settings = Sampling.from_args(args)
    generator = make_generator(settings.seed, m.device)
    if args.stream:  # one sample at a time, printed as it comes
        samples = None
    elif args.num_samples == 1:
        samples = [sample_ids(m, ids, settings, generator)]
    else:  # one batched decode: N samples cost little more than one
        samples = batch_ids(m, ids, settings, generator)
    for i in range(args.num_samples):
        if i:
            print("---")
        write_out(echo)
        if samples is None:
            stream_ids(m, ids, settings, generator, TextStream(m.tok))
        else:
            write_out(decode(m.tok, samples[i]))
        write_out("\n")
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
                raise UsageError(f"stdin line {number} is not valid UTF-8 (byte 0x{raw[e.start]:02x} "
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


def _reply(m: Loaded, ids: list[int], settings: Sampling, generator) -> str:
    """Stream one answer; Ctrl-C stops it and returns what was generated until then."""
    stream = TextStream(m.tok)
    try:
        stream_ids(m, ids, settings, generator, stream)
        write_out("\n")
    except KeyboardInterrupt:
        print("\n[stopped]", file=sys.stderr)
    m.flush_notices()
    return stream.text()


def cmd_chat(args: argparse.Namespace) -> int:
    if args.system is not None:
        utf8_text(args.system, "--system")  # before the (slow) model load
    m = load(args.checkpoint_path, args.device, args.tokenizer_path, args.dtype)
    if not m.is_chat:
        print(f"warning: {args.checkpoint_path} is not instruction-tuned (config.json has no "
              "chat_template); its answers will not follow the chat format", file=sys.stderr)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    # Room kept free for the answer: max_new_tokens, but at most half the context, so a long
    # --max_new_tokens does not wipe the history every turn (a longer answer slides the window).
    block_size = m.model.config.block_size
    limit = block_size - min(args.max_new_tokens, block_size // 2)
    settings = Sampling.from_args(args)
    generator = make_generator(settings.seed, m.device)
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
        messages.append({"role": "assistant", "content": _reply(m, ids, settings, generator)})
    if interactive:
        print(file=sys.stderr)  # leave the shell prompt on its own line after Ctrl-D
    return 0


# --- serve --------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from minigpt.serve import serve
    except ImportError as e:
        raise UsageError(f"serve needs FastAPI and uvicorn: pip install 'minigpt[serve]' ({e})") from None
    if args.port > 65535:
        raise UsageError(f"--port must be <= 65535, got {args.port}")
    key, where = args.api_key, "--api-key"
    if key is None:
        key, where = os.environ.get("MINIGPT_API_KEY") or None, "MINIGPT_API_KEY"
    # a Bearer token is one HTTP header word: printable ASCII, no spaces
    if key is not None and not (key and key.isascii() and key.isprintable() and " " not in key):
        raise UsageError(f"{where} must be non-empty printable ASCII without spaces")
    m = load(args.checkpoint_path, args.device, dtype=args.dtype)
    serve(m, args.name or Path(args.checkpoint_path).resolve().name, args.host, args.port,
          args.max_tokens, key)
    return 0


# --- export -------------------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> int:
    from minigpt.card import card_edited, model_card, push_to_hub
    from minigpt.template import CHAT_TEMPLATE_JINJA
    from minigpt.export import export_hf
    from minigpt.tokenizer import PAD, special_id

    src, dst = Path(args.checkpoint_path).resolve(), Path(args.out_dir).resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise UsageError(f"export to {args.out_dir}: OUT_DIR must be outside the model directory "
                       f"{args.checkpoint_path} (and not contain it)")
    m = load(args.checkpoint_path, "cpu")
    tokenizer_file = Path(args.checkpoint_path) / "tokenizer.json"  # the directory is self-contained
    if args.format == "gguf":
        try:
            from minigpt.export_gguf import export_gguf
        except ImportError as e:
            raise UsageError(f"--format gguf needs the gguf package: pip install gguf ({e})") from None
        name = Path(args.checkpoint_path).resolve().name
        try:
            out = export_gguf(m.model, tokenizer_file, Path(args.out_dir) / f"{name}-{args.dtype}.gguf",
                              dtype=args.dtype, name=name, chat_template=CHAT_TEMPLATE_JINJA,
                              eos_id=m.eot, pad_id=special_id(m.tok, PAD), bos_id=None)
        except (OSError, ValueError) as e:
            raise UsageError(f"export to {args.out_dir}: {e}") from None
        print(f"exported {args.checkpoint_path} to {out} (GGUF, llama, {args.dtype})", file=sys.stderr)
        return 0
    # The template goes into base models' exports too: harmless, and every export has the same
    # tokenizer_config.
    readme = Path(args.out_dir) / "README.md"
    try:  # a card the user edited since the last export is theirs: kept, and they are told
        kept = readme.read_bytes() if readme.is_file() and not readme.is_symlink() else None
    except OSError as e:
        raise UsageError(f"export to {args.out_dir}: {readme}: {e.strerror}") from None
    if kept is not None and not card_edited(kept):
        kept = None
    try:
        name = Path(args.checkpoint_path).resolve().name
        card = kept or model_card(m.config, m.model.num_params(), name, args.project_dir)
        out = export_hf(m.model, tokenizer_file, args.out_dir,
                        chat_template=CHAT_TEMPLATE_JINJA,
                        eos_id=m.eot,  # <|endoftext|> ends every answer and document
                        pad_id=special_id(m.tok, PAD), bos_id=None,
                        extra_files={"README.md": card})  # inside the export: all or nothing
    except (OSError, ValueError) as e:  # an unwritable OUT_DIR, a tokenizer that does not fit
        raise UsageError(f"export to {args.out_dir}: {e}") from None
    print(f"exported {args.checkpoint_path} to {out} (Hugging Face LlamaForCausalLM, "
          "README.md model card)", file=sys.stderr)
    if kept is not None:
        print(f"warning: {readme} was edited after it was exported: kept as it is, not "
              "regenerated (delete it to get a new model card)", file=sys.stderr)
    if args.push_to_hub:
        try:
            url = push_to_hub(out, args.push_to_hub, private=args.private)
        except ImportError as e:
            raise UsageError(f"--push-to-hub needs huggingface_hub: pip install huggingface_hub ({e})") from None
        except Exception as e:  # network, auth, a bad repo id: one line, the export stays on disk
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UsageError(f"--push-to-hub {args.push_to_hub}: {first}") from None
        print(f"uploaded {out} to {url}", file=sys.stderr)
    return 0


# --- plots --------------------------------------------------------------------------------------

def cmd_plots(args: argparse.Namespace) -> int:
    from minigpt.plots import PlotsError, make_plots

    notes: list[str] = []
    try:
        files = make_plots(args.exp, args.out, notes=notes)
    except (PlotsError, OSError) as e:
        raise UsageError(str(e)) from None
    for note in notes:  # curves and points DVC or Vega would drop without a word
        print(f"warning: {note}", file=sys.stderr)
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
    except UsageError as e:
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
