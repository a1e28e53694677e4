"""Data: tokenizers (bytes, or a Hugging Face `tokenizer.json`) and the errors of data sources."""
