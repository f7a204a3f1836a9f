"""The run's metrics: metrics.jsonl (one row per update and per validation, repaired on reopen)
and TensorBoard, written by process 0 only."""

from __future__ import annotations

import json
import os
import sys

import jax


class Logger:
    """metrics.jsonl + TensorBoard (process 0 only). Opening repairs the file: a partial last
    line (a kill mid-write) is dropped."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        if self.active:
            self._rewrite(lambda row: True)
            self.jsonl = open(self.path, "a")
            self.tb = _tensorboard_writer(os.path.join(workdir, "tensorboard"))

    def _rewrite(self, keep) -> None:
        """Keep the complete rows for which keep(row) holds."""
        if not os.path.exists(self.path):
            return
        rows = []
        with open(self.path) as f:
            for line in f:
                if line.endswith("\n"):
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows if keep(r))
        os.replace(tmp, self.path)

    def resume(self, stage: str, step: int) -> None:
        """Forget the rows of `stage` after `step` (logged after its checkpoint, before a kill):
        they are logged again when those updates rerun."""
        if self.active:
            self.jsonl.close()
            self._rewrite(lambda r: r.get("stage") != stage or r.get("step", 0) <= step)
            self.jsonl = open(self.path, "a")

    def log(self, stage: str, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        self.jsonl.write(json.dumps({"stage": stage, "step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(f"{stage}/{k}", v, step)

    def close(self):
        if self.active:
            self.jsonl.close()
            self.tb.close()


def _tensorboard_writer(logdir: str):
    """tensorboardX's SummaryWriter, imported with torch hidden. tensorboardX imports torch where it
    is installed, only to recognise torch tensors among the values it is given: that cost each job
    ~1 s and ~190 MB and put a second framework (on GPUs, with its own CUDA libraries) beside jax."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter(logdir)
