"""`fastlora.train`: a minimal but complete QLoRA fine-tuning loop.

The base model's linear layers become frozen 4-bit `Linear4bit` layers with trainable LoRA
adapters (`fastlora.prepare_model`); AdamW updates the adapters only, under a linear-warmup
plus cosine learning-rate schedule, with gradient accumulation, gradient clipping, gradient
checkpointing (Hugging Face's, non-reentrant; see `CHECKPOINT_POLICIES` for what backward
recomputes), bf16 autocast on GPU and on CPUs with native bf16 (AMX or AVX512-BF16), fp32 on
other CPUs. The loss
of a step is the mean over every loss-carrying token of the global batch, however it is
split into micro-batches and processes, so `--grad-accum` and `torchrun` change the
arithmetic's order but not the result.

Every step appends a record to `<output-dir>/metrics.jsonl` (and, with `report_to`, to
TensorBoard); evals cover the held-out split, the named `eval_data` sets and the
`sample_prompts` generations; early stopping keeps the best adapter in `<output-dir>/best`
(`fastlora.train.early_stopping`); several `data` sources are mixed by weight
(`fastlora.train.data`). Checkpoints (`fastlora.train.checkpoint`) let `resume` continue a
run to the same result; the final adapter goes to `<output-dir>/adapter` in PEFT's format,
and with `merge` the merged dense model to `<output-dir>/merged`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from .. import _native
from ..adapter import load_adapter, save_adapter
from ..model import dequantize_model, lora_layers, merge_and_unload, prepare_model
from . import checkpoint, data, distributed, modeling, report
from .distributed import DistInfo
from .early_stopping import BEST_DIR, EarlyStopping, check_metric, write_best
from .errors import TrainError
from .generate import continue_prompts, read_prompts

METRICS_NAME = "metrics.jsonl"
CONFIG_NAME = "train_config.json"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
PRECISIONS = ("auto", "fp32", "bf16")
# What backward recomputes under gradient checkpointing. "full": every activation inside a
# decoder layer (Hugging Face's default; least memory). "selective": everything but the
# outputs of fastlora's 4-bit layers, which are kept from the forward pass: the recompute
# skips those matmuls, a third of a step's matmul work, for the memory of the layers'
# outputs (the 92M Llama of benches/train_compare.py, 8x128 tokens, 2-core CPU: steps ~1.35x
# faster than with "full", +~0.3-0.4 GB peak). "auto": selective on CPU, where compute is
# short and memory is not; full on GPU, where memory is what QLoRA saves.
CHECKPOINT_POLICIES = ("auto", "full", "selective")
QUANT_TYPES = ("nf4", "fp4")
# causal-lm: next-token loss on text or prompt/response records; seq-cls: a sequence classifier
# (AutoModelForSequenceClassification, its head trained whole) on text/label records.
TASKS = ("causal-lm", "seq-cls")
# The classifier heads of transformers' sequence classifiers (PEFT's SEQ_CLS defaults).
CLASSIFIER_HEADS = ["score", "classifier"]


@dataclass
class TrainConfig:
    """Every option of `fastlora train` (the CLI's `--max-steps` is `max_steps` here)."""

    model: str | None = None  # a local directory, a Hub id, or None: the embedded tiny Llama
    data: str | list[str] | None = None  # FILE or FILE:WEIGHT (several: mixed by weight); None: the shipped set
    task: str = "causal-lm"  # see TASKS
    output_dir: str = "fastlora-output"
    max_steps: int = 100
    batch_size: int = 8  # per process and micro-batch
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0  # 0: no clipping (the norm is still logged)
    grad_spike_factor: float = 10.0  # a grad norm over this factor of its running median: a warning (0: off)
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: str = "all-linear"
    quant_type: str = "nf4"
    double_quant: bool = True
    max_length: int = 128
    packing: bool = True
    eval_fraction: float = 0.05
    eval_data: list[str] | None = None  # NAME=FILE sets evaluated beside the held-out split (base level at step 0)
    eval_steps: int = 25  # 0: evaluate only after the last step
    early_stopping_patience: int = 0  # evals without improvement before stopping (0: no early stopping)
    early_stopping_metric: str = "eval_loss"  # eval_loss, eval_NAME_loss/_ppl (seq-cls: also _accuracy, _macro_f1)
    early_stopping_min_delta: float = 0.0  # an improvement must exceed this
    load_best: bool = True  # with early stopping: adapter/ and the returned model hold the best adapter
    sample_prompts: str | None = None  # a prompts file: greedy continuations logged at every eval
    sample_max_new_tokens: int = 32
    report_to: str = "none"  # "tensorboard": the metrics also as event files in <output-dir>/runs
    save_steps: int = 50  # 0: no intermediate checkpoints
    save_total_limit: int = 2  # 0: keep all
    seed: int = 42
    resume: bool | str = False  # True: the last checkpoint in output_dir; a path: that checkpoint
    overwrite: bool = False
    merge: bool = False
    gradient_checkpointing: bool = True
    checkpoint_policy: str = "auto"  # see CHECKPOINT_POLICIES
    precision: str = "auto"  # auto: bf16 autocast on GPU and native-bf16 CPUs, else fp32
    distributed: str = "auto"  # auto: DDP when WORLD_SIZE > 1
    device: str = "auto"
    progress: bool = True


@dataclass
class TrainResult:
    model: nn.Module  # the trained model (sharded under FSDP)
    tokenizer: object
    output_dir: Path
    adapter_dir: Path
    merged_dir: Path | None
    step: int
    metrics: list[dict] = field(default_factory=list)  # this run's records (rank 0; empty elsewhere)
    loss: float | None = None
    eval_loss: float | None = None
    wrapped_model: nn.Module | None = None  # the model as trained: DDP's wrapper, FSDP's sharded model
    best_step: int | None = None  # with early stopping: the step of the best eval (held by adapter/ by default)
    best_score: float | None = None
    stopped_early: bool = False


def _check_config(cfg: TrainConfig) -> None:
    def number(name: str, kind: type, low: float, high: float = math.inf, low_open: bool = False,
               high_open: bool = False) -> None:
        value = getattr(cfg, name)
        ok = not isinstance(value, bool) and isinstance(value, (int,) if kind is int else (int, float))
        ok = ok and math.isfinite(value) if ok and kind is float else ok
        ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not ok:
            span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise TrainError(f"--{name.replace('_', '-')} must be {'an integer' if kind is int else 'a number'} "
                             f"in {span}, got {value!r}")

    for name in ("max_steps", "batch_size", "grad_accum", "lora_r"):
        number(name, int, 1)
    number("max_length", int, 2)
    for name in ("eval_steps", "save_steps", "save_total_limit", "seed", "early_stopping_patience"):
        number(name, int, 0)
    number("sample_max_new_tokens", int, 1)
    number("early_stopping_min_delta", float, 0)
    number("lr", float, 0, low_open=True)
    number("lora_alpha", float, 0, low_open=True)
    number("weight_decay", float, 0)
    number("max_grad_norm", float, 0)
    number("grad_spike_factor", float, 0)
    number("warmup_ratio", float, 0, 1)
    number("eval_fraction", float, 0, 0.5)
    number("lora_dropout", float, 0, 1, high_open=True)
    if cfg.task not in TASKS:
        raise TrainError(f"--task: expected one of {', '.join(TASKS)}, got {cfg.task!r}")
    if cfg.task == "seq-cls" and cfg.sample_prompts:
        raise TrainError("--sample-prompts: a sequence classifier does not generate text (--task seq-cls)")
    if cfg.task == "seq-cls" and cfg.data is None:
        raise TrainError("--task seq-cls needs --data: JSONL records with \"text\" and \"label\"")
    if cfg.quant_type not in QUANT_TYPES:
        raise TrainError(f"--quant-type: expected one of {', '.join(QUANT_TYPES)}, got {cfg.quant_type!r}")
    if cfg.checkpoint_policy not in CHECKPOINT_POLICIES:
        raise TrainError(f"--checkpoint-policy: expected one of {', '.join(CHECKPOINT_POLICIES)}, "
                         f"got {cfg.checkpoint_policy!r}")
    if cfg.precision not in PRECISIONS:
        raise TrainError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    check_metric(cfg.early_stopping_metric, list(eval_sets(cfg.eval_data)), cfg.task)
    if cfg.task == "seq-cls" and cfg.distributed == "fsdp":
        # The head trained whole is a sharded parameter of the root: saving it is not wired.
        raise TrainError("--task seq-cls runs single-process or with --distributed ddp, not fsdp")
    data.parse_sources(cfg.data, modeling.default_data_path())
    report.check(cfg.report_to)
    if cfg.distributed not in distributed.MODES:
        raise TrainError(f"--distributed: expected one of {', '.join(distributed.MODES)}, got {cfg.distributed!r}")


def lr_lambda(max_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """Linear warmup from lr/(warmup+1) to lr over `round(warmup_ratio * max_steps)` steps,
    then a cosine decay towards 0 at `max_steps`."""
    warmup = round(warmup_ratio * max_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, max_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: allocated CUDA memory on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross entropy over the labels that are not ignored (fp32)."""
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1),
                           ignore_index=data.IGNORE_INDEX, reduction="sum")


class Trainer:
    """The step and evaluation of a prepared model: any causal LM taking `input_ids` and
    `attention_mask` and returning `.logits` (a fastlora model, or another QLoRA stack for a
    comparison). Optimizes the parameters that require grad."""

    def __init__(self, model: nn.Module, dataset: data.Dataset, cfg: TrainConfig, info: DistInfo,
                 autocast_dtype: torch.dtype | None = None) -> None:
        self.model, self.dataset, self.cfg, self.info = model, dataset, cfg, info
        self.autocast_dtype = autocast_dtype
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise TrainError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           betas=(0.9, 0.999), eps=1e-8)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.max_steps, cfg.warmup_ratio))
        self.sampler = data.sampler_for(dataset, cfg.seed)
        self.global_batch = cfg.batch_size * cfg.grad_accum * info.world_size

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.autocast_dtype)

    def _batch(self, examples: list[data.Example]) -> dict[str, torch.Tensor]:
        batch = data.collate(examples, self.dataset.pad_id, self.info.device)
        if bool(batch["attention_mask"].all()):
            batch["attention_mask"] = None  # packed full rows: plain causal attention
        return batch

    def _forward_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self._autocast():
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return token_loss_sum(out.logits, batch["labels"])

    def train_step(self, samples_seen: int) -> dict[str, float]:
        """One optimizer step on global samples `samples_seen .. + global_batch`."""
        info, cfg = self.info, self.cfg
        start = time.perf_counter()
        rows = self.sampler.indices(samples_seen, self.global_batch)
        train = self.dataset.train
        n_loss = data.loss_tokens([train[i] for i in rows])  # the same on every rank
        scale = info.world_size / max(n_loss, 1)  # DDP/FSDP average over ranks: make it a token mean
        micro = data.micro_batches(rows, cfg.batch_size, info.rank, info.world_size)
        loss_sum, tokens = 0.0, 0
        self.model.train()
        for j, mb in enumerate(micro):
            batch = self._batch([train[i] for i in mb])
            with distributed.sync_context(self.model, info, sync=j == len(micro) - 1):
                loss = self._forward_loss(batch)
                (loss * scale).backward()
            loss_sum += loss.item()
            tokens += int(batch["input_ids"].numel() if batch["attention_mask"] is None
                          else batch["attention_mask"].sum())
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        norm = float(distributed.full_tensor(norm))
        loss_sum, tokens = distributed.all_reduce_sum(info, [loss_sum, float(tokens)])
        if not (math.isfinite(loss_sum) and math.isfinite(norm)):
            # Before the optimizer step: the weights (and the last checkpoint) stay as they were.
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteStep(f"loss {loss_sum / max(n_loss, 1):.4g}, gradient norm {norm:.4g}")
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if info.device.type == "cuda":
            torch.cuda.synchronize(info.device)
        elapsed = time.perf_counter() - start
        return {"loss": loss_sum / max(n_loss, 1), "lr": lr, "grad_norm": norm, "tokens": int(tokens),
                "loss_tokens": n_loss, "tokens_per_sec": tokens / elapsed, "step_time_s": elapsed}

    @torch.no_grad()
    def evaluate(self, held: list[data.Example] | None = None) -> float | None:
        """Token-mean loss over `held` (default: the eval split), sharded over ranks."""
        held = self.dataset.eval if held is None else held
        if not held:
            return None
        self.model.eval()
        total, count = 0.0, 0
        for ids in data.eval_batches(len(held), self.cfg.batch_size, self.info.rank, self.info.world_size):
            filler = data.Example(held[0].input_ids, [data.IGNORE_INDEX] * len(held[0]))
            examples = [held[i] if i is not None else filler for i in ids]
            total += self._forward_loss(self._batch(examples)).item()
            count += data.loss_tokens(examples)
        self.model.train()
        total, count = distributed.all_reduce_sum(self.info, [total, float(count)])
        return total / max(count, 1)


class ClassifierTrainer(Trainer):
    """The step and evaluation of a sequence classifier (`.logits` of shape (batch, classes)):
    summed cross entropy over the examples, and eval accuracy and macro F1 beside the loss."""

    def __init__(self, model: nn.Module, dataset: data.Dataset, cfg: TrainConfig, info: DistInfo,
                 autocast_dtype: torch.dtype | None = None, num_classes: int = 2) -> None:
        super().__init__(model, dataset, cfg, info, autocast_dtype)
        self.num_classes = num_classes
        self.scores: dict[str, float] = {}

    def _logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self._autocast():
            return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    @staticmethod
    def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, ignore_index=data.IGNORE_INDEX, reduction="sum")

    def _forward_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._loss(self._logits(batch), batch["labels"])

    @torch.no_grad()
    def evaluate(self, held: list[data.Example] | None = None) -> float | None:
        """Example-mean loss over `held` (default: the eval split); `scores` then holds its
        `accuracy` and `macro_f1` (F1 averaged over the classes that occur in `held` or in
        the predictions)."""
        held = self.dataset.eval if held is None else held
        if not held:
            self.scores = {}
            return None
        self.model.eval()
        classes = self.num_classes
        total, count = 0.0, 0
        confusion = torch.zeros(classes, classes, dtype=torch.float64)  # [true, predicted]
        for ids in data.eval_batches(len(held), self.cfg.batch_size, self.info.rank, self.info.world_size):
            filler = data.Example(held[0].input_ids, [], label=data.IGNORE_INDEX)
            examples = [held[i] if i is not None else filler for i in ids]
            batch = self._batch(examples)
            logits = self._logits(batch)
            total += self._loss(logits, batch["labels"]).item()
            count += data.loss_tokens(examples)
            kept = batch["labels"] != data.IGNORE_INDEX
            predicted = logits.argmax(-1)[kept].cpu()
            confusion.index_put_((batch["labels"][kept].cpu(), predicted), torch.ones(len(predicted),
                                 dtype=torch.float64), accumulate=True)
        self.model.train()
        total, count, *cells = distributed.all_reduce_sum(self.info, [total, float(count)]
                                                          + confusion.flatten().tolist())
        confusion = torch.tensor(cells, dtype=torch.float64).reshape(classes, classes)
        hits = confusion.diag()
        support, predicted = confusion.sum(1), confusion.sum(0)
        present = (support + predicted) > 0
        f1 = 2 * hits / (support + predicted).clamp(min=1)
        self.scores = {"accuracy": float(hits.sum() / confusion.sum().clamp(min=1)),
                       "macro_f1": float(f1[present].mean()) if bool(present.any()) else 0.0}
        return total / max(count, 1)


_EVAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def eval_sets(specs: list[str] | None) -> dict[str, Path]:
    """`--eval-data NAME=FILE` values as {name: file}; TrainError naming the bad one."""
    sets: dict[str, Path] = {}
    for spec in specs or ():
        name, sep, file = str(spec).partition("=")
        if not sep or not _EVAL_NAME.fullmatch(name) or not file:
            raise TrainError(f"--eval-data {spec!r}: expected NAME=FILE (NAME of letters, digits, _ and -)")
        if name in sets:
            raise TrainError(f"--eval-data {spec!r}: the name {name!r} is given twice")
        path = Path(file).expanduser()
        if not path.is_file():
            raise TrainError(f"--eval-data {spec!r}: {file}: no such eval data file")
        sets[name] = path
    return sets


def _split_eval(trainer: Trainer) -> dict[str, float]:
    """`eval_loss` of the held-out split (a classifier's also `eval_accuracy` and
    `eval_macro_f1`); empty without a split."""
    loss = trainer.evaluate()
    if loss is None:
        return {}
    scores = trainer.scores if isinstance(trainer, ClassifierTrainer) else {}
    return {"eval_loss": loss, **{f"eval_{key}": value for key, value in scores.items()}}


def _evaluate_named(trainer: Trainer, named: dict[str, list[data.Example]]) -> dict[str, float]:
    """`eval_NAME_loss` and `eval_NAME_ppl` for every named eval set (a classifier's:
    `eval_NAME_loss`, `eval_NAME_accuracy` and `eval_NAME_macro_f1`)."""
    out: dict[str, float] = {}
    for name, held in named.items():
        loss = trainer.evaluate(held)
        out[f"eval_{name}_loss"] = loss
        if isinstance(trainer, ClassifierTrainer):
            out.update({f"eval_{name}_{key}": value for key, value in trainer.scores.items()})
        else:
            out[f"eval_{name}_ppl"] = math.exp(min(loss, 700.0))
    return out


class NonFiniteStep(TrainError):
    """A step whose loss or gradient norm is NaN or Inf (the optimizer did not step)."""


class SpikeWatch:
    """Flags a gradient norm over `factor` times the median of the last `window` norms."""

    def __init__(self, factor: float, window: int = 50, warmup: int = 5) -> None:
        self.factor, self.window, self.warmup = factor, window, warmup
        self.norms: list[float] = []

    def check(self, norm: float) -> str | None:
        warning = None
        if self.factor > 0 and len(self.norms) >= self.warmup:
            median = statistics.median(self.norms)
            if median > 0 and norm > self.factor * median:
                warning = f"gradient norm {norm:.4g} is {norm / median:.1f}x its running median {median:.4g}"
        self.norms = (self.norms + [norm])[-self.window:]
        return warning


def _log(info: DistInfo, message: str) -> None:
    if info.is_main:
        from tqdm import tqdm

        tqdm.write(f"fastlora train: {message}", file=sys.stderr)


def _prepare_output(cfg: TrainConfig, info: DistInfo) -> tuple[Path, Path | None]:
    """The output directory and the checkpoint to resume from (None: a fresh start)."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--output-dir {out}: exists and is not a directory")
    if cfg.resume:
        if isinstance(cfg.resume, str):
            ckpt = Path(cfg.resume)
            if not (ckpt / checkpoint.STATE_NAME).is_file():
                raise TrainError(f"--resume {ckpt}: not a checkpoint directory (no {checkpoint.STATE_NAME})")
            return out, ckpt
        ckpt = checkpoint.last_checkpoint(out)
        if ckpt is None:
            _log(info, f"no checkpoint in {out}: starting from step 0")
        return out, ckpt
    previous = [p for p in (out / METRICS_NAME, out / ADAPTER_DIR, out / BEST_DIR) if p.exists()] + [
        p for _, p in checkpoint.list_checkpoints(out)]
    if previous and not cfg.overwrite:
        raise TrainError(f"--output-dir {out}: holds a previous run ({previous[0].name}); pass --resume to "
                         "continue it or --overwrite to start over")
    if previous and info.is_main:
        for p in previous + [out / MERGED_DIR]:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    return out, None


def _truncate_metrics(path: Path, step: int) -> None:
    """Keeps the records of steps up to `step` (a resumed run rewrites those after)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", math.inf) <= step:
                kept.append(line)
        except ValueError:
            continue
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _precision(cfg: TrainConfig, info: DistInfo) -> torch.dtype | None:
    """The autocast dtype (None: fp32 throughout). `auto` picks bf16 where it runs natively:
    a GPU with bf16, or a CPU with AMX-BF16 or AVX512-BF16 (there torch's bf16 GEMM is
    several times its fp32 speed; elsewhere on a CPU it is slower than fp32), and says so."""
    if cfg.precision == "fp32":
        return None
    if cfg.precision == "bf16":
        return torch.bfloat16
    if info.device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if info.device.type == "cpu" and _native.native_bf16():
        _log(info, "--precision auto: bf16 autocast (this CPU multiplies bf16 natively); --precision fp32 to keep fp32")
        return torch.bfloat16
    return None


def _build(cfg: TrainConfig, info: DistInfo, autocast_dtype: torch.dtype | None,
           classes: list[str] | None = None) -> tuple[nn.Module, object, str]:
    """The model with LoRA adapters over 4-bit layers, on the device. With `classes`, a
    sequence classifier over them, its head trained whole."""
    load_dtype = torch.bfloat16 if autocast_dtype is torch.bfloat16 and info.device.type == "cuda" else torch.float32
    target = modeling.parse_target_modules(cfg.target_modules)
    lora = dict(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout)
    head = modeling.classifier_options(classes) if classes is not None else {}
    # A checkpoint is quantized while it loads (or read as stored, when it is a bitsandbytes
    # 4-bit one): the dense model never sits in memory. The embedded model is built here.
    quantization = None if cfg.model is None else dict(
        quant_type=cfg.quant_type, compress_statistics=cfg.double_quant, target_modules=target,
        compute_dtype=autocast_dtype, skip_modules=CLASSIFIER_HEADS if classes is not None else None, **head)
    model, tokenizer, name = modeling.load_model(cfg.model, load_dtype, quantization, head)
    if classes is not None:
        # Llama-style classifiers pool the last token that is not padding: the id the batches pad with.
        model.config.pad_token_id = data.pad_id(tokenizer)
    modeling.check_target_modules(model, target)
    model.to(info.device)
    torch.manual_seed(cfg.seed)  # the LoRA initialization
    try:
        prepare_model(model, target_modules=target, quant_type=cfg.quant_type, compress_statistics=cfg.double_quant,
                      compute_dtype=autocast_dtype, modules_to_save=CLASSIFIER_HEADS if classes is not None else None,
                      **lora)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    return model, tokenizer, name


def _merge(cfg: TrainConfig, adapter_dir: Path, out_dir: Path, tokenizer, autocast_dtype,
           classes: list[str] | None) -> Path:
    """Reloads the base model, applies the saved adapter (and trained head) and writes the
    merged dense model."""
    load_dtype = torch.bfloat16 if autocast_dtype is torch.bfloat16 and torch.cuda.is_available() else torch.float32
    head = modeling.classifier_options(classes) if classes is not None else None
    model, _, _ = modeling.load_model(cfg.model, load_dtype, head=head)  # a 4-bit checkpoint: its base as trained
    if classes is not None:
        model.config.pad_token_id = data.pad_id(tokenizer)
    load_adapter(model, adapter_dir, compute_dtype=autocast_dtype)
    merge_and_unload(model)
    if getattr(model, "hf_quantizer", None) is not None:
        model.dequantize()  # the other 4-bit layers too, and the quantization config goes
    else:
        dequantize_model(model)
    model.config.use_cache = True
    tmp = out_dir / f".{MERGED_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    final = out_dir / MERGED_DIR
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def checkpoint_policy(policy: str, device: torch.device) -> str:
    """The policy "auto" stands for on `device`: "selective" on CPU, "full" elsewhere."""
    if policy == "auto":
        return "selective" if device.type == "cpu" else "full"
    return policy


# The ops whose outputs selective checkpointing keeps (registered by `..model`'s imports).
_SAVED_OPS = frozenset((torch.ops.fastlora.lora_linear_4bit.default, torch.ops.fastlora.matmul_4bit.default))


def _keep_4bit_layer_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing: fastlora's 4-bit layers' outputs are saved, the rest recomputed
    (called for every op inside a checkpointed layer)."""
    if op in _SAVED_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def enable_gradient_checkpointing(model: nn.Module, info: DistInfo | None = None, policy: str = "full") -> bool:
    """Hugging Face's activation checkpointing, non-reentrant (it recomputes fastlora's custom
    ops like any other; the reentrant form would also need inputs that require grad).
    `policy` is "full" or "selective" (see `CHECKPOINT_POLICIES`)."""
    kwargs: dict = {"use_reentrant": False}
    if policy == "selective":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _keep_4bit_layer_outputs)
    elif policy != "full":
        raise ValueError(f"policy must be 'full' or 'selective', got {policy!r}")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        if info is not None:
            _log(info, f"{type(model).__name__} has no gradient checkpointing: training without it")
        return False
    return True


def _lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every LoRA weight, whole (gathered under FSDP: all ranks must call this)."""
    out = {}
    for name, layer in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            out[f"{name}.{part}"] = distributed.full_tensor(getattr(layer, part).weight.detach()).cpu()
    return out


@contextlib.contextmanager
def _whole_lora(model: nn.Module, tensors: dict[str, torch.Tensor]):
    """Temporarily shows `save_adapter` whole LoRA weights in place of FSDP's shards."""
    swapped = []
    try:
        for name, layer in lora_layers(model).items():
            for part in ("lora_A", "lora_B"):
                module = getattr(layer, part)
                swapped.append((module, module._parameters["weight"]))
                module._parameters["weight"] = nn.Parameter(tensors[f"{name}.{part}"], requires_grad=False)
        yield
    finally:
        for module, param in swapped:
            module._parameters["weight"] = param


def _adapter_writer(model: nn.Module, info: DistInfo) -> Callable[[Path], None]:
    """A function writing the adapter (on rank 0); under FSDP the weights are gathered now,
    on every rank."""
    bare = distributed.unwrap(model)
    if info.mode != "fsdp":
        return lambda path: save_adapter(bare, path)
    tensors = _lora_tensors(bare)

    def write(path: Path) -> None:
        with _whole_lora(bare, tensors):
            save_adapter(bare, path)

    return write


def _summary(model: nn.Module) -> str:
    layers = lora_layers(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in model.parameters())
    return f"{total / 1e6:.1f}M parameters, {len(layers)} LoRA layers, {trainable / 1e6:.3f}M trainable"


def train(config: TrainConfig | None = None, *, callback: Callable[[dict], object] | None = None,
          **options) -> TrainResult:
    """Fine-tunes a causal LM with QLoRA; see `TrainConfig` for the options (keyword
    arguments override `config`'s). `callback(record)` is called after each step with the
    step's metrics record (after its checkpoint, if any, is written); an exception it raises
    stops training (as an interruption would). Under `torchrun`, every process calls this."""
    cfg = replace(config or TrainConfig(), **options)
    _check_config(cfg)
    info = distributed.setup(cfg.distributed, cfg.device)
    try:
        return _train(cfg, info, callback)
    finally:
        distributed.teardown(info)


def _train(cfg: TrainConfig, info: DistInfo, callback) -> TrainResult:
    sources = data.parse_sources(cfg.data, modeling.default_data_path())
    records = [data.read_records(src.path) for src in sources]  # a bad file fails before the model loads
    prompts = read_prompts(cfg.sample_prompts) if cfg.sample_prompts else []
    out, resume_from = _prepare_output(cfg, info)
    distributed.barrier(info)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    autocast_dtype = _precision(cfg, info)
    classes = data.label_names([r for recs in records for r in recs], " + ".join(str(s.path) for s in sources)) \
        if cfg.task == "seq-cls" else None
    model, tokenizer, name = _build(cfg, info, autocast_dtype, classes)
    dataset = data.load_mixture(sources, tokenizer, cfg.max_length, cfg.packing, cfg.eval_fraction, cfg.seed,
                                records=records, classes=classes)
    tracker = None
    if cfg.early_stopping_patience:
        if cfg.early_stopping_metric == "eval_loss" and not dataset.eval:
            raise TrainError("--early-stopping-metric eval_loss: there is no held-out split (--eval-fraction 0, "
                             "or a single example); raise --eval-fraction or follow an --eval-data set's metric")
        tracker = EarlyStopping(cfg.early_stopping_metric, cfg.early_stopping_patience, cfg.early_stopping_min_delta)
    # Named eval sets: every row of each file (none held back), packed as the training data is.
    named = {name: data.load_dataset(path, tokenizer, cfg.max_length, cfg.packing, 0.0, cfg.seed,
                                     classes=classes).train
             for name, path in eval_sets(cfg.eval_data).items()}
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    policy = checkpoint_policy(cfg.checkpoint_policy, info.device)
    checkpointing = cfg.gradient_checkpointing and enable_gradient_checkpointing(model, info, policy)
    state = {"step": 0, "samples_seen": 0}
    if resume_from is not None:
        state = checkpoint.read_state(resume_from)
        try:
            load_adapter(model, resume_from / checkpoint.ADAPTER_DIR)
        except (ValueError, FileNotFoundError) as exc:
            raise TrainError(f"--resume: the checkpoint's adapter does not fit ({exc})") from None
    wrapped = distributed.wrap(model, info)
    trainer = Trainer(wrapped, dataset, cfg, info, autocast_dtype) if classes is None else \
        ClassifierTrainer(wrapped, dataset, cfg, info, autocast_dtype, num_classes=len(classes))
    torch.manual_seed(cfg.seed + info.rank)
    random.seed(cfg.seed + info.rank)
    if resume_from is not None:
        checkpoint.load_optimizer(resume_from, wrapped, trainer.optimizer)
        trainer.scheduler.load_state_dict(json.loads((resume_from / checkpoint.SCHEDULER_NAME).read_text()))
        if not checkpoint.restore_rng(resume_from, info.rank, info.device):
            _log(info, f"{resume_from} has no random state for rank {info.rank}: reseeding")
        if tracker is not None:
            tracker.restore(state.get("early_stopping"))
            if info.is_main:
                _restore_best_dir(resume_from, out)
        _log(info, f"resuming from {resume_from} at step {state['step']}")
    step, samples_seen = int(state["step"]), int(state.get("samples_seen", state["step"] * trainer.global_batch))
    metrics_path = out / METRICS_NAME
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if resume_from is not None or cfg.resume:
            _truncate_metrics(metrics_path, step)  # a fresh start under --resume drops a stale file
        (out / CONFIG_NAME).write_text(json.dumps(asdict(cfg), indent=2, default=str) + "\n")
    stats = dataset.stats
    _log(info, f"{name}: {_summary(model)}; data {dataset.source}: {stats['examples']} examples -> "
               f"{stats['train_rows']} train / {stats['eval_rows']} eval rows of <= {cfg.max_length} tokens; "
               f"device {info.device}, {info.mode if info.enabled else 'single process'}"
               f"{f' x{info.world_size}' if info.enabled else ''}, "
               f"{'bf16 autocast' if autocast_dtype else 'fp32'}, global batch {trainer.global_batch}, "
               f"{f'{policy} gradient checkpointing' if checkpointing else 'no gradient checkpointing'}")
    for key, what in (("split", "texts longer than --max-length were split"),
                      ("truncated", "examples were truncated to --max-length"),
                      ("dropped", "pairs were dropped: the prompt fills --max-length")):
        if stats.get(key):
            _log(info, f"{stats[key]} {what}")

    from tqdm import tqdm

    bar = tqdm(total=cfg.max_steps, initial=min(step, cfg.max_steps), desc="train", unit="step",
               disable=not (info.is_main and cfg.progress), dynamic_ncols=True, file=sys.stderr)
    records: list[dict] = []
    last_eval = None
    latest_named: dict[str, float] = {}
    spikes = SpikeWatch(cfg.grad_spike_factor)
    reporter = report.open_reporter(cfg.report_to, out, step) if info.is_main else None
    stopped_early = False

    def log_record(record: dict) -> None:
        if info.is_main:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            records.append(record)
            if reporter is not None:
                reporter.write(record)

    try:
        with open(metrics_path, "a") if info.is_main else contextlib.nullcontext() as metrics_file:
            if (named or prompts) and step == 0:  # the base model's level on every set, once, as step 0
                base = {"step": 0, **_split_eval(trainer), **_evaluate_named(trainer, named)}
                if prompts:
                    base["samples"] = _samples(trainer, tokenizer, prompts, cfg, info, 0)
                log_record(base)
            while step < cfg.max_steps:
                try:
                    record = trainer.train_step(samples_seen)
                except NonFiniteStep as exc:
                    kept = checkpoint.list_checkpoints(out)
                    last = f"the last good checkpoint is {out / f'checkpoint-{kept[-1][0]}'}" if kept else \
                        "no checkpoint was saved before it"
                    raise TrainError(f"step {step + 1}: {exc}; stopped before the optimizer step, {last}") from None
                step += 1
                warning = spikes.check(record["grad_norm"])
                if warning is not None:
                    record["warning"] = warning
                    _log(info, f"step {step}: warning: {warning}")
                samples_seen += trainer.global_batch
                record = {"step": step, "epoch": round(trainer.sampler.epoch(samples_seen), 4), **record}
                if (cfg.eval_steps and step % cfg.eval_steps == 0) or step == cfg.max_steps:
                    scores = _split_eval(trainer)
                    last_eval = scores.get("eval_loss")
                    record.update(scores)
                    latest_named = _evaluate_named(trainer, named)
                    record.update(latest_named)
                    if prompts:
                        record["samples"] = _samples(trainer, tokenizer, prompts, cfg, info, step)
                    if tracker is not None and tracker.update(step, record):
                        writer = _adapter_writer(wrapped, info)  # gathers on every rank under FSDP
                        if info.is_main:
                            write_best(out, writer, tracker)
                record["peak_memory_mib"] = distributed.all_reduce_max(info, peak_memory_mib(info.device))
                log_record(record)
                postfix = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}",
                           "tok/s": f"{record['tokens_per_sec']:.0f}"}
                if last_eval is not None:
                    postfix["eval"] = f"{last_eval:.4f}"
                postfix.update({key.removeprefix("eval_"): f"{v:.4f}" for key, v in latest_named.items()
                                if key.endswith("_loss")})
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
                if cfg.save_steps and step % cfg.save_steps == 0:
                    _save_checkpoint(out, step, samples_seen, cfg, info, wrapped, trainer, tracker)
                if callback is not None:
                    callback(record)
                if tracker is not None and tracker.should_stop:
                    stopped_early = True
                    _log(info, f"early stopping at step {step}: {tracker.reason()}")
                    break
    finally:
        bar.close()
        if reporter is not None:
            reporter.close()
    if tracker is not None and cfg.load_best and tracker.best_step is not None:
        distributed.barrier(info)  # rank 0 wrote best/
        try:  # the weights only: the model already has this run's LoRA layers
            load_adapter(distributed.unwrap(wrapped), out / BEST_DIR)
        except (ValueError, FileNotFoundError) as exc:
            raise TrainError(f"{out / BEST_DIR}: the best adapter cannot be loaded back ({exc})") from None
        _log(info, f"{ADAPTER_DIR}/ holds the best adapter: {tracker.metric} {tracker.best:.4f} at step "
                   f"{tracker.best_step} (--no-load-best: the last one)")
    writer = _adapter_writer(wrapped, info)
    adapter_dir = out / ADAPTER_DIR
    if info.is_main:
        writer(adapter_dir)
    merged_dir = None
    if cfg.merge:
        if info.is_main:
            merged_dir = _merge(cfg, adapter_dir, out, tokenizer, autocast_dtype, classes)
        distributed.barrier(info)
    final_loss = records[-1]["loss"] if records else None
    if info.is_main:
        _log(info, f"done at step {step}: loss {final_loss if final_loss is None else f'{final_loss:.4f}'}"
                   f"{f', eval loss {last_eval:.4f}' if last_eval is not None else ''}; adapter in {adapter_dir}"
                   f"{f', merged model in {merged_dir}' if merged_dir else ''}; metrics in {metrics_path}")
    distributed.barrier(info)
    return TrainResult(model=distributed.unwrap(wrapped), tokenizer=tokenizer, output_dir=out,
                       adapter_dir=adapter_dir, merged_dir=merged_dir, step=step, metrics=records, loss=final_loss,
                       eval_loss=last_eval, wrapped_model=wrapped, stopped_early=stopped_early,
                       best_step=tracker.best_step if tracker else None, best_score=tracker.best if tracker else None)


