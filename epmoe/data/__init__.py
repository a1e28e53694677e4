"""Data: tokenizers (bytes, or a Hugging Face `tokenizer.json`), the errors of data sources, and
token shards: `python -m epmoe.data prepare | train-tokenizer | verify` writes them (prepare.py,
bpe.py over documents.py), data=tokens reads them (shards.py)."""
