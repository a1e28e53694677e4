"""The error every data source, reader and tokenizer raises for input that cannot be used."""


class DataError(ValueError):
    """A data source that cannot be used; the message names it and what would work (exit 2)."""
