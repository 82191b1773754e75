"""Make the int8 weight-only variant of an OmniV-Med checkpoint (torchao through transformers' TorchAoConfig, CPU).

    python quantize_omnivmed.py SRC OUT [--max-shard-size 300MB]
    python quantize_omnivmed.py SRC OUT --evaluate-default DATA   # also: held-out accuracy of SRC and OUT

OUT is a complete Hub folder (SRC's code, processor, tokenizer and card; int8 safetensors, no pickle) that loads with
`AutoModelForImageTextToText.from_pretrained(OUT, trust_remote_code=True)`: config.json carries the quantization
config, so nothing is quantized at load and the source's weights are not read. Every nn.Linear but the output head
becomes torchao's Int8Tensor (symmetric int8 per output row); embeddings and norms keep SRC's dtype.
(`omnivmed_tools.quantize_int8`; torchao: `pip install -r requirements-int8.txt`.)

`--evaluate-default DATA`: DATA is the embedded default's dataset folder (train_trl.py writes it to OUTPUT_DIR/data;
its eval.jsonl holds the held-out questions): SRC in its own dtype and OUT are scored as train_trl.py scores the
default (`data_omnivmed.evaluate_default`), and the per-task change is printed (`--json FILE` keeps both tables).
"""

import argparse
import json
import logging
from pathlib import Path

import data_omnivmed
from omnivmed_tools import INT8_SHARD_SIZE, quantize_int8


def compare(before: dict, after: dict) -> str:
    """A markdown table of the per-(task, input) accuracy of both reports and the change, then both overall rates."""
    after_rows = {(r["task"], r["kind"]): r for r in after["table"]}
    lines = ["| task | input | n | source | int8 | change |", "|---|---|---|---|---|---|"]
    for r in before["table"]:
        a = after_rows[(r["task"], r["kind"])]
        lines.append(f"| {r['task']} | {r['kind']} | {r['n']} | {r['accuracy']:.1%} | {a['accuracy']:.1%} | "
                     f"{(a['accuracy'] - r['accuracy']) * 100:+.1f} pt |")  # fmt: skip
    lines.append(f"| overall | | {before['n']} | {before['overall']:.1%} | {after['overall']:.1%} | "
                 f"{(after['overall'] - before['overall']) * 100:+.1f} pt |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="checkpoint folder (safetensors)")
    parser.add_argument("out", type=Path, help="folder for the int8 variant")
    parser.add_argument("--max-shard-size", default=INT8_SHARD_SIZE,
                        help="safetensors shard size (e.g. 300MB, 2GB)")  # fmt: skip
    parser.add_argument("--evaluate-default", type=Path, metavar="DATA",
                        help="the embedded default's dataset folder: score SRC and OUT on its held-out "
                        "questions")  # fmt: skip
    parser.add_argument("--json", type=Path, help="--evaluate-default: write both reports here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.evaluate_default is not None:
        eval_jsonl = data_omnivmed.default_paths(args.evaluate_default)["eval"]
        if not eval_jsonl.is_file():
            raise SystemExit(f"{args.evaluate_default}: no eval.jsonl (the embedded default's dataset folder, "
                             "OUTPUT_DIR/data of train_trl.py)")  # fmt: skip
    try:
        quantize_int8(args.src, args.out, args.max_shard_size)
    except (ValueError, ImportError) as error:
        raise SystemExit(str(error)) from error
    if args.evaluate_default is None:
        return
    reports = {}
    for name, folder in (("source", args.src), ("int8", args.out)):
        reports[name] = data_omnivmed.evaluate_default(folder, eval_jsonl, args.evaluate_default)
        print(f"\n{name} ({folder}):{reports[name]['text']}")
    print("\nint8 vs source, held-out accuracy:\n" + compare(reports["source"], reports["int8"]))
    if args.json:
        args.json.write_text(json.dumps({k: {"table": r["table"], "overall": r["overall"], "n": r["n"]}
                                         for k, r in reports.items()}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
