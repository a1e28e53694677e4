"""`python -m epmoe.data train-tokenizer`: a byte-level BPE tokenizer.json, trained with the
`tokenizers` library on a corpus, for users who have none.

Byte-level (GPT-2's scheme): the 256 byte symbols are the initial alphabet, so any text encodes
without an unknown token, and the decoder turns ids back into the exact bytes. Its one special
token is `<|endoftext|>`, which epmoe's loader (epmoe/data/tokenizer.py KNOWN_EOS) picks as the
end-of-document token that `prepare` puts after every document.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from epmoe.data.documents import input_files, iter_documents
from epmoe.data.errors import DataError
from epmoe.data.tokenizer import KNOWN_EOS

EOS = KNOWN_EOS[0]  # "<|endoftext|>"
MIN_VOCAB = 256 + 1  # the byte alphabet and the EOS


@dataclass
class BPEOptions:
    vocab: int
    out: Path
    inputs: list[Path]
    text_field: str = "text"  # the text's key in JSON lines
    min_frequency: int = 2  # a pair seen fewer times is not merged
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    progress: bool = True


def train_tokenizer(opts: BPEOptions) -> tuple[Path, float, int]:
    """Train and write the tokenizer.json (atomically: `<out>.tmp`, then renamed). Returns (the file,
    seconds, its vocabulary size). Raises DataError (one line) for a vocab below MIN_VOCAB, missing
    inputs or a corpus without documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if opts.vocab < MIN_VOCAB:
        raise DataError(f"--vocab {opts.vocab} is below {MIN_VOCAB} (the 256 bytes and {EOS}); try 8192")
    if opts.out.is_dir():
        raise DataError(f"--out {opts.out} is a folder; name the tokenizer.json to write")
    start = time.perf_counter()
    files = input_files(opts.inputs, opts.include, opts.exclude)
    n_docs = 0

    def texts():  # counts the documents as the trainer reads them
        nonlocal n_docs
        for text in iter_documents(files, opts.text_field, opts.progress):
            n_docs += 1
            yield text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=opts.vocab, min_frequency=opts.min_frequency, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=opts.progress)  # fmt: skip
    tok.train_from_iterator(texts(), trainer)
    if n_docs == 0:
        raise DataError(f"{' '.join(map(str, opts.inputs))} hold no documents ({len(files)} file(s), none with "
                        "text); name the corpus's text or JSON-lines files or folders")  # fmt: skip
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = opts.out.with_name(opts.out.name + ".tmp")
    tok.save(str(tmp))
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.replace(opts.out)
    return opts.out, time.perf_counter() - start, tok.get_vocab_size(with_added_tokens=True)
