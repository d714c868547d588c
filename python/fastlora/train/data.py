"""Training data: JSONL records or plain text, tokenized, split, packed or padded, batched.

A JSONL line is `{"text": ...}` (loss on every token) or `{"prompt": ..., "response": ...}`
(loss on the response and the end-of-sequence token only); a `.json` file may hold a list of
such records. Any other file is plain text: documents separated by blank lines. Every example
becomes `bos + tokens + eos` (where the tokenizer has those tokens); a text longer than
`max_length` is cut into consecutive pieces, a prompt/response pair is truncated.

Batches are drawn from a fixed order: epoch `e` visits the training rows in the permutation
seeded by `seed + e`, and step `s` takes global samples `[s * G, (s + 1) * G)` of that endless
sequence (`G`, the global batch, is `batch_size * grad_accum * world_size`). The data position
is thus a function of the number of samples seen, which is all a checkpoint needs to resume,
and a run on N processes sees the same samples per step as one process with N times the batch.

For sequence classification (`--task seq-cls`) a record is `{"text": ..., "label": ...}`, the
label a class name or an integer; an example is the text as the tokenizer encodes one sequence
(its own special tokens), truncated to `max_length`, and its class (`Example.label`), never
split or packed.

Several sources (`--data FILE:WEIGHT`, repeatable) are tokenized, split and packed each on
its own; global sample `i` comes from the source drawn for position `i` with probability
proportional to the weights (seeded, in fixed chunks of positions), and takes that source's
next row in its own endless order. A source is revisited when it runs out, as
`datasets.interleave_datasets(..., stopping_strategy="all_exhausted")` does; the mixture
stays a function of the samples seen.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import TrainError

IGNORE_INDEX = -100
JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass
class Record:
    """One example before tokenization: `text`, or `prompt` and `response`; a classification
    record has a `label` beside its `text`."""

    text: str | None = None
    prompt: str | None = None
    response: str | None = None
    label: str | int | None = None


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # per token, IGNORE_INDEX where there is no loss (language modelling)
    label: int | None = None  # the class index (sequence classification; IGNORE_INDEX: no loss)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Dataset:
    train: list[Example]
    eval: list[Example]
    pad_id: int
    source: str
    stats: dict[str, int] = field(default_factory=dict)
    # A mixture: the training rows of source s are `train[offset_s : offset_s + parts[s]]`.
    parts: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Source:
    """One `--data` file and its mixing weight."""

    path: Path
    weight: float = 1.0


def parse_sources(specs: str | list[str] | None, default: Path) -> list[Source]:
    """`--data` values (`FILE` or `FILE:WEIGHT`) as sources; `default` when there are none.
    A file whose own name ends in `:<text>` is taken whole when it exists."""
    if specs is None or specs == []:
        return [Source(default)]
    sources = []
    for spec in [specs] if isinstance(specs, (str, Path)) else specs:
        spec = str(spec)
        path, sep, weight = spec.rpartition(":")
        if not sep or Path(spec).exists() or not path:
            sources.append(Source(Path(spec)))
            continue
        try:
            value = float(weight)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise TrainError(f"--data {spec!r}: the weight after ':' must be a positive number, got {weight!r}")
        sources.append(Source(Path(path), value))
    return sources


def _check_file(path: Path) -> None:
    if not path.exists():
        raise TrainError(f"{path}: no such data file")
    if path.is_dir():
        raise TrainError(f"{path}: is a directory, not a data file (JSONL or plain text)")


def json_lines(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line of a UTF-8 JSONL file; a line that
    is not JSON, or bytes that are not UTF-8, raise `TrainError` naming the file and line."""
    values = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    values.append((lineno, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise TrainError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise TrainError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return values


def read_jsonl(path: str | Path) -> list[Record]:
    """Records of a JSONL file; a line that is not a valid record raises `TrainError` naming
    the file and line. Blank lines are skipped."""
    path = Path(path)
    _check_file(path)
    return [_record(obj, f"{path}:{lineno}") for lineno, obj in json_lines(path)]


def _record(obj: object, where: str) -> Record:
    if not isinstance(obj, dict):
        raise TrainError(f'{where}: expected a JSON object with "text" or "prompt" and "response", '
                         f"got {type(obj).__name__}")
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise TrainError(f'{where}: "text" must be a string, got {type(obj["text"]).__name__}')
        label = obj.get("label")
        if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))
                                  or (isinstance(label, int) and label < 0)):
            raise TrainError(f'{where}: "label" must be a class name or a non-negative integer, got {label!r}')
        return Record(text=obj["text"], label=label)
    if "prompt" in obj or "response" in obj:
        for key in ("prompt", "response"):
            if key not in obj:
                raise TrainError(f'{where}: has "{"prompt" if key == "response" else "response"}" but no "{key}"')
            if not isinstance(obj[key], str):
                raise TrainError(f'{where}: "{key}" must be a string, got {type(obj[key]).__name__}')
        return Record(prompt=obj["prompt"], response=obj["response"])
    keys = ", ".join(sorted(obj)) or "none"
    raise TrainError(f'{where}: expected "text" or "prompt" and "response" fields, got keys: {keys}')


