"""The one exception type of `menagerie.data`.

A `DataError` carries one line that says what is wrong and how to fix it; the CLI prints
`str(e)` without a traceback.
"""


class DataError(ValueError):
    """A data source, tokenizer or prepared folder that cannot be used as configured."""
