r"""Zero-shot evaluation: greedy accuracy, maj@k (self-consistency), the forced-answer accuracy
curve over token budgets and normalised regret (SPEC 2.4), with per-example JSONL and a summary.

    python -m latro_jax.evaluate --hf=/path/to/hf_model --task=gsm8k \
        --data=../shared/data/gsm8k --split=test --maj_k=8 --out=/tmp/eval_gsm8k
    python -m latro_jax.evaluate --ckpt=/path/to/workdir/checkpoints/latro \
        --tokenizer=/path/to/workdir/tokenizer ... --forced_budgets=100,200,400 --regret_cutoffs=200,400

Generation stops at the model's end ids only (the answer follows "The answer is"). maj@k
samples k outputs at the given temperature and votes over the extracted answers (ties go to
the answer seen first); an output without an answer does not vote.

Forced-answer accuracy at budget b: the greedy trace's thinking (or, with `traces`, each of N
sampled traces') is cut at b tokens (or at its last episode boundary <= b), the termination
suffix is appended (the final suffix after the whole thinking), the answer is decoded (greedily
by default) and graded. Normalised regret at cutoff C0 (SPEC 2.4) takes, per trace, J(empty) at
x = 0 and the points (tokens of the prefix of episodes 1..k, forced-answer accuracy after them)
-- x counts the prefix's tokens only, not the forced answer -- and averages over problems the
mean over their traces. `truncated_budgets` is the older, different measurement: the score of the greedy output
cut at b tokens as it stands, which can extract "-6" from "10-6=" (no forcing).
"""

from __future__ import annotations

if __name__ == "__main__":  # first, so the jax imports below are not done twice
    from latro_jax.huge_pages import reexec_with_huge_pages
    reexec_with_huge_pages()

import collections
import dataclasses
import functools
import json
import os
import sys
from typing import Any, Sequence

from tqdm.auto import tqdm

import jax
import numpy as np

from latro_jax import objectives
from latro_jax.data import Example, PromptFormatter, Task
from latro_jax.episodes import Episodes, SegmentConfig, make_segmenter
from latro_jax.meta_prover import ForcingConfig, MetaProver
from latro_jax.models import Transformer
from latro_jax.rollout import Sampler
from latro_jax.sampling import SamplingParams


GREEDY_FORCING = ForcingConfig(sampling=SamplingParams(temperature=0.0), samples=1)
FORCED_AT = ("tokens", "episode")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """max_new_tokens / batch_size: greedy generation; maj_k samples at `temperature` (0 = off);
    forced_budgets: token budgets of the forced-answer curve; forced_at: tokens | episode (cut at
    the last episode boundary <= b); regret_cutoffs: C0s of normalised regret; forcing and
    segment: the termination suffix and episode rule (meta_prover.py, episodes.py; forced
    answers greedy by default); traces: 0 = the forced curve and regret of the greedy trace, N =
    of N traces per problem sampled at trace_sampling (the analysis recipe: 16 at T 0.6, top-p
    0.95), averaged per problem first, with their accuracy as pass@1; truncated_budgets: score
    of the plain output cut at b tokens."""

    max_new_tokens: int = 500
    batch_size: int = 32
    maj_k: int = 8  # 0 = greedy only
    temperature: float = 1.0
    forced_budgets: tuple[int, ...] = ()
    forced_at: str = "tokens"
    regret_cutoffs: tuple[int, ...] = ()
    forcing: ForcingConfig = GREEDY_FORCING
    segment: SegmentConfig = SegmentConfig()
    traces: int = 0
    trace_sampling: SamplingParams = SamplingParams(temperature=0.6, top_p=0.95)
    truncated_budgets: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.maj_k < 0 or self.traces < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} and batch_size={self.batch_size} "
                             f"must be >= 1, maj_k={self.maj_k} and traces={self.traces} >= 0")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.forced_at not in FORCED_AT:
            raise ValueError(f"forced_at={self.forced_at!r}: choose one of {FORCED_AT}")
        if any(b < 0 for b in self.forced_budgets) or any(c <= 0 for c in self.regret_cutoffs):
            raise ValueError(f"forced_budgets {self.forced_budgets} must be >= 0 and regret_cutoffs "
                             f"{self.regret_cutoffs} > 0")

    @property
    def forced(self) -> bool:
        return bool(self.forced_budgets or self.regret_cutoffs)


