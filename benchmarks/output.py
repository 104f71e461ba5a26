"""`--out` of the benchmarks: the output rule of `finetune.outputs` (a JSON file never replaces
another command's files, never through a link) and atomic writes (temp file + rename)."""

from __future__ import annotations

import os
from pathlib import Path

from finetune.io_utils import atomic_path
from finetune.outputs import check_output_file


def check_bench_out(text: str) -> Path:
    """A benchmark's `--out FILE.json`, checked before the benchmark runs (see `check_output_file`)."""
    return check_output_file(text, (".json",))


def write_bench_json(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
