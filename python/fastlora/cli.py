"""The `fastlora` command (also `python -m fastlora`)."""

from __future__ import annotations

import argparse
import sys


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, but not `None` (those say what they mean in words)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is argparse.SUPPRESS or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _add_train(commands) -> None:
    from .train.report import REPORT_TO
    from .train.trainer import CHECKPOINT_POLICIES, TASKS, TrainConfig

    d = TrainConfig()
    p = commands.add_parser(
        "train",
        help="QLoRA fine-tune a causal LM (no arguments: a tiny Llama on a shipped task set, on CPU in minutes)",
        description="QLoRA fine-tuning: the model's linear layers become frozen 4-bit layers with trainable LoRA "
                    "adapters. Under torchrun (torchrun --nproc-per-node N -m fastlora train ...) it trains on N "
                    "processes with DDP or FSDP2.",
        formatter_class=_Defaults,
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="a local Hugging Face model directory (also one written by `fastlora quantize`) or a Hub id "
                        "(default: the tiny Llama shipped with fastlora, randomly initialized with a fixed seed)")
    g.add_argument("--data", action="append", default=None, metavar="FILE[:WEIGHT]",
                   help='a JSONL file of {"text": ...} or {"prompt": ..., "response": ...} records (loss on the '
                        "response only), or a plain text file (documents separated by blank lines); repeatable: "
                        "training rows are drawn from each file in proportion to its WEIGHT (default 1), e.g. "
                        "--data task.jsonl:3 --data general.txt:1 (default: a small task set shipped with fastlora)")
    g.add_argument("--task", choices=TASKS, default=d.task,
                   help='causal-lm: next-token loss; seq-cls: a sequence classifier trained on JSONL {"text", '
                        '"label"} records (labels as names or integers), its head trained whole and saved with the '
                        "adapter, eval accuracy and macro F1 logged")
    g.add_argument("--max-length", type=int, default=d.max_length, help="tokens per row")
    g.add_argument("--packing", action=argparse.BooleanOptionalAction, default=d.packing,
                   help="concatenate examples into full rows (else pad each example)")
    g.add_argument("--eval-fraction", type=float, default=d.eval_fraction,
                   help="fraction of examples held out for evaluation (0: none)")
    g.add_argument("--eval-data", action="append", default=d.eval_data, metavar="NAME=FILE",
                   help="an eval set (repeatable; JSONL or text as --data), logged as eval_NAME_loss and "
                        "eval_NAME_ppl at every eval, with the base model's level as step 0")
    g.add_argument("--sample-prompts", default=None, metavar="FILE",
                   help="prompts (one per line, or .jsonl records with a \"prompt\"): their greedy continuations "
                        "are logged at every eval and in metrics.jsonl")
    g.add_argument("--sample-max-new-tokens", type=int, default=d.sample_max_new_tokens,
                   help="tokens generated per sample prompt")
    g = p.add_argument_group("early stopping")
    g.add_argument("--early-stopping-patience", type=int, default=d.early_stopping_patience, metavar="N",
                   help="stop after N evals in a row without improvement; the best adapter is kept in best/ "
                        "(0: no early stopping)")
    g.add_argument("--early-stopping-metric", default=d.early_stopping_metric,
                   help="what is followed (lower is better): eval_loss (the held-out split of --data), or "
                        "eval_NAME_loss / eval_NAME_ppl of an --eval-data set")
    g.add_argument("--early-stopping-min-delta", type=float, default=d.early_stopping_min_delta,
                   help="an improvement must exceed this")
    g.add_argument("--load-best", action=argparse.BooleanOptionalAction, default=d.load_best,
                   help="with early stopping, adapter/ (and the merged model) hold the best adapter, else the last")
    g = p.add_argument_group("LoRA and quantization")
    g.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank")
    g.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="LoRA alpha (scaling alpha / r)")
    g.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="dropout on the LoRA input")
    g.add_argument("--target-modules", default=d.target_modules,
                   help="'all-linear' (every linear layer but the output head) or names separated by commas, "
                        "e.g. q_proj,v_proj")
    g.add_argument("--quant-type", choices=("nf4", "fp4"), default=d.quant_type, help="4-bit data type")
    g.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=d.double_quant,
                   help="quantize the block scales too (bitsandbytes' compress_statistics)")
    g = p.add_argument_group("optimization")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per micro-batch and process")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (AdamW)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio,
                   help="fraction of --max-steps of linear warmup before the cosine decay")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping (0: none)")
    g.add_argument("--grad-spike-factor", type=float, default=d.grad_spike_factor,
                   help="log a warning record when the gradient norm exceeds this factor of its running median "
                        "(0: off); a NaN/Inf loss or gradient norm always stops the run")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                   default=d.gradient_checkpointing, help="recompute activations in backward to save memory")
    g.add_argument("--checkpoint-policy", choices=CHECKPOINT_POLICIES, default=d.checkpoint_policy,
                   help="what backward recomputes: full (every activation, least memory) or selective (all but "
                        "the 4-bit layers' outputs: ~1.35x faster steps on a 92M Llama, more memory); auto: "
                        "selective on CPU, full on GPU")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=d.precision,
                   help="auto: bf16 autocast on GPU and on CPUs with native bf16 (AMX or AVX512-BF16), "
                        "fp32 on other CPUs")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the LoRA init, data order and dropout")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", default=d.output_dir,
                   help="checkpoints, metrics.jsonl, the final adapter (adapter/) and merged model (merged/)")
    g.add_argument("--save-steps", type=int, default=d.save_steps, help="checkpoint every N steps (0: never)")
    g.add_argument("--save-total-limit", type=int, default=d.save_total_limit,
                   help="checkpoints to keep (0: all)")
    g.add_argument("--eval-steps", type=int, default=d.eval_steps,
                   help="evaluate every N steps (0: only after the last step)")
    g.add_argument("--resume", nargs="?", const=True, default=d.resume, metavar="CHECKPOINT",
                   help="continue from the last checkpoint in --output-dir (or from CHECKPOINT); starts fresh "
                        "when there is none")
    g.add_argument("--overwrite", action="store_true", help="replace a previous run in --output-dir")
    g.add_argument("--merge", action="store_true", help="also write the merged dense model (save_pretrained)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.progress, help="progress bar")
    g.add_argument("--report-to", choices=REPORT_TO, default=d.report_to,
                   help="also write the metrics as TensorBoard event files in OUTPUT_DIR/runs (needs tensorboard)")
    g = p.add_argument_group("devices")
    g.add_argument("--device", default=d.device, help="auto: cuda:LOCAL_RANK when CUDA is available, else cpu")
    g.add_argument("--distributed", choices=("auto", "none", "ddp", "fsdp"), default=d.distributed,
                   help="under torchrun: auto is DDP when WORLD_SIZE > 1; fsdp shards the 4-bit model (FSDP2)")


def _add_quantize(commands) -> None:
    p = commands.add_parser(
        "quantize",
        help="write a model's weights as bitsandbytes-format 4-bit safetensors",
        description="Quantizes a model's linear layers to 4 bits and writes model.safetensors with bitsandbytes' "
                    "Linear4bit keys (weight, weight.absmax, weight.quant_map, weight.nested_*, "
                    "weight.quant_state.bitsandbytes__nf4), every other tensor as it is, config.json (with a "
                    "bitsandbytes quantization_config) and the tokenizer.",
        formatter_class=_Defaults,
    )
    p.add_argument("--model", default=None,
                   help="a local Hugging Face model directory or a Hub id (default: the tiny Llama shipped with "
                        "fastlora)")
    p.add_argument("--output-dir", required=True, help="where to write (must not exist or be empty)")
    p.add_argument("--target-modules", default="all-linear",
                   help="'all-linear' (every linear layer but the output head) or names separated by commas")
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit data type")
    p.add_argument("--blocksize", type=int, default=64, help="values per scale")
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize the block scales too (bitsandbytes' compress_statistics)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype the model is loaded in (the dequantized weights' dtype)")


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines) or type(exc).__name__


