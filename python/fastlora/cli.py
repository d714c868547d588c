"""The `fastlora` command (also `python -m fastlora`)."""

from __future__ import annotations

import argparse
import sys


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
    bench.add_argument("--case", dest="cases", action="append", default=None,
                       help="run only this case (repeatable): dequantize, matmul_m1, matmul_m512, layer")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "bench":
            from . import bench

            bench.run(quick=args.quick, repeats=args.repeats, json_path=args.json_path, cases=args.cases)
    except (ValueError, OSError) as exc:
        print(f"fastlora {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0