def _samples(trainer: Trainer, tokenizer, prompts: list[str], cfg: TrainConfig, info: DistInfo,
             step: int) -> list[dict]:
    """Greedy continuations of the sample prompts by the model as it is now (every rank
    generates: a sharded model needs them all), logged and returned as records."""
    bare = distributed.unwrap(trainer.model)
    bare.eval()
    try:
        with trainer._autocast():
            outputs = continue_prompts(bare, tokenizer, prompts, cfg.sample_max_new_tokens)
    finally:
        bare.train()
    for prompt, output in zip(prompts, outputs, strict=True):
        _log(info, f"step {step} sample: {prompt!r} -> {output!r}")
    return [{"prompt": p, "output": o} for p, o in zip(prompts, outputs, strict=True)]


def _restore_best_dir(resume_from: Path, out: Path) -> None:
    """`out/best` as the checkpoint saw it: a best adapter written after the checkpoint (by the
    interrupted run) would otherwise outlive the count that led to it."""
    saved = resume_from / BEST_DIR
    if saved.is_dir():
        tmp = out / f".{BEST_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(saved, tmp)
        checkpoint.replace_dir(tmp, out / BEST_DIR)
    else:
        shutil.rmtree(out / BEST_DIR, ignore_errors=True)


def _save_checkpoint(out: Path, step: int, samples_seen: int, cfg: TrainConfig, info: DistInfo, model: nn.Module,
                     trainer: Trainer, tracker: EarlyStopping | None) -> Path:
    writer = _adapter_writer(model, info)
    optim = checkpoint.optimizer_state(model, trainer.optimizer)
    state = {"step": step, "samples_seen": samples_seen, "world_size": info.world_size,
             "global_batch": trainer.global_batch, "config": asdict(cfg)}
    if tracker is not None:
        state["early_stopping"] = tracker.state()
    return checkpoint.save(out, step, info, writer, optim, trainer.scheduler.state_dict(), state,
                           cfg.save_total_limit, best_dir=out / BEST_DIR if tracker is not None else None)


def config_fields() -> dict[str, object]:
    """{option: default} of `TrainConfig` (for the CLI)."""
    return {f.name: f.default for f in fields(TrainConfig)}
