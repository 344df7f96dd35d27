"""Every log record of a test, in a stream the test reads."""

import contextlib
import io
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def captured_logs(
    formatter: logging.Formatter | None = None, level: int = logging.INFO
) -> Iterator[io.StringIO]:
    """The root logger's records at `level` and above, formatted by `formatter`, while the block
    runs; the logger is as it was afterwards."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    if formatter is not None:
        handler.setFormatter(formatter)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
