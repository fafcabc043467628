"""``mone-generate``: text from a trained model, printed as it is produced.

    mone-generate MODEL --prompt TEXT [--max-new-tokens N] [--greedy | --temperature T --top-p P]
                  [--seed S] [--decode auto|dense|sparse] [--device auto|cpu|cuda]
                  [--dtype float32|bfloat16]

MODEL is a directory written by ``mone-export``, or a run directory / checkpoint, which is
converted in memory into the same Hugging Face model (nothing is written). Generation is
transformers' ``generate()`` with its KV cache; the prompt is preceded by the end-of-document
token, as every training document was. ``--decode`` chooses the routed experts' path of a MoNE
model (``auto``: sparse only where it pays, see ``mone_kernels/sparse_decode.py``).
The prompt is printed, then the continuation as it is produced; the last line (on stderr) gives
tokens per second. Bad input ends in one line and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mone_train.command_line import CommandParser, quiet_libraries
from mone_train.errors import ConfigError, report_failure

DECODE_PATHS = ("auto", "dense", "sparse")


@dataclass
class GenerationStats:
    """One generation: the text and how long it took."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    seconds: float
    first_token_seconds: float

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second, prompt processing included."""
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second after the first one (the KV-cached decode steps alone)."""
        steps, seconds = self.new_tokens - 1, self.seconds - self.first_token_seconds
        return steps / seconds if steps > 0 and seconds > 0 else 0.0


class TextStream:
    """A ``generate()`` streamer writing the decoded text of new tokens as they arrive.

    The first ``put`` is the prompt (skipped). Text ending in an incomplete UTF-8 sequence
    (decoded as U+FFFD) is held back until the next token completes it.
    """

    def __init__(self, tokenizer, write: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.write = write
        self.ids: list[int] = []
        self.shown = 0
        self.prompt_done = False
        self.first_token_at: float | None = None

    def put(self, value) -> None:
        """Receive the prompt (first call) or the newest token ids."""
        if not self.prompt_done:
            self.prompt_done = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        self.ids.extend(int(i) for i in value.reshape(-1).tolist())
        self._flush(final=False)

    def end(self) -> None:
        """Write whatever text is left."""
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        text = self.tokenizer.detokenize(self.ids)
        if not final and text.endswith("\ufffd"):
            return
        if len(text) > self.shown:
            self.write(text[self.shown :])
            self.shown = len(text)


def load_generation_model(path: Path, device: str = "cpu", dtype: str = "float32"):
    """(Hugging Face causal LM in eval mode, tokenizer) for an exported directory, a run
    directory or a checkpoint."""
    import torch

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    path = Path(path).expanduser()
    if (path / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        from mone_train.export.tokenizer_files import load_exported_tokenizer

        tokenizer = load_exported_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=True, dtype=torch_dtype
        )
    else:
        from mone_train.export.writer import hf_model_from_checkpoint

        model, tokenizer, _ = hf_model_from_checkpoint(path, torch_dtype, key="MODEL")
    return model.to(device).eval(), tokenizer


def set_decode_path(model, decode: str) -> str:
    """Set a MoNE model's expert path; return the path in use (``dense`` for other models)."""
    if decode not in DECODE_PATHS:
        raise ConfigError(
            f"--decode {decode} is invalid: expected one of {', '.join(DECODE_PATHS)}"
        )
    if hasattr(model.config, "decode_path"):
        model.config.decode_path = decode
        return decode
    if decode == "sparse":
        raise ConfigError(
            f"--decode sparse needs a MoNE model; this {type(model).__name__} keeps every neuron"
        )
    return "dense"


def generate_text(
    model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 200,
    greedy: bool = False,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    write: Callable[[str], None] | None = None,
) -> GenerationStats:
    """Continue ``prompt`` with ``generate()`` (KV cache on), writing text as it is produced."""
    import torch
    from transformers import set_seed

    ids = [int(tokenizer.eod), *(int(i) for i in tokenizer.tokenize(prompt))]
    limit = model.config.max_position_embeddings
    if len(ids) + max_new_tokens > limit:
        raise ConfigError(
            f"--max-new-tokens {max_new_tokens} is invalid: the prompt's {len(ids)} tokens plus "
            f"the new ones exceed the model's {limit} positions"
        )
    input_ids = torch.tensor([ids], device=model.device)
    sampling = {} if greedy else {"temperature": temperature, "top_p": top_p}
    stream = TextStream(tokenizer, write or (lambda text: None))
    set_seed(seed)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            eos_token_id=int(tokenizer.eod),
            pad_token_id=int(tokenizer.pad),
            use_cache=True,
            streamer=stream,
            **sampling,
        )
    seconds = time.perf_counter() - start
    new_ids = out[0, len(ids) :].tolist()
    first = (stream.first_token_at or start + seconds) - start
    text = tokenizer.detokenize(new_ids)
    return GenerationStats(text, new_ids, len(ids), len(new_ids), seconds, first)


def build_parser() -> argparse.ArgumentParser:
    """The ``mone-generate`` command line."""
    parser = CommandParser(
        prog="mone-generate",
        examples=(
            'mone-generate exported/my-run --prompt "def fibonacci(" --greedy',
            'mone-generate runs/my-run --prompt "import os" --max-new-tokens 50 --decode sparse',
        ),
        description="Generate text with a trained model (docs/inference.md): an exported "
        "directory, a run directory or a checkpoint. Nothing is downloaded.",
    )
    parser.add_argument("model", help="exported directory, run directory or checkpoint folder")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (no sampling)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (default 0.8)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling mass (default 0.95)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decode", default="auto", choices=DECODE_PATHS)
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    return parser


def _check_args(args) -> None:
    if args.greedy and (args.temperature is not None or args.top_p is not None):
        raise ConfigError("--greedy takes no --temperature or --top-p (they set up sampling)")
    args.temperature = 0.8 if args.temperature is None else args.temperature
    args.top_p = 0.95 if args.top_p is None else args.top_p
    if args.temperature <= 0:
        raise ConfigError(f"--temperature {args.temperature} is invalid: expected a number > 0")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p {args.top_p} is invalid: expected a number in (0, 1]")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens} is invalid: expected >= 1")
    if not Path(args.model).expanduser().exists():
        raise ConfigError(f"MODEL {args.model}: no such file or directory")


def run(args, write: Callable[[str], None]) -> GenerationStats:
    """Load the model ``args`` name and generate; returns the statistics."""
    import torch

    _check_args(args)
    device = args.device
    if device == "auto":  # CUDA when present, unless MONE_TRAIN_DEVICE says otherwise
        from mone_train.parallel.process_groups import run_device

        device = run_device()
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda is invalid here: no CUDA device (use auto or cpu)")
    model, tokenizer = load_generation_model(args.model, device, args.dtype)
    path = set_decode_path(model, args.decode)
    write(args.prompt)
    stats = generate_text(
        model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, greedy=args.greedy,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, write=write,
    )  # fmt: skip
    print(
        f"\n[{stats.new_tokens} tokens in {stats.seconds:.2f} s: {stats.tokens_per_s:.1f} "
        f"tokens/s ({stats.decode_tokens_per_s:.1f} after the first); prompt "
        f"{stats.prompt_tokens} tokens; experts: {path}]",
        file=sys.stderr,
    )
    return stats


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code."""
    quiet_libraries()

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        run(build_parser().parse_args(argv), write)
    except Exception as err:
        return report_failure("mone-generate", err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
