r"""Zero-shot evaluation: greedy accuracy, maj@k (self-consistency) and accuracy as a function of
the generation budget, with per-example JSONL and a summary JSON.

    python -m latro_jax.evaluate --hf=/path/to/hf_model --task=gsm8k \
        --data=../shared/data/gsm8k --split=test --maj_k=8 --out=/tmp/eval_gsm8k
    python -m latro_jax.evaluate --ckpt=/path/to/workdir/checkpoints --tokenizer=/path/to/hf_model ...

Generation stops at the end-of-turn / EOS tokens only (the answer follows "The answer is").
maj@k samples k outputs at the given temperature and votes over the extracted answers (ties go
to the answer seen first); an output without an answer does not vote.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any, Sequence

from tqdm.auto import tqdm

from latro_jax import sampling
from latro_jax.data import Example, PromptFormatter, Task
from latro_jax.models import Transformer


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    max_new_tokens: int = 500
    batch_size: int = 32
    maj_k: int = 8  # 0 = greedy only
    temperature: float = 1.0
    budgets: tuple[int, ...] = ()  # generation budgets for the accuracy curve (greedy)
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.maj_k < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} and batch_size={self.batch_size} "
                             f"must be >= 1, maj_k={self.maj_k} >= 0")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")


def majority_vote(task: Task, answers: Sequence[str | None]) -> str | None:
    """The most frequent answer (by task.vote_key); ties to the first seen; None if none."""
    counts: collections.Counter = collections.Counter()
    first: dict[Any, str] = {}
    for a in answers:
        if a is not None:
            key = task.vote_key(a)
            counts[key] += 1
            first.setdefault(key, a)
    if not counts:
        return None
    best = max(counts.values())
    return next(first[k] for k in first if counts[k] == best)


def evaluate(model: Transformer, task: Task, examples: Sequence[Example], fmt: PromptFormatter,
             cfg: EvalConfig = EvalConfig(), *, mesh=None, out_dir: str | None = None,
             progress: bool = True, desc: str = "eval") -> dict[str, Any]:
    """Accuracy of `model` on `examples`; writes examples.jsonl and summary.json to out_dir."""
    records, greedy_ok, maj_ok = [], 0, 0
    budget_ok = collections.Counter()
    bar = tqdm(total=len(examples), desc=desc, unit="q", disable=not progress)
    for start in range(0, len(examples), cfg.batch_size):
        batch = examples[start:start + cfg.batch_size]
        prompts = [fmt.prompt_ids(e.question) for e in batch]
        greedy = sampling.generate(model, prompts, cfg.max_new_tokens, stop_token_ids=fmt.stop_ids,
                                   pad_id=fmt.pad_id, mesh=mesh)
        sampled = None
        if cfg.maj_k:
            sampled = sampling.generate(model, prompts, cfg.max_new_tokens, temperature=cfg.temperature,
                                        num_samples=cfg.maj_k, stop_token_ids=fmt.stop_ids,
                                        pad_id=fmt.pad_id, seed=cfg.seed + start, mesh=mesh)
        for i, ex in enumerate(batch):
            ids = greedy.tokens[i][0]
            text = fmt.decode(ids)
            extracted = task.extract(text)
            record = {"id": ex.id, "prompt": fmt.decode(prompts[i]), "gold": ex.gold,
                      "greedy": {"output": text, "extracted": extracted,
                                 "correct": task.is_correct(extracted, ex.gold)}}
            greedy_ok += record["greedy"]["correct"]
            for b in cfg.budgets:
                budget_ok[b] += task.score(fmt.decode(ids[:b]), ex.gold)
            if sampled is not None:
                outputs = [fmt.decode(s) for s in sampled.tokens[i]]
                answers = [task.extract(o) for o in outputs]
                vote = majority_vote(task, answers)
                record["maj"] = {"outputs": outputs, "extracted": answers, "vote": vote,
                                 "correct": task.is_correct(vote, ex.gold)}
                maj_ok += record["maj"]["correct"]
            records.append(record)
        bar.update(len(batch))
        postfix = {"greedy": f"{greedy_ok / len(records):.3f}"}
        if cfg.maj_k:
            postfix[f"maj@{cfg.maj_k}"] = f"{maj_ok / len(records):.3f}"
        bar.set_postfix(postfix)
    bar.close()
    n = len(records)
    summary: dict[str, Any] = {"task": task.name, "examples": n, "greedy": greedy_ok / n}
    if cfg.maj_k:
        summary[f"maj@{cfg.maj_k}"] = maj_ok / n
    if cfg.budgets:
        summary["greedy_by_budget"] = {str(b): budget_ok[b] / n for b in cfg.budgets}
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "examples.jsonl"), "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def main(argv):
    from absl import flags
    import transformers
    from latro_jax import checkpoint, models
    from latro_jax.data import get_task, load_examples
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}")
    if bool(FLAGS.hf) == bool(FLAGS.ckpt):
        raise ValueError("give exactly one of --hf (HF folder) and --ckpt (Orbax checkpoint directory)")
    model = models.load_hf(FLAGS.hf) if FLAGS.hf else checkpoint.restore_model(FLAGS.ckpt, FLAGS.step)
    tokenizer_dir = FLAGS.tokenizer or FLAGS.hf
    if not tokenizer_dir:
        raise ValueError("--tokenizer is required with --ckpt (a folder with the tokenizer files)")
    fmt = PromptFormatter(transformers.AutoTokenizer.from_pretrained(tokenizer_dir),
                          eos_ids=model.config.eos_token_id)
    task = get_task(FLAGS.task)
    examples = load_examples(task, FLAGS.data, FLAGS.split, limit=FLAGS.limit)
    cfg = EvalConfig(max_new_tokens=FLAGS.max_new_tokens, batch_size=FLAGS.batch_size,
                     maj_k=FLAGS.maj_k, temperature=FLAGS.temperature,
                     budgets=tuple(int(b) for b in FLAGS.budgets), seed=FLAGS.seed)
    summary = evaluate(model, task, examples, fmt, cfg, out_dir=FLAGS.out)
    print(json.dumps(summary, indent=2))


def _define_flags():
    from absl import flags
    flags.DEFINE_string("hf", None, "HF model folder to evaluate.")
    flags.DEFINE_string("ckpt", None, "latro_jax checkpoint directory to evaluate.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    flags.DEFINE_string("tokenizer", None, "Tokenizer folder (default: --hf).")
    flags.DEFINE_string("task", "gsm8k", "gsm8k | arc_challenge | synthetic")
    flags.DEFINE_string("data", None, "Data file, folder with <split>.jsonl, or hub id.", required=True)
    flags.DEFINE_string("split", "test", "Split name.")
    flags.DEFINE_integer("limit", None, "Evaluate only the first N examples.")
    flags.DEFINE_integer("max_new_tokens", 500, "Generation budget (SPEC: 500).")
    flags.DEFINE_integer("batch_size", 32, "Questions per generation batch.")
    flags.DEFINE_integer("maj_k", 8, "Samples for maj@k (0 = greedy only).")
    flags.DEFINE_float("temperature", 1.0, "Sampling temperature for maj@k.")
    flags.DEFINE_list("budgets", [], "Generation budgets for the greedy accuracy curve.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_string("out", None, "Folder for examples.jsonl and summary.json.")


if __name__ == "__main__":
    from absl import app
    _define_flags()
    app.run(main)