class EvaluationStopped(Exception):
    """`stop()` turned true between two batches of an evaluation."""


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


def tokens_after_prompt(cfg: EvalConfig, task: Task, fmt: PromptFormatter) -> int:
    """The most positions an evaluation takes after a prompt: the generation budget and, when
    forced answers are measured, the suffix and a forced answer after it."""
    return cfg.max_new_tokens + (MetaProver(cfg.forcing, task, fmt).forced_tokens() if cfg.forced else 0)


def evaluate(model: Transformer, task: Task, examples: Sequence[Example], fmt: PromptFormatter,
             cfg: EvalConfig = EvalConfig(), *, mesh=None, out_dir: str | None = None,
             progress: bool = True, desc: str = "eval", stop=None) -> dict[str, Any]:
    """Accuracy of `model` on `examples`; writes examples.jsonl and summary.json to out_dir.
    The summary holds greedy, maj@k, pass@1 (with traces), forced@<b> (forced-answer accuracy at
    budget b) and regret@<C0> (normalised regret; both the mean over problems of the mean over
    their traces) and truncated@<b>, as configured.
    `stop` (a callable) is asked before each batch; when it says True, EvaluationStopped is
    raised and nothing is written."""
    records, greedy_ok, maj_ok, pass_at_1 = [], 0, 0, []
    truncated_ok = collections.Counter()
    sampler = Sampler(pad_id=fmt.pad_id, mesh=mesh)
    prover = MetaProver(cfg.forcing, task, fmt) if cfg.forced else None
    segmenter = make_segmenter(cfg.segment, fmt) if cfg.forced else None
    bar = tqdm(total=len(examples), desc=desc, unit="q", disable=not progress)
    for start in range(0, len(examples), cfg.batch_size):
        if stop is not None and stop():
            bar.close()
            raise EvaluationStopped(f"the evaluation '{desc}' (after {start} of {len(examples)} questions)")
        batch = examples[start:start + cfg.batch_size]
        prompts = [fmt.prompt_ids(e.question) for e in batch]
        complete = functools.partial(sampler.complete, model, prompts, max_new_tokens=cfg.max_new_tokens,
                                     stops=fmt.stops.ends_only())
        greedy = complete(sampling_params=SamplingParams(), key=jax.random.key(0)).ids
        sampled = None
        if cfg.maj_k:
            sampled = complete(sampling_params=SamplingParams(cfg.temperature), num_samples=cfg.maj_k,
                               key=jax.random.key(cfg.seed + start))
            sampled = sampled.by_prompt(sampled.ids)
        traces = [[t] for t in greedy]  # the traces the forced curves are measured on
        if cfg.traces:
            traces = complete(sampling_params=cfg.trace_sampling, num_samples=cfg.traces,
                              key=jax.random.key(cfg.seed + start + 1_000_003))
            traces = traces.by_prompt(traces.ids)
        forced = []
        if cfg.forced:
            flat = [(i, t) for i, row in enumerate(traces) for t in row]
            curves = forced_curves(sampler, model, prover, segmenter, cfg, [prompts[i] for i, _ in flat],
                                   [t for _, t in flat],
                                   [batch[i].gold for i, _ in flat], jax.random.key(cfg.seed + start))
            forced = [[c for (i, _), c in zip(flat, curves) if i == n] for n in range(len(batch))]
        for i, ex in enumerate(batch):
            ids = greedy[i]
            text = fmt.decode(ids)
            extracted = task.extract(text)
            record = {"id": ex.id, "prompt": fmt.decode(prompts[i]), "gold": ex.gold,
                      "greedy": {"output": text, "extracted": extracted, "tokens": len(ids),
                                 "correct": task.is_correct(extracted, ex.gold)}}
            greedy_ok += record["greedy"]["correct"]
            for b in cfg.truncated_budgets:
                truncated_ok[b] += task.score(fmt.decode(ids[:b]), ex.gold)
            if sampled is not None:
                outputs = [fmt.decode(s) for s in sampled[i]]
                answers = [task.extract(o) for o in outputs]
                vote = majority_vote(task, answers)
                record["maj"] = {"outputs": outputs, "extracted": answers, "vote": vote,
                                 "correct": task.is_correct(vote, ex.gold)}
                maj_ok += record["maj"]["correct"]
            if cfg.traces:
                outputs = [fmt.decode(t) for t in traces[i]]
                correct = [task.score(o, ex.gold) for o in outputs]
                record["traces"] = {"outputs": outputs, "correct": correct}
                pass_at_1.append(float(np.mean(correct)))
            if cfg.forced:  # one curve (the greedy trace), or one per sampled trace
                record["forced"] = forced[i] if cfg.traces else forced[i][0]
            records.append(record)
        bar.update(len(batch))
        postfix = {"greedy": f"{greedy_ok / len(records):.3f}"}
        if cfg.maj_k:
            postfix[f"maj@{cfg.maj_k}"] = f"{maj_ok / len(records):.3f}"
        bar.set_postfix(postfix)
    bar.close()
    n = len(records)
    summary: dict[str, Any] = {"task": task.name, "examples": n, "greedy": greedy_ok / n,
                               "greedy_tokens": float(np.mean([r["greedy"]["tokens"] for r in records]))}
    if cfg.maj_k:
        summary[f"maj@{cfg.maj_k}"] = maj_ok / n
    if cfg.traces:
        summary["pass@1"] = float(np.mean(pass_at_1))
    curves = [r["forced"] if cfg.traces else [r["forced"]] for r in records] if cfg.forced else []
    for b in cfg.forced_budgets:
        summary[f"forced@{b}"] = objectives.mean_of_means([[t["budgets"][str(b)] for t in ts] for ts in curves])
    for c in cfg.regret_cutoffs:
        per_problem = [[objectives.normalised_regret([p[0] for p in t["episodes"]], [p[1] for p in t["episodes"]],
                                                     c, empty=t["empty"]) for t in ts] for ts in curves]
        summary[f"regret@{c}"] = objectives.mean_of_means(per_problem)
    if cfg.regret_cutoffs:
        summary["regret_x"] = "tokens of the prefix (the forced answer not counted)"
        summary["regret_traces"] = f"{cfg.traces} sampled per problem" if cfg.traces else "the greedy trace"
    for b in cfg.truncated_budgets:
        summary[f"truncated@{b}"] = truncated_ok[b] / n
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "examples.jsonl"), "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def forced_curves(sampler: Sampler, model, prover: MetaProver, segmenter, cfg: EvalConfig, prompts, traces, golds,
                  key: jax.Array) -> list[dict[str, Any]]:
    """Per trace: {"budgets": {b: forced-answer accuracy after the thinking cut at b},
    "episodes": [(tokens of the prefix through episode j, forced-answer accuracy after it)],
    "empty": the accuracy after the empty prefix, "pieces": the episodes' text}.
    All forced answers of the batch are decoded in one call (identical prefixes once)."""
    episodes: list[Episodes] = [segmenter(t) for t in traces]
    wanted: dict[tuple[int, tuple[int, ...]], None] = {}
    cuts = []
    for i, e in enumerate(episodes):
        for b in cfg.forced_budgets:
            cut = min(b, e.thinking) if cfg.forced_at == "tokens" else max([x for x in e.ends if x <= b], default=0)
            cuts.append((i, b, cut))
            wanted[(i, tuple(e.ids[:cut]))] = None
        for j in range(0, e.count + 1) if cfg.regret_cutoffs else ():
            wanted[(i, tuple(e.prefix(j)))] = None
    items = list(wanted)
    accuracy = {}
    if items:  # the whole thinking is ended by the final suffix
        final = [0 < len(c) == episodes[i].thinking for i, c in items]
        result = prover.mc(sampler, model, [prompts[i] for i, _ in items], [list(c) for _, c in items],
                           [golds[i] for i, _ in items], key, final=final)
        accuracy = dict(zip(items, result.j.tolist()))
    out = [{"budgets": {}, "episodes": []} for _ in traces]
    for i, b, cut in cuts:
        out[i]["budgets"][str(b)] = accuracy[(i, tuple(episodes[i].ids[:cut]))]
    for i, e in enumerate(episodes):
        if cfg.regret_cutoffs:
            out[i]["empty"] = accuracy[(i, ())]
            out[i]["episodes"] = [(e.ends[j - 1], accuracy[(i, tuple(e.prefix(j)))]) for j in range(1, e.count + 1)]
            out[i]["pieces"] = e.episode_texts(prover.fmt.tokenizer)
    return out


