"""python -m epmoe.generate: continue a text with a trained checkpoint or a Hugging Face model.

    python -m epmoe.generate <checkpoint or run dir> --prompt "def main():" --max-new-tokens 200
    python -m epmoe.generate <hf_dir> --prompt "Once upon a time" --temperature 0   # greedy

One process, fp32, every expert in it (a checkpoint saved at any EP degree is consolidated).
The tokenizer: a Hugging Face folder's tokenizer.json (bytes where it has none); for a
checkpoint, that of the run's data (bytes for byte-level data, the imported folder's for a
train.init_from run), or --tokenizer. The text (prompt and continuation) goes to stdout, one
line with the speed to stderr. Generation keeps a key/value cache (Transformer.generate);
--no-cache recomputes the whole context for every token, the slow reference.
Errors (a path that is neither a checkpoint nor a Hugging Face folder, a bad checkpoint, a
tokenizer that does not fit) are one line and exit 2.

In the layer order (tests/test_layering.py) this command line sits below epmoe.train: it reads
epmoe checkpoints (epmoe.train) and Hugging Face folders (epmoe.hf).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from epmoe.config import Config, ConfigError
from epmoe.data.errors import DataError
from epmoe.data.tokenizer import Tokenizer, load_tokenizer
from epmoe.exit_codes import EXIT_OK, EXIT_USAGE
from epmoe.hf.convert import from_pretrained
from epmoe.model.transformer import Transformer
from epmoe.train.checkpoint_files import CheckpointError
from epmoe.train.checkpoint_model import load_model
from epmoe.train.manifest import ManifestError
from epmoe.train.trainer import resolve_device

USER_ERRORS = (ConfigError, CheckpointError, ManifestError, DataError)


def load_source(path: Path, device: torch.device) -> tuple[Config, Transformer, str]:
    """(config, model in eval mode on `device`, what was loaded) of a Hugging Face folder (it
    holds a config.json) or of a checkpoint or run directory."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a checkpoint directory, a run directory or a "
                              "Hugging Face model folder")  # fmt: skip
    if (path / "config.json").is_file():
        cfg, model = from_pretrained(path, device)
        what = f"{path} ({cfg.model.family})"
    else:
        loaded = load_model(path)
        cfg, model = loaded.cfg, loaded.model.to(device)
        what = f"{loaded.path} ({cfg.model.family}, step {loaded.manifest['step']})"
    return cfg, model.eval(), what


def tokenizer_of(cfg: Config, source: Path, override: str | None) -> Tokenizer:
    """--tokenizer, else the data's (data.tokenizer; bytes when None); checked against the vocab."""
    if override is None and cfg.data.kind in ("bin", "tokens") and cfg.data.tokenizer is None:
        raise DataError(f"{source} was trained on token ids (data.kind={cfg.data.kind}) without a tokenizer; "
                        "pass --tokenizer <tokenizer.json or a folder holding one>")  # fmt: skip
    tokenizer = load_tokenizer(override or cfg.data.tokenizer)
    try:
        tokenizer.check_vocab(cfg.model.vocab_size)
    except DataError as e:
        raise DataError(f"{source}: {e}; pass --tokenizer <the model's tokenizer.json>") from None
    return tokenizer


def _generate(args: argparse.Namespace) -> int:
    try:
        device = resolve_device(args.device)
    except ConfigError:
        raise ConfigError("--device cuda, but torch sees no CUDA device; use --device cpu") from None
    if args.temperature < 0:
        raise ConfigError(f"--temperature {args.temperature}: use 0 for greedy decoding or a positive value")
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: give 0 or more")
    cfg, model, what = load_source(args.source, device)
    tokenizer = tokenizer_of(cfg, args.source, args.tokenizer)
    prompt_S = tokenizer.encode_docs([args.prompt.encode("utf-8")]).tokens.long().to(device)
    if prompt_S.numel() == 0:
        raise ConfigError("--prompt is empty; give at least one token of text")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    tokens_S = model.generate(prompt_S, args.max_new_tokens, args.temperature, generator, use_cache=not args.no_cache)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    print(tokenizer.decode(tokens_S.tolist()))
    cache = "no cache" if args.no_cache else "KV cache" if model.caches_exactly() else "no cache (capacity routing)"
    how = "greedy" if args.temperature == 0 else f"temperature {args.temperature:g}, seed {args.seed}"
    print(f"{args.max_new_tokens} new tokens in {seconds:.2f} s: {args.max_new_tokens / max(seconds, 1e-9):.1f} "
          f"tokens/s ({how}, {cache}, {device.type}; prompt {prompt_S.numel()} tokens; {what})",
          file=sys.stderr)  # fmt: skip
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m epmoe.generate", description=__doc__.splitlines()[0])
    p.add_argument("source", type=Path, help="a checkpoint directory, a run directory (its newest checkpoint) "
                   "or a Hugging Face model folder (config.json + safetensors)")  # fmt: skip
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context per token (the reference)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", help="default auto: cuda if present")
    p.add_argument("--tokenizer", help="a tokenizer.json (or a folder holding one) instead of the model's own")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return _generate(args)
    except USER_ERRORS as e:
        print("error: " + str(e).replace("\n", "\\n"), file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
