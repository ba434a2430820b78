"""`dist-gru sample`: generate bytes from a byte-level model trained in stream mode.

    dist-gru sample --model runs/bytes/model --prompt "def main(" --bytes 200 --temperature 0.8 --seed 0

The prompt's bytes run through the model with the state carried (one lane, as in training), then
each next byte is drawn from the softmax of the last output divided by the temperature (0 = the
most likely byte) and fed back. The seed makes the draw reproducible. Prints the prompt followed
by the generated text (bytes that are not valid UTF-8 are shown as replacement characters).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

from dist_gru.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-gru sample", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a saved byte-level model folder (RUN/model)")
    parser.add_argument("--prompt", default="\n", help="text to start from (default: a newline)")
    parser.add_argument("--bytes", type=int, default=200, help="bytes to generate (default 200)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    return parser


@torch.no_grad()
def generate(model: torch.nn.Module, prompt: bytes, count: int, temperature: float, seed: int) -> bytes:
    """`count` bytes after `prompt` (at least one byte), state carried from step to step."""
    generator = torch.Generator().manual_seed(seed)
    state = model.initial_state(1)
    out, state = model(torch.tensor([list(prompt)], dtype=torch.int64), state=state)
    logits = out[0, -1]
    produced = []
    for _ in range(count):
        if temperature == 0:
            token = int(logits.argmax())
        else:
            probs = torch.softmax(logits.double() / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        produced.append(token)
        out, state = model(torch.tensor([[token]]), state=state)
        logits = out[0, -1]
    return bytes(produced)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from dist_gru.infer.load import load_model

    with contextlib.redirect_stdout(sys.stderr):  # the hub mixin announces the load on stdout; the text goes there
        model = load_model(Path(args.model)).eval()
    problems = []
    if model.vocab_size != 256:
        problems.append(f"--model {args.model}: not a byte-level model (vocab_size={model.vocab_size}, expected 256)")
    elif model.bidirectional or model.head_kind != "step":
        problems.append(f"--model {args.model}: sampling needs a unidirectional step model (a stream-mode model)")
    if args.bytes < 0:
        problems.append(f"--bytes {args.bytes}: expected a count >= 0")
    if not args.temperature >= 0:
        problems.append(f"--temperature {args.temperature}: expected a number >= 0")
    prompt = args.prompt.encode()
    if not prompt:
        problems.append("--prompt '': expected at least one character to start from")
    if problems:
        raise ConfigError("\n  ".join(problems))
    text = generate(model, prompt, args.bytes, args.temperature, args.seed)
    sys.stdout.write((prompt + text).decode("utf-8", errors="replace") + "\n")
    return 0
