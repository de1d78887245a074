"""Metrics: one JSON line per epoch (metrics.jsonl), TensorBoard behind a flag, and torn-line tolerant reading.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable

from common.errors import UserError
from common.files import write_failure, write_text_atomic


# ----------------------------------------------------------------------------------------------------------------
# Metrics: one JSON line per epoch, TensorBoard behind a flag.
# ----------------------------------------------------------------------------------------------------------------
class MetricLogger:
    """Appends one JSON object per line to `metrics.jsonl` (main rank only) and mirrors scalars to TensorBoard."""

    def __init__(self, path: Path, enabled: bool, tensorboard_dir: Path | None = None):
        self.path, self.enabled, self.writer = Path(path), enabled, None
        if enabled and tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(tensorboard_dir))

    def keep_where(self, keep: Callable[[dict], bool]) -> None:
        """Rewrite the file, atomically, with only the lines whose record satisfies `keep` (each kept line as it
        was written): a resumed run drops what it logged after its checkpoint, since it logs that again. A
        half-written last line (a run stopped while writing it) is dropped too."""
        if not (self.enabled and self.path.exists()):
            return
        kept = []
        for number, line, record in jsonl_lines(self.path, announce=True):
            try:
                if keep(record):
                    kept.append(line)
            except (KeyError, TypeError, ValueError) as exc:
                raise UserError(f"{self.path} line {number} is not a record this run wrote (it lacks "
                                f"{type(exc).__name__}: {exc}), so the file was edited or damaged. Fix or remove that "
                                "line, then resume again") from None
        write_text_atomic(self.path, "".join(ln + "\n" for ln in kept))

    def truncate_after(self, epoch: int) -> None:
        """Keep only lines with `epoch` < the given one: a resumed run re-does epochs past its checkpoint."""
        self.keep_where(lambda record: record["epoch"] < epoch)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record, sort_keys=True) + "\n")
        except OSError as exc:
            failure = write_failure(exc, self.path, "The lines before are kept (the last may be half-written, which "
                                                    "run.resume=auto drops), and so are the checkpoints")
            raise (failure or exc) from None
        if self.writer is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, record["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def jsonl_lines(path: Path, announce: bool = False) -> list[tuple[int, str, dict]]:
    """(line number, line, record) for every non-blank line of a JSONL file written by MetricLogger. The file is
    only ever appended to, so a last line that does not parse was cut off by a kill or a full disk: it is dropped
    (with a note when `announce`). Any other line that is not a JSON object means damage: a UserError naming the
    file and the line."""
    lines = [(n, ln) for n, ln in enumerate(Path(path).read_text(errors="replace").splitlines(), start=1)
             if ln.strip("\x00 \t")]
    out = []
    for i, (number, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError as exc:
            record, detail = None, str(exc)
        else:
            detail = f"a JSON {type(record).__name__}, not an object"
        if isinstance(record, dict):
            out.append((number, line, record))
        elif i == len(lines) - 1:
            if announce:
                print(f"note: dropped the half-written last line ({number}) of {path}: the run was stopped while "
                      "writing it, and logs that epoch again", file=sys.stderr)
        else:
            raise UserError(f"{path} line {number} is damaged ({detail}); only the last line of this append-only "
                            "file can be half-written (by a kill), so the file was edited or corrupted. Fix or remove "
                            "that line, then run again")
    return out


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSONL metrics file (see `jsonl_lines`: a half-written last line is left out)."""
    return [record for _, _, record in jsonl_lines(path)]

