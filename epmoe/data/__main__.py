"""python -m epmoe.data prepare|train-tokenizer|verify: turn a corpus into token shards for data=tokens.

    python -m epmoe.data train-tokenizer --vocab 8192 --out tok.json corpus/         # if you have none
    python -m epmoe.data prepare --tokenizer tok.json --out shards corpus/ docs.jsonl
    python -m epmoe.train data=tokens data.path=shards model.vocab_size=8192
    python -m epmoe.data verify shards                                               # every sha256

INPUTs are text files (one document each), JSON-lines files (.jsonl, .ndjson: a document per line,
its text in --field), local Hugging Face datasets (.parquet and .arrow files, datasets.save_to_disk
folders, a DatasetDict's train split: a document per row, its text in the --field column) and
folders of them. Errors (a missing input, a corpus without documents,
an --out that exists, shards that do not match their metadata) are one line and exit 2; nothing
half-written is left.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from epmoe.data.bpe import BPEOptions, train_tokenizer
from epmoe.data.errors import DataError
from epmoe.data.prepare import DEFAULT_SHARD_TOKENS, PrepareOptions, prepare
from epmoe.data.shards import SPLITS, read_metadata, verify_sha256
from epmoe.exit_codes import EXIT_OK, EXIT_USAGE


def _prepare(args: argparse.Namespace) -> int:
    opts = PrepareOptions(tokenizer=args.tokenizer, out=args.out, inputs=args.inputs, text_field=args.field,
                          val_fraction=args.val_fraction, workers=args.workers, shard_tokens=args.shard_tokens,
                          include=args.include, exclude=args.exclude, progress=not args.no_progress)  # fmt: skip
    print(prepare(opts).summary())
    return EXIT_OK


def _train_tokenizer(args: argparse.Namespace) -> int:
    opts = BPEOptions(vocab=args.vocab, out=args.out, inputs=args.inputs, text_field=args.field,
                      min_frequency=args.min_frequency, include=args.include, exclude=args.exclude,
                      progress=not args.no_progress)  # fmt: skip
    out, seconds, vocab = train_tokenizer(opts)
    print(f"trained a byte-level BPE tokenizer of {vocab:,} tokens in {seconds:.1f} s: {out}")
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    meta = read_metadata(args.folder)
    verify_sha256(args.folder, meta, max_bytes=None)
    counts = ", ".join(f"{s} {meta.splits[s].tokens:,} tokens in {len(meta.splits[s].shards)} shard(s)" for s in SPLITS)
    print(f"{args.folder}: every shard matches {meta.tokenizer.path} ({counts})")
    return EXIT_OK


def _inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        metavar="INPUT",
        help="text, JSON-lines, .parquet or .arrow files, save_to_disk folders, or folders of them",
    )
    p.add_argument(
        "--field", default="text", help="the text's key in JSON lines, its column in datasets (default: text)"
    )
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="in folders, read only files whose name matches (repeatable; default: every file)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="in folders, leave out paths with a part that matches (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m epmoe.data", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="tokenise a corpus into token shards (data=tokens data.path=<out>)")
    prep.add_argument(
        "--tokenizer", required=True, help="a tokenizer.json, a folder holding one (a Hugging Face model's), or 'bytes'"
    )
    prep.add_argument("--out", required=True, type=Path, help="the shard folder to create (must not exist)")
    prep.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="the share of documents held out for validation, chosen by a hash of each name",
    )
    prep.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenising processes (default: cores)")
    prep.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    _inputs(prep)
    prep.set_defaults(run=_prepare)
    bpe = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer.json on a corpus")
    bpe.add_argument("--vocab", required=True, type=int, help="the vocabulary size, EOS included (e.g. 8192)")
    bpe.add_argument("--out", required=True, type=Path, help="the tokenizer.json to write")
    bpe.add_argument("--min-frequency", type=int, default=2, help="merge only pairs seen at least this often")
    _inputs(bpe)
    bpe.set_defaults(run=_train_tokenizer)
    ver = sub.add_parser("verify", help="check a shard folder against its metadata, every sha256 included")
    ver.add_argument("folder", type=Path, help="a folder `prepare` wrote")
    ver.set_defaults(run=_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