def _train(args: argparse.Namespace) -> None:
    from .train import train

    options = {k: v for k, v in vars(args).items() if k != "command"}
    train(**options)


def _quantize(args: argparse.Namespace) -> None:
    import torch

    from .train.quantize import quantize_to_dir

    out = quantize_to_dir(args.model, args.output_dir, target_modules=args.target_modules, quant_type=args.quant_type,
                          blocksize=args.blocksize, compress_statistics=args.double_quant,
                          dtype=getattr(torch, args.dtype))
    print(f"fastlora quantize: wrote {out}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastlora", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench",
        help="time fastlora against bitsandbytes and dense torch",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    bench.add_argument("--quick", action="store_true", help="small shapes, few repeats (a smoke run)")
    bench.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default 9, quick 3)")
    bench.add_argument("--json", dest="json_path", default=None, help="also write the results to this JSON file")
    from .bench import CASES

    bench.add_argument("--case", dest="cases", action="append", default=None,
                       help="run only this case (repeatable): " + ", ".join(CASES))
    _add_train(commands)
    _add_quantize(commands)
    gen = commands.add_parser("generate", help="generate text from a base model and, optionally, a trained adapter",
                              formatter_class=_Defaults)
    gen.add_argument("--model", default=None,
                     help="a local Hugging Face model directory or a Hub id (default: the tiny Llama shipped with "
                          "fastlora, as for train)")
    gen.add_argument("--adapter", default=None, help="a PEFT-format adapter directory (e.g. OUTPUT_DIR/adapter)")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", default=None, help="one prompt")
    source.add_argument("--prompts", default=None,
                        help="a file of prompts: one per line, or .jsonl records with a \"prompt\"")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                     help="use the tokenizer's chat template when it has one")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    plot = commands.add_parser("plot", help="draw a training run's metrics.jsonl as one PNG",
                               formatter_class=_Defaults)
    plot.add_argument("run_dir", help="a `fastlora train` output directory")
    plot.add_argument("-o", "--output", default=None, help="the PNG to write (default: RUN_DIR/metrics.png)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "bench":
            from . import bench

            bench.run(quick=args.quick, repeats=args.repeats, json_path=args.json_path, cases=args.cases)
        elif args.command == "train":
            _train(args)
        elif args.command == "quantize":
            _quantize(args)
        elif args.command == "generate":
            from .train.generate import generate, read_prompts

            prompts = [args.prompt] if args.prompt is not None else read_prompts(args.prompts)
            generate(prompts, model=args.model, adapter=args.adapter, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, chat=args.chat, seed=args.seed)
        elif args.command == "plot":
            from .train.plot import plot

            print(f"fastlora plot: wrote {plot(args.run_dir, args.output)}")
    except (ValueError, OSError) as exc:
        print(f"fastlora {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastlora {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
