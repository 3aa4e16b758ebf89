"""One exception type for problems the user can fix.

The CLI prints ``error: <message>`` and exits with code 2 for these, without a traceback. Every message
names the problem and the fix in one line, e.g. ``data file train.tsv has no column 'sentence'
(columns: text, label); pass --text-column``.
"""


class SlimformerError(Exception):
    """A user-facing error: bad input, incompatible model, impossible budget."""