def read_text(path: str | Path) -> list[Record]:
    """Documents of a plain text file, separated by blank lines."""
    path = Path(path)
    _check_file(path)
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TrainError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return [Record(text=doc.strip("\n")) for doc in re.split(r"\n\s*\n", content) if doc.strip()]


def read_json(path: str | Path) -> list[Record]:
    """Records of a `.json` file holding a list of record objects."""
    path = Path(path)
    _check_file(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise TrainError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise TrainError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(content, list):
        raise TrainError(f"{path}: expected a JSON list of records (or a JSONL file, one record per line)")
    return [_record(obj, f"{path}: item {i}") for i, obj in enumerate(content)]


def read_records(path: str | Path) -> list[Record]:
    """A `.jsonl`/`.ndjson` file (one record per line), a `.json` list of records, or plain text."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        records = read_jsonl(path)
    else:
        records = read_json(path) if suffix == ".json" else read_text(path)
    if not records:
        raise TrainError(f"{path}: holds no examples")
    return records


def _special_id(tokenizer, name: str) -> int | None:
    value = getattr(tokenizer, f"{name}_token_id", None)
    return value if isinstance(value, int) else None


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its eos, else 0. A
    language model masks padded positions; a sequence classifier that pools the last token
    that is not padding is told this id (its config's `pad_token_id`)."""
    pad = _special_id(tokenizer, "pad")
    return pad if pad is not None else (_special_id(tokenizer, "eos") or 0)


def tokenize(records: list[Record], tokenizer, max_length: int) -> tuple[list[Example], dict[str, int]]:
    """Examples of at most `max_length` tokens; returns them and counts of what was cut."""
    bos, eos = _special_id(tokenizer, "bos"), _special_id(tokenizer, "eos")
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []
    stats = {"records": len(records), "split": 0, "truncated": 0, "dropped": 0}

    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    texts = [r.text for r in records if r.text is not None]
    pairs = [r for r in records if r.text is None]
    text_ids = iter(encode(texts))
    prompt_ids = iter(encode([r.prompt for r in pairs]))
    response_ids = iter(encode([r.response for r in pairs]))
    examples = []
    for record in records:
        if record.text is not None:
            ids = head + list(next(text_ids)) + tail
            labels = [IGNORE_INDEX] * len(head) + ids[len(head):]
            if len(ids) > max_length:
                stats["split"] += 1
            for start in range(0, len(ids), max_length):
                piece = Example(ids[start:start + max_length], labels[start:start + max_length])
                if len(piece) > 1:
                    examples.append(piece)
        else:
            prompt = head + list(next(prompt_ids))
            response = list(next(response_ids)) + tail
            ids = prompt + response
            labels = [IGNORE_INDEX] * len(prompt) + response
            if len(ids) > max_length:
                stats["truncated"] += 1
                ids, labels = ids[:max_length], labels[:max_length]
            if all(label == IGNORE_INDEX for label in labels[1:]):
                stats["dropped"] += 1  # the prompt fills max_length: nothing left to learn
                continue
            examples.append(Example(ids, labels))
    return examples, stats


def label_names(records: list[Record], where: str) -> list[str]:
    """The classes of a classification data set, in index order: `0 .. max` for integer
    labels, else the sorted names. Every record needs a label, all of one kind."""
    labels = []
    for i, record in enumerate(records):
        if record.label is None or record.text is None:
            raise TrainError(f'{where}: record {i + 1} has no "label" (--task seq-cls needs "text" and "label")')
        labels.append(record.label)
    if all(isinstance(label, int) for label in labels):
        return [str(i) for i in range(max(labels) + 1)]
    if all(isinstance(label, str) for label in labels):
        return sorted(set(labels))
    raise TrainError(f"{where}: mixes integer and named labels")


def classify(records: list[Record], tokenizer, max_length: int, classes: list[str],
             where: str) -> tuple[list[Example], dict[str, int]]:
    """Classification examples: each text as the tokenizer encodes a single sequence (with its
    own special tokens: BERT's [CLS] and [SEP], Llama's bos), truncated to `max_length`, with
    its class index in `classes`."""
    index = {name: i for i, name in enumerate(classes)}
    stats = {"records": len(records), "split": 0, "truncated": 0, "dropped": 0}
    ids_list = tokenizer([r.text for r in records])["input_ids"] if records else []
    examples = []
    for i, (record, ids) in enumerate(zip(records, ids_list, strict=True)):
        if record.label is None:
            raise TrainError(f'{where}: record {i + 1} has no "label" (--task seq-cls needs "text" and "label")')
        key = str(record.label)
        if key not in index:
            raise TrainError(f"{where}: record {i + 1} has the label {record.label!r}, not one of the training "
                             f"data's classes ({', '.join(classes)})")
        tokens = list(ids)
        if len(tokens) > max_length:
            stats["truncated"] += 1
            tokens = tokens[:max_length]
        examples.append(Example(tokens, [], label=index[key]))
    return examples, stats


def split(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A held-out eval split of `round(eval_fraction * n)` examples (at least one when the
    fraction is positive and there are two or more), drawn with `seed`."""
    n = len(examples)
    if eval_fraction <= 0 or n < 2:
        return examples, []
    n_eval = min(n - 1, max(1, round(eval_fraction * n)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Concatenates the examples and cuts rows of `max_length` tokens (the last may be shorter)."""
    ids = [t for e in examples for t in e.input_ids]
    labels = [t for e in examples for t in e.labels]
    rows = [Example(ids[i:i + max_length], labels[i:i + max_length]) for i in range(0, len(ids), max_length)]
    return [r for r in rows if len(r) > 1]


def load_dataset(path: str | Path, tokenizer, max_length: int, packing: bool, eval_fraction: float, seed: int,
                 records: list[Record] | None = None, classes: list[str] | None = None) -> Dataset:
    """With `classes`, a classification data set (never packed)."""
    records = read_records(path) if records is None else records
    if classes is not None:
        examples, stats = classify(records, tokenizer, max_length, classes, str(path))
        packing = False
    else:
        examples, stats = tokenize(records, tokenizer, max_length)
    if not examples:
        raise TrainError(f"{path}: no example has a token to train on within --max-length {max_length}")
    train, held = split(examples, eval_fraction, seed)
    if packing:
        train, held = pack(train, max_length), pack(held, max_length)
    pad = pad_id(tokenizer)
    stats.update(examples=len(examples), train_rows=len(train), eval_rows=len(held),
                 train_tokens=sum(len(e) for e in train))
    return Dataset(train=train, eval=held, pad_id=pad, source=str(path), stats=stats)


def load_mixture(sources: list[Source], tokenizer, max_length: int, packing: bool, eval_fraction: float,
                 seed: int, records: list[list[Record]] | None = None, classes: list[str] | None = None) -> Dataset:
    """One source: `load_dataset`. Several: each loaded on its own (its held-out split
    included), their training rows concatenated with `parts` and `weights` set for
    `MixedSampler`, their eval rows concatenated."""
    records = records or [None] * len(sources)
    sets = [load_dataset(src.path, tokenizer, max_length, packing, eval_fraction, seed, records=recs, classes=classes)
            for src, recs in zip(sources, records, strict=True)]
    if len(sets) == 1:
        return sets[0]
    stats = {key: sum(d.stats.get(key, 0) for d in sets) for key in sets[0].stats}
    total = sum(src.weight for src in sources)
    return Dataset(train=[e for d in sets for e in d.train], eval=[e for d in sets for e in d.eval],
                   pad_id=sets[0].pad_id, stats=stats,
                   source=" + ".join(f"{src.path} ({src.weight / total:.0%})" for src in sources),
                   parts=[len(d.train) for d in sets], weights=[src.weight for src in sources])


def loss_tokens(examples: list[Example]) -> int:
    """Tokens that carry a loss: labels after the causal shift that are not ignored (for
    classification examples: the examples whose class is not ignored)."""
    return sum((e.label != IGNORE_INDEX) if e.label is not None else
               sum(1 for label in e.labels[1:] if label != IGNORE_INDEX) for e in examples)


def collate(examples: list[Example], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (padding: IGNORE_INDEX); for
    classification examples `labels` holds one class per row."""
    length = max(len(e) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e)] = torch.tensor(e.input_ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels, dtype=torch.long)
        mask[i, :len(e)] = 1
    if examples[0].label is not None:
        labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


class Sampler:
    """The endless seeded order of training rows (see the module docstring)."""

    def __init__(self, num_rows: int, seed: int) -> None:
        if num_rows < 1:
            raise TrainError("the training split is empty")
        self.num_rows, self.seed = num_rows, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._perms[epoch] = torch.randperm(self.num_rows, generator=gen).tolist()
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        """Row indices of global samples `start .. start + count`."""
        return [self._perm(i // self.num_rows)[i % self.num_rows] for i in range(start, start + count)]

    def epoch(self, samples_seen: int) -> float:
        return samples_seen / self.num_rows


class MixedSampler:
    """The endless seeded order of training rows drawn from several sources by weight (see
    the module docstring); `indices` returns rows of the concatenated training split."""

    CHUNK = 4096  # positions whose sources are drawn together

    def __init__(self, parts: list[int], weights: list[float], seed: int) -> None:
        if any(n < 1 for n in parts):
            raise TrainError("a --data source has no training rows")
        self.seed, self.num_rows = seed, sum(parts)
        self.offsets = [sum(parts[:s]) for s in range(len(parts))]
        # Each source's own endless order, with a seed of its own.
        self.sources = [Sampler(n, seed + 1_000_003 * (s + 1)) for s, n in enumerate(parts)]
        self.probs = torch.tensor(weights, dtype=torch.float64)
        self._drawn: dict[int, tuple[list[int], list[int]]] = {}
        self._before: list[list[int]] = [[0] * len(parts)]  # draws per source before each chunk

    def _chunk(self, c: int) -> tuple[list[int], list[int]]:
        """(source, that source's draw number within the chunk) of every position of chunk `c`."""
        if c not in self._drawn:
            if len(self._drawn) > 2:
                self._drawn.clear()
            gen = torch.Generator().manual_seed(self.seed * 7919 + c)
            source = torch.multinomial(self.probs, self.CHUNK, replacement=True, generator=gen)
            onehot = torch.nn.functional.one_hot(source, len(self.sources))
            nth = onehot.cumsum(0).gather(1, source[:, None]).squeeze(1) - 1
            self._drawn[c] = (source.tolist(), nth.tolist())
        return self._drawn[c]

    def _draws_before(self, c: int) -> list[int]:
        while len(self._before) <= c:
            source, _ = self._chunk(len(self._before) - 1)
            counts = torch.bincount(torch.tensor(source), minlength=len(self.sources)).tolist()
            self._before.append([a + b for a, b in zip(self._before[-1], counts, strict=True)])
        return self._before[c]

    def source_of(self, i: int) -> int:
        """The source global sample `i` is drawn from."""
        return self._chunk(i // self.CHUNK)[0][i % self.CHUNK]

    def indices(self, start: int, count: int) -> list[int]:
        rows = []
        for i in range(start, start + count):
            c, j = divmod(i, self.CHUNK)
            before = self._draws_before(c)
            source, nth = self._chunk(c)
            s = source[j]
            rows.append(self.offsets[s] + self.sources[s].indices(before[s] + nth[j], 1)[0])
        return rows

    def epoch(self, samples_seen: int) -> float:
        return samples_seen / self.num_rows


def sampler_for(dataset: Dataset, seed: int) -> Sampler | MixedSampler:
    """The order of `dataset`'s training rows: one source's `Sampler`, or a mixture's."""
    if len(dataset.parts) > 1:
        return MixedSampler(dataset.parts, dataset.weights, seed)
    return Sampler(len(dataset.train), seed)


def micro_batches(rows: list[int], batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """This rank's micro-batches of one global batch: micro-batch `m` of rank `r` is the
    `m * world_size + r`-th run of `batch_size` rows."""
    per_micro = batch_size * world_size
    return [rows[m + rank * batch_size:m + (rank + 1) * batch_size] for m in range(0, len(rows), per_micro)]


def eval_batches(num_rows: int, batch_size: int, rank: int, world_size: int) -> list[list[int | None]]:
    """This rank's eval batches: rows `rank, rank + world_size, ...`; every rank gets the same
    number of batches (a sharded model runs collectives in forward), `None` marks filler."""
    mine = list(range(rank, num_rows, world_size))
    per_rank = math.ceil(num_rows / world_size)
    mine += [None] * (per_rank - len(mine))
    return [mine[i:i + batch_size] for i in range(0, per_rank, batch_size)]
