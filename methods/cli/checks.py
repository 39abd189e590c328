"""Argument checks of the command line: number types that refuse NaN, inf and out-of-range values by name, and
output paths checked before any compute (a file where a folder belongs, a folder where a file belongs, a
location that cannot be written), so that a command fails in its first second rather than after its work."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path


def positive_int(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _writable_ancestor(path: Path, arg: str) -> None:
    """ValueError unless the nearest existing ancestor of `path` is a folder this process can create files in."""
    ancestor = path.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{arg} {path}: {ancestor} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=ancestor).close()
    except OSError as e:
        raise ValueError(f"{arg} {path}: cannot write in {ancestor} ({e.strerror})") from e


def output_dir(path: Path, arg: str = "--out") -> None:
    """ValueError unless `path` is (or can become) a folder this process writes in."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{arg} {path} is a file, not a folder")
    _writable_ancestor(path, arg)


def output_file(path: Path, arg: str = "--out", suffix: str | None = None) -> None:
    """ValueError unless `path` is (or can become) a file this process writes, with `suffix` if given."""
    if path.is_dir():
        raise ValueError(f"{arg} {path} is a folder; give a file path")
    if suffix is not None and path.suffix != suffix:
        raise ValueError(f"{arg} must be a {suffix} path, got {path}")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{arg} {path} is not writable")
    _writable_ancestor(path.parent, arg)
