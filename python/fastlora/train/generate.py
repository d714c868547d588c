"""`fastlora generate`: text from a base model, optionally with a trained adapter, streamed.

The model is loaded as `fastlora train` loads it (the shipped tiny Llama by default); an
adapter directory (PEFT format, fastlora's or peft's) is loaded over it with the 4-bit
settings it was trained with. A prompt goes through the tokenizer's chat template when it
has one and `chat` allows it; tokens are printed as they come.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import torch

from . import modeling
from .data import json_lines
from .errors import TrainError


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: one per line, or (.jsonl) records with a "prompt" (or "text") field."""
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"{path}: no such prompts file")
    if path.suffix not in (".jsonl", ".json"):
        prompts = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    else:
        prompts = []
        for number, record in json_lines(path):
            text = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise TrainError(f"{path}:{number}: expected a record with a \"prompt\" or \"text\" string")
            prompts.append(text)
    if not prompts:
        raise TrainError(f"{path}: no prompts")
    return prompts


def load(model: str | None = None, adapter: str | Path | None = None):
    """(model in eval mode, tokenizer): the base model, with `adapter` loaded when given."""
    net, tokenizer, _ = modeling.load_model(model, torch.float32)
    if adapter is not None:
        from ..adapter import load_adapter

        try:
            load_adapter(net, adapter)
        except (OSError, ValueError) as exc:
            raise TrainError(f"--adapter {adapter}: {modeling._one_line(exc)}") from None
    return net.eval(), tokenizer


def generate(prompts: list[str], model: str | None = None, adapter: str | Path | None = None,
             max_new_tokens: int = 64, temperature: float = 0.0, chat: bool = True, seed: int = 0,
             out: TextIO | None = None) -> list[str]:
    """Generates a continuation of each prompt (greedy at temperature 0), writing each to `out`
    (default stdout) as it is produced; returns the continuations."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise TrainError(f"--max-new-tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise TrainError(f"--temperature must be a number >= 0, got {temperature!r}")
    net, tokenizer = load(model, adapter)
    return continue_prompts(net, tokenizer, prompts, max_new_tokens, temperature, chat, seed, out or sys.stdout)


def continue_prompts(net, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
                     chat: bool = True, seed: int = 0, out: TextIO | None = None) -> list[str]:
    """The continuation of each prompt by `net` (in eval mode), streamed to `out` when given."""
    templated = chat and getattr(tokenizer, "chat_template", None)
    device = next(net.parameters()).device
    results = []
    for prompt in prompts:
        if templated:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
        else:
            text = prompt
        inputs = tokenizer(text, return_tensors="pt").to(device)
        torch.manual_seed(seed)
        sampling = {"do_sample": True, "temperature": float(temperature)} if temperature > 0 else {"do_sample": False}
        if out is not None:
            sampling["streamer"] = _streamer(tokenizer, out)
        with torch.no_grad():
            ids = net.generate(**inputs, max_new_tokens=max_new_tokens, use_cache=True,
                               pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id, **sampling)
        results.append(tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return results


def _streamer(tokenizer, out: TextIO):
    """transformers' TextStreamer, writing to `out` instead of print()."""
    TextStreamer = modeling._hf().TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
