"""The `minigpt` command: `generate`, `chat`, `serve` and `export` over a model directory; `plots` of runs.

Design choices
- Plain argparse subcommands; `main(argv) -> int`, so tests call it in-process. torch is imported
  inside the commands, so `--help` and argument errors answer at once.
- Bad input is the user's mistake, not a crash: every usage error (argparse's included) is one
  line `error: ...` naming the flag, exit 2; ranges are checked by the `type=` functions before
  the model loads. Genuine bugs still raise with a traceback.
- The commands are wiring: loading and sampling are `minigpt.engine` (shared with `serve`), the
  conversation loop `minigpt.chat`, the export flow `minigpt.export_command`. A chat model's
  prompt is wrapped in the chat template and only the response printed; `--raw` text follows
  `<|endoftext|>` and is echoed, then continued, so it reads as one document.
- Untrusted text: a `--prompt` or `--system` that is not valid UTF-8 (e.g. `$'\xff'`) is refused
  with one line, exit 2 (rather than guessed at with U+FFFD). `--max_new_tokens` is capped at
  MAX_NEW_TOKENS (65536, 256 windows of the largest context trained here): a typo must not mean a
  run that never ends. `--num_samples` is capped at MAX_NUM_SAMPLES (256): the samples are one
  batch, each row with its own KV cache, so 200,000 asked for many GB at once; so is `serve
  --parallel` (MAX_PARALLEL rows, refused when their cache cannot fit in memory). `--seed` is what
  torch's generator takes (0 .. 2**64-1).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from minigpt.chat import CHAT_HELP
from minigpt.engine import (Sampling, TextStream, UsageError, batch_ids, load, make_generator,
                            prompt_ids, sample_ids, stream_ids, utf8_text, write_out)

DEFAULT_CHECKPOINT = "out/finetune"
MAX_NEW_TOKENS = 65536
MAX_NUM_SAMPLES = 256
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's largest
MAX_PARALLEL = 64  # serve's batch rows: far past where a CPU step stops being bound by the weights


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


def _add_device_args(p: argparse.ArgumentParser) -> None:
    """--device and --dtype: where the model runs and, on CPU, its weights' type."""
    p.add_argument("--device", type=_device, default="auto",
                   help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps (default: auto)")
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
    _add_device_args(p)


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

    _add_serve_command(sub)
    _add_export_command(sub)

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


def _add_serve_command(sub) -> None:
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
    srv.add_argument("--parallel", type=_int_at_least(1, MAX_PARALLEL), default=4,
                     help="requests decoded together as one batch (continuous batching: a new "
                          "one joins at the next token); 1 = one at a time (default: %(default)s)")
    _add_device_args(srv)
    srv.set_defaults(func=cmd_serve)


def _add_export_command(sub) -> None:
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

def cmd_chat(args: argparse.Namespace) -> int:
    from minigpt.chat import chat

    if args.system is not None:
        utf8_text(args.system, "--system")  # before the (slow) model load
    m = load(args.checkpoint_path, args.device, args.tokenizer_path, args.dtype)
    if not m.is_chat:
        print(f"warning: {args.checkpoint_path} is not instruction-tuned (config.json has no "
              "chat_template); its answers will not follow the chat format", file=sys.stderr)
    chat(m, Sampling.from_args(args), args.system)
    return 0


# --- serve --------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from minigpt.serve import serve
        from minigpt.serve_batch import check_parallel
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
    check_parallel(m, args.parallel)
    serve(m, args.name or Path(args.checkpoint_path).resolve().name, args.host, args.port,
          args.max_tokens, key, args.parallel)
    return 0


# --- export -------------------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> int:
    from minigpt.export_command import export

    export(args.checkpoint_path, args.out_dir, args.format, args.dtype, args.project_dir,
           args.push_to_hub, args.private)
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