def main(argv):
    """The command line: one line and exit status 2 for a user error (--verbosity=1: traceback)."""
    from absl import flags, logging
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs at INFO
    from latro_jax import checkpoint, run_dir
    from latro_jax.data import DataError
    expected = (ValueError, FileNotFoundError, DataError, checkpoint.CheckpointError, run_dir.WorkdirError)
    try:
        _evaluate_from_flags(argv)
    except expected as e:
        if flags.FLAGS.verbosity >= 1:
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


def _evaluate_from_flags(argv) -> None:
    import transformers
    from absl import flags
    from latro_jax import checkpoint, models, run_dir
    from latro_jax.data import get_task, load_examples
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments {argv[1:]}")
    if bool(FLAGS.hf) == bool(FLAGS.ckpt):
        raise ValueError("give exactly one of --hf (HF folder) and --ckpt (Orbax checkpoint directory)")
    model = models.load_hf(FLAGS.hf) if FLAGS.hf else checkpoint.restore_model(FLAGS.ckpt, FLAGS.step)
    # a checkpoint of a run (<workdir>/checkpoints/<stage>) comes with the run's tokenizer
    workdir = os.path.dirname(os.path.dirname(os.path.abspath(FLAGS.ckpt))) if FLAGS.ckpt else FLAGS.hf
    own = os.path.join(workdir, "tokenizer") if FLAGS.ckpt else FLAGS.hf
    tokenizer_dir = FLAGS.tokenizer or (own if FLAGS.hf or os.path.isdir(own) else None)
    if not tokenizer_dir:
        raise ValueError(f"--tokenizer is required with --ckpt outside a run's workdir (no {own})")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"--tokenizer: cannot load a tokenizer from {tokenizer_dir!r}: {e}") from e
    if FLAGS.tokenizer and FLAGS.ckpt:
        run_dir.check_tokenizer(tokenizer, workdir, f"--tokenizer={FLAGS.tokenizer}",
                                "leave --tokenizer out to use the run's own.")
    fmt = PromptFormatter(tokenizer, eos_ids=model.config.eos_token_id)
    problem = fmt.vocabulary_problem(model.config.vocab_size, FLAGS.hf or FLAGS.ckpt)
    if problem:
        raise ValueError(f"--tokenizer={tokenizer_dir}: {problem}")
    task = get_task(FLAGS.task)
    examples = load_examples(task, FLAGS.data, FLAGS.split, limit=FLAGS.limit)
    forcing = ForcingConfig(suffix=FLAGS.forced_suffix, final_suffix=FLAGS.final_suffix,
                            sampling=SamplingParams(temperature=FLAGS.forced_temperature, top_p=FLAGS.forced_top_p),
                            samples=FLAGS.forced_samples, answer_tokens=FLAGS.forced_answer_tokens)
    segment = SegmentConfig(rule=FLAGS.segment_rule, thinking_end=tuple(FLAGS.thinking_end),
                            group_size=FLAGS.group_size)
    ints = lambda values: tuple(int(v) for v in values)
    cfg = EvalConfig(max_new_tokens=FLAGS.max_new_tokens, batch_size=FLAGS.batch_size,
                     maj_k=FLAGS.maj_k, temperature=FLAGS.temperature,
                     forced_budgets=ints(FLAGS.forced_budgets), forced_at=FLAGS.forced_at,
                     regret_cutoffs=ints(FLAGS.regret_cutoffs), forcing=forcing, segment=segment,
                     traces=FLAGS.traces, trace_sampling=SamplingParams(temperature=FLAGS.trace_temperature,
                                                                        top_p=FLAGS.trace_top_p),
                     truncated_budgets=ints(FLAGS.truncated_budgets), seed=FLAGS.seed)
    summary = evaluate(model, task, examples, fmt, cfg, out_dir=FLAGS.out)
    print(json.dumps(summary, indent=2))


