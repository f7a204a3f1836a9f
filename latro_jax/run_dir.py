"""A run's workdir as a record: the folder itself, its lock, the config and tokenizer it trained
with (config.json, config.sha256, tokenizer/), and the JSON files the job reads back -- each
refusal or damage reported as one WorkdirError naming the path and the fix."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax

TRAINING_INVARIANT = ("mesh", "eval", "checkpoint", "export")  # config sections a resume may change


class WorkdirError(RuntimeError):
    """The workdir is in use, cannot be written, holds a run of a different config or tokenizer,
    or one of its records is damaged."""


def prepare(workdir: str) -> None:
    """Create the workdir (refusing a path that is a file or cannot be created)."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir={workdir} is a file, not a folder; name a folder (it is created "
                           "when missing).")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"cannot create the workdir {workdir}: {e.strerror or e}; name a folder "
                           "you can write.") from e


def lock(workdir: str):
    """An exclusive lock on <workdir>/.lock-<process index>, held until the returned file is closed
    (or the process ends, however it ends). Every mode that writes into a workdir takes it."""
    import fcntl
    f = open(os.path.join(workdir, f".lock-{jax.process_index()}"), "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise WorkdirError(f"{workdir} is in use by another run (it holds the lock .lock-"
                           f"{jax.process_index()}); wait for it to finish or use another --workdir.")
    return f


def read_json(path: str, fix: str, default: Any = None) -> Any:
    """The JSON a run wrote at `path` (`default` when there is none); a damaged file is an error
    naming it and `fix`."""
    if not os.path.exists(path):
        return default
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise WorkdirError(f"{path} is damaged ({type(e).__name__}: {e}); {fix}") from e


def write_json(path: str, obj: Any) -> None:
    """Write `obj` to `path` through a temporary file (a kill mid-write leaves the old file)."""
    if jax.process_index() == 0:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)


def config_changes(workdir: str, new: dict, allow_change: bool) -> list[str]:
    """The fields in which `new` trains differently from the workdir's recorded config; refused
    (naming them) unless allow_change. Reads only."""
    path = os.path.join(workdir, "config.json")
    old = read_json(path, "it records the config this run trained with: restore it, or delete it "
                          "to continue the run with this command's config.")
    if old is None:
        return []
    changed = sorted(set(_flatten(old, TRAINING_INVARIANT)) ^ set(_flatten(new, TRAINING_INVARIANT)))
    fields = sorted({k for k, _ in changed})
    if fields and not allow_change:
        raise WorkdirError(f"{workdir} holds a run whose config differs in {', '.join(fields[:8])}"
                           f"{' ...' if len(fields) > 8 else ''}; resuming would mix the two. Use a "
                           "new --workdir, or pass --allow_config_change to continue it with the new config.")
    return fields


def record(workdir: str, new: dict, tokenizer) -> None:
    """Write the run's record: config.json, config.sha256 (of the fields that change training) and
    the tokenizer. Called once the run is committed to start, so a refused or failed attempt
    leaves the record of the run before it."""
    if jax.process_index() != 0:
        return
    tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))
    write_json(os.path.join(workdir, "config.json"), new)
    training = json.dumps(sorted(_flatten(new, TRAINING_INVARIANT)))
    with open(os.path.join(workdir, "config.sha256"), "w") as f:
        f.write(hashlib.sha256(training.encode()).hexdigest() + "\n")


def recorded_tokenizer(workdir: str):
    """The tokenizer the run in `workdir` trained with (<workdir>/tokenizer), or None when the
    workdir has none recorded."""
    import transformers
    folder = os.path.join(workdir, "tokenizer")
    if not os.path.isdir(folder):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise WorkdirError(f"{folder} is damaged ({type(e).__name__}: {e}); copy the run's tokenizer "
                           "back there (the export in <workdir>/hf holds one).") from e


def check_tokenizer(tokenizer, workdir: str, what: str, fix: str) -> None:
    """Refuse `tokenizer` for the run in `workdir` unless it is the one the run trained with (same
    vocabulary and special tokens): another tokenizer turns every prompt into other ids, and the
    model answers garbage that is then scored."""
    recorded = recorded_tokenizer(workdir)
    if recorded is None or _identity(recorded) == _identity(tokenizer):
        return
    raise WorkdirError(f"{what} is not the tokenizer this run trained with ({len(tokenizer)} tokens "
                       f"against {len(recorded)} in {os.path.join(workdir, 'tokenizer')}); {fix}")


def _identity(tokenizer) -> tuple:
    return (sorted(tokenizer.get_vocab().items()), tokenizer.bos_token_id, tokenizer.eos_token_id,
            tokenizer.pad_token_id, tokenizer.chat_template or "")


def _flatten(config: dict, skip: tuple[str, ...], prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for k, v in config.items():
        if not prefix and k in skip:
            continue
        if isinstance(v, dict):
            out += _flatten(v, (), f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", json.dumps(v)))
    return out
