"""One exception type for problems the user can fix.

The CLI prints ``error: <message>`` and exits with code 2 for these, without a traceback. Every message
names the problem and the fix in one line, e.g. ``data file train.tsv has no column 'sentence'
(columns: text, label); pass --text-column``.
"""


class SlimformerError(Exception):
    """A user-facing error: bad input, incompatible model, impossible budget."""


def validation_line(error) -> str:
    """The first problem of a pydantic ``ValidationError`` in one line: ``field=<input>: <message>``."""
    err = error.errors()[0]
    field = ".".join(str(x) for x in err["loc"])
    return f"{field}={err.get('input')!r}: {err['msg']}"


def read_yaml(path, what: str):
    """Parse a user's YAML file (a recipe, a search space); a missing file or bad syntax is one line naming
    ``what`` and the fix. Returns what the file holds (None for an empty file)."""
    from pathlib import Path

    import yaml

    path = Path(path)
    if not path.is_file():
        raise SlimformerError(f"{what} {path} does not exist; give a YAML file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SlimformerError(f"{what} {path} is not valid YAML ({str(e).splitlines()[0]}); fix the syntax") from None