def _define_flags():
    from absl import flags
    flags.DEFINE_string("hf", None, "HF model folder to evaluate.")
    flags.DEFINE_string("ckpt", None, "latro_jax checkpoint directory to evaluate.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    flags.DEFINE_string("tokenizer", None,
                        "Tokenizer folder (default: --hf, or the run's own for a --ckpt in a workdir).")
    flags.DEFINE_string("task", "gsm8k", "gsm8k | arc_challenge | synthetic")
    flags.DEFINE_string("data", None, "Data file, folder with <split>.jsonl, or hub id.", required=True)
    flags.DEFINE_string("split", "test", "Split name.")
    flags.DEFINE_integer("limit", None, "Evaluate only the first N examples.")
    flags.DEFINE_integer("max_new_tokens", 500, "Generation budget (SPEC: 500).")
    flags.DEFINE_integer("batch_size", 32, "Questions per generation batch.")
    flags.DEFINE_integer("maj_k", 8, "Samples for maj@k (0 = greedy only).")
    flags.DEFINE_float("temperature", 1.0, "Sampling temperature for maj@k.")
    flags.DEFINE_list("forced_budgets", [], "Token budgets of the forced-answer accuracy curve.")
    flags.DEFINE_enum("forced_at", "tokens", list(FORCED_AT), "Cut at b tokens or at the last episode end <= b.")
    flags.DEFINE_list("regret_cutoffs", [], "Cutoffs C0 of normalised regret.")
    flags.DEFINE_string("forced_suffix", ForcingConfig.suffix, "Termination suffix of forced answers.")
    flags.DEFINE_string("final_suffix", "",
                        "Suffix after the whole thinking (R1: '\\n</think>'; empty: --forced_suffix).")
    flags.DEFINE_integer("forced_answer_tokens", ForcingConfig.answer_tokens, "Tokens of a forced answer.")
    flags.DEFINE_integer("forced_samples", 1, "Forced answers per prefix, m (1 with temperature 0: greedy).")
    flags.DEFINE_float("forced_temperature", 0.0, "Temperature of forced answers (analysis recipe: 0.6).")
    flags.DEFINE_float("forced_top_p", 1.0, "Top-p of forced answers (analysis recipe: 0.95).")
    flags.DEFINE_integer("traces", 0, "Sampled traces per problem for pass@1, the forced curve and regret "
                         "(0: the greedy trace; analysis recipe: 16).")
    flags.DEFINE_float("trace_temperature", 0.6, "Temperature of the sampled traces.")
    flags.DEFINE_float("trace_top_p", 0.95, "Top-p of the sampled traces.")
    flags.DEFINE_integer("group_size", SegmentConfig.group_size, "Merge episodes in groups of this size "
                         "(analysis regret study: 10).")
    flags.DEFINE_enum("segment_rule", SegmentConfig.rule, ["markers", "end_tokens"], "Episode rule.")
    flags.DEFINE_list("thinking_end", [], "Texts ending the thinking (default: the answer phrases).")
    flags.DEFINE_list("truncated_budgets", [], "Score of the greedy output cut at b tokens (no forcing).")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_string("out", None, "Folder for examples.jsonl and summary.json.")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
