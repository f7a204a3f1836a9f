"""maj@k voting and end-to-end evaluation (library call and command line)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import transformers

from hf_models import SHARED, STORIES_HF, generated
from latro_jax import models
from latro_jax.data import PromptFormatter, get_task, load_examples
from latro_jax.evaluate import EvalConfig, evaluate, majority_vote

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GSM8K = os.path.join(SHARED, "data", "gsm8k")


def test_majority_vote_counts_equal_answers_and_breaks_ties_by_first_seen():
    gsm = get_task("gsm8k")
    assert majority_vote(gsm, ["3", "5", "5.0", None, "3", "5"]) == "5"   # 5 and 5.0 are one answer
    assert majority_vote(gsm, ["7", "3", "3", "7"]) == "7"                # tie: first seen
    assert majority_vote(gsm, [None, None]) is None
    arc = get_task("arc_challenge")
    answers = [arc.extract(t) for t in ("The answer is gravity.", "The answer is Friction. Yes.",
                                        "The answer is friction", "The answer is gravity. Sure.")]
    assert majority_vote(arc, answers) == "gravity"


@pytest.mark.slow
def test_greedy_and_maj_k_evaluation_end_to_end(tmp_path):
    model = models.load_hf(STORIES_HF)
    fmt = PromptFormatter(transformers.AutoTokenizer.from_pretrained(STORIES_HF))
    task = get_task("gsm8k")
    examples = load_examples(task, GSM8K, "test", limit=5)
    cfg = EvalConfig(max_new_tokens=24, batch_size=4, maj_k=3, truncated_budgets=(8, 24))
    summary = evaluate(model, task, examples, fmt, cfg, out_dir=str(tmp_path), progress=False)
    assert summary["examples"] == 5 and set(summary) >= {"greedy", "maj@3", "truncated@8", "truncated@24"}
    records = [json.loads(l) for l in open(tmp_path / "examples.jsonl")]
    assert [r["id"] for r in records] == [e.id for e in examples]
    for r, ex in zip(records, examples):
        assert r["gold"] == ex.gold and len(r["maj"]["outputs"]) == 3
        assert r["greedy"]["correct"] == task.score(r["greedy"]["output"], ex.gold)
    # the recorded accuracy is the mean of the recorded per-example results
    assert summary["greedy"] == np.mean([r["greedy"]["correct"] for r in records])
    assert summary["maj@3"] == np.mean([r["maj"]["correct"] for r in records])
    assert json.load(open(tmp_path / "summary.json")) == summary


@pytest.mark.e2e
def test_evaluate_command_line_on_an_hf_folder(tmp_path):
    out = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, "-m", "latro_jax.evaluate", f"--hf={STORIES_HF}", "--task=arc_challenge",
         f"--data={os.path.join(SHARED, 'data', 'arc_challenge')}", "--split=validation",
         "--limit=3", "--max_new_tokens=8", "--maj_k=2", f"--out={out}"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.load(open(out / "summary.json"))
    assert summary["task"] == "arc_challenge" and summary["examples"] == 3 and "maj@2" in summary


SCRIPT = {  # gold -> (greedy output, maj@3 samples); the expected verdicts are in the comments
    "3": ("The answer is 3.", ["The answer is 4.", "The answer is 3.", "The answer is 4."]),  # ok / vote 4
    "5": ("The answer is 6.", ["The answer is 5.", "no number here", "The answer is 6."]),   # wrong / tie -> 5
    "7": ("2+5=7. The answer is 7.", ["The answer is 7.", "7.0", "The answer is 8."]),      # ok / 7 = 7.0
    "9": ("", ["The answer is 1.", "The answer is 9.", "It is 9"]),                          # wrong / 9
}


def test_accuracies_count_scripted_outputs_as_the_definitions_say(monkeypatch, tmp_path):
    """evaluate() on scripted generations (sampling.generate replaced): greedy = 2/4, maj@3 =
    3/4 (a tie goes to the answer seen first; 7 and 7.0 are one answer; an output without a
    number does not vote). Scoring maj@k on the greedy output would give 2/4, ties to the
    last seen 2/4."""
    from latro_jax.data import Example
    from latro_jax import rollout
    tok = transformers.AutoTokenizer.from_pretrained(STORIES_HF)
    fmt = PromptFormatter(tok)
    examples = [Example(id=f"q{g}", question=f"Question {g}?", gold=g) for g in SCRIPT]
    by_prompt = {tuple(fmt.prompt_ids(e.question)): e.gold for e in examples}
    ids = lambda text: tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]

    def scripted(model, prompts, max_new_tokens, *, sampling, num_samples=1, **_):
        golds = [by_prompt[tuple(p)] for p in prompts]
        texts = [[SCRIPT[g][0]] if sampling.temperature == 0 else SCRIPT[g][1] for g in golds]
        assert all(len(t) == num_samples for t in texts)
        return generated([[ids(t) for t in row] for row in texts])

    monkeypatch.setattr(rollout.sampling, "generate", scripted)
    summary = evaluate(None, get_task("gsm8k"), examples, fmt, EvalConfig(maj_k=3, batch_size=3),
                       out_dir=str(tmp_path), progress=False)
    assert summary["greedy"] == 0.5 and summary["maj@3"] == 0.75
    votes = [json.loads(line)["maj"]["vote"] for line in open(tmp_path / "examples.jsonl")]
    assert votes == ["4", "5", "7", "9"]
