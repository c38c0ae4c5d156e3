"""The one error type of the model layer for files that cannot be loaded."""
from __future__ import annotations

import os


class ModelFileError(Exception):
    """A model file that cannot be loaded: names the file and what was found there.

    Nodes let it propagate; the executor reports its message as the node's error.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot load model file {self.path!r}: {reason}")
