"""Two synthetic reasoning tasks, generated in code from a seed.

`chain` (the default): multi-step arithmetic.

    Ann has 3 apples. Ann gets 4 more. Ann gives 2 away. How many apples?
    rationale, worked step by step: 3+4=7. 7-2=5. The answer is 5.
    rationale, terse:               Total: 5. The answer is 5.
    worked, with a restatement:     3+4=7. Ann has 7 apples. 7-2=5. The answer is 5.
    worked, with a slip and a fix:  3+4=8. Wait, 3+4=7. 7-2=5. The answer is 5.

Each problem chains `num_steps` additions / subtractions (results never negative), so the
answer needs every intermediate result. A share `stepwise_share` of the gold rationales writes
every intermediate result; the others state only the total, which a small model must then
compute in one go and gets wrong far more often. One seeded stream of distinct
problems is cut into test, validation and train (in that order), so the splits never share a
question; the rationale styles come from a second stream, so they never change the problems,
and the detours (restatements, slips) of worked rationales from a third.

`search`: find the candidate that makes a sum, checking one candidate per sentence.

    Which of 4, 9, 7, 2 added to 5 makes 12?
    rationale, stopping at the find: 5+4=9 no. 5+9=14 no. 5+7=12 yes. The answer is 7.
    rationale, wasteful:             5+4=9 no. 5+9=14 no. 5+7=12 yes. 5+2=7 no. The answer is 7.

Checks after the find compute nothing the answer needs (zero progress, and tokens a budget may
not have): a share `wasteful_share` of the gold rationales go on checking 1 to `candidates`
(uniform) more after the find, in the listed order and from the first again when the list runs
out (re-checks), the others stop at it. So a wasteful rationale may be longer than any that
stops at the find, and answers after any number of extra checks (a model trained on them can
answer at any point after the find). Each check says whether it makes the target, so the answer
is read off its " yes" (without the marks a small model must recall which sum matched, and
often fails). The answer is uniform over the candidates' positions.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Any

from latro_jax.data.tasks import answer_text

NAMES = ("Ann", "Bob", "Cal", "Dee", "Eve", "Fay", "Gus", "Hal")
ITEMS = ("apples", "pens", "cards", "coins", "books", "eggs")
SPLITS = ("test", "validation", "train")
PROBLEMS = ("chain", "search")


def make_problem(rng: random.Random, num_steps: int, max_operand: int,
                 stepwise: bool = True, detour: str = "", detour_rng: random.Random | None = None) -> dict[str, Any]:
    """One problem from `rng`; its rationale worked step by step (with an optional detour drawn
    from `detour_rng`: "restate" -- a zero-progress sentence restating the running value
    between two steps -- or "slip" -- the last step wrong, then " Wait, " and the right one)
    or terse."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(1, max_operand)
    sentences, steps, values = [f"{name} has {value} {item}."], [], []
    for _ in range(num_steps):
        n = rng.randint(1, max_operand)
        if n <= value and rng.random() < 0.5:
            sentences.append(f"{name} gives {n} away.")
            steps.append((f"{value}-{n}=", value - n))
            value -= n
        else:
            sentences.append(f"{name} gets {n} more.")
            steps.append((f"{value}+{n}=", value + n))
            value += n
        values.append(value)
    sentences.append(f"How many {item}?")
    work = [f"{lhs}{result}." for lhs, result in steps]
    if detour == "restate" and num_steps > 1:
        at = detour_rng.randrange(num_steps - 1)  # between two steps: nothing new is computed
        work.insert(at + 1, f"{name} has {values[at]} {item}.")
    elif detour == "slip":  # on the last step, where a wrong value costs the answer (negative progress)
        at = num_steps - 1
        lhs, result = steps[at]
        wrong = max(result + detour_rng.choice((-2, -1, 1, 2)), 0)
        wrong = wrong if wrong != result else result + 1
        work[at:at + 1] = [f"{lhs}{wrong}.", f"Wait, {lhs}{result}."]
    text = " ".join(work) if stepwise else f"Total: {value}."
    return {"question": " ".join(sentences), "answer": str(value),
            "rationale": text + " " + answer_text(str(value))}


def make_search_problem(rng: random.Random, candidates: int, max_operand: int, extra: int = 0) -> dict[str, Any]:
    """One search problem from `rng`: distinct candidates in 1..max_operand, one of them (the
    answer, uniform) added to a base in 1..max_operand makes the target; its rationale checks
    the candidates in the listed order up to the find, and `extra` more after it (the list
    taken again from its start when it runs out)."""
    base = rng.randint(1, max_operand)
    options = rng.sample(range(1, max_operand + 1), candidates)
    answer = rng.choice(options)
    find = options.index(answer)
    checked = options[:find + 1] + [options[(find + 1 + i) % candidates] for i in range(extra)]
    work = " ".join(f"{base}+{c}={base + c} {'yes' if c == answer else 'no'}." for c in checked)
    question = f"Which of {', '.join(map(str, options))} added to {base} makes {base + answer}?"
    return {"question": question, "answer": str(answer), "rationale": work + " " + answer_text(str(answer))}


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """The knobs of `generate_splits` (config section task.synthetic)."""

    seed: int = 0
    sizes: dict = dataclasses.field(default_factory=dict)  # split name -> number of problems
    problem: str = "chain"  # chain | search
    num_steps: int = 2
    max_operand: int = 9
    stepwise_share: float = 1.0
    restate_share: float = 0.0  # of the worked rationales: one restating sentence (zero progress)
    slip_share: float = 0.0  # of the worked rationales: one wrong step, then "Wait," and the right one
    candidates: int = 4  # search: candidates per question
    wasteful_share: float = 0.0  # search: of the rationales, those checking more candidates after the find


def generate_splits(seed: int, sizes: dict[str, int], problem: str = "chain", num_steps: int = 2,
                    max_operand: int = 9, stepwise_share: float = 1.0, restate_share: float = 0.0,
                    slip_share: float = 0.0, candidates: int = 4,
                    wasteful_share: float = 0.0) -> dict[str, list[dict[str, Any]]]:
    """Disjoint splits of distinct problems, deterministic in (seed, sizes, knobs). The
    detours of worked rationales come from a third stream: with restate_share = slip_share =
    0 the output is what it was before they existed. `search` problems read max_operand,
    candidates and wasteful_share (the rationale style and its extra checks, from the second stream)."""
    if problem not in PROBLEMS:
        raise ValueError(f"synthetic task: problem={problem!r}: choose one of {PROBLEMS}")
    if problem == "search" and not (2 <= candidates <= max_operand and 0.0 <= wasteful_share <= 1.0):
        raise ValueError(f"synthetic task: candidates={candidates} must lie in [2, max_operand={max_operand}] "
                         f"and wasteful_share={wasteful_share} in [0, 1]")
    if num_steps < 1 or max_operand < 1:
        raise ValueError(f"synthetic task: num_steps={num_steps} and max_operand={max_operand} must be >= 1")
    if not 0.0 <= stepwise_share <= 1.0:
        raise ValueError(f"synthetic task: stepwise_share={stepwise_share} must lie in [0, 1]")
    if restate_share < 0 or slip_share < 0 or restate_share + slip_share > 1:
        raise ValueError(f"synthetic task: restate_share={restate_share} and slip_share={slip_share} must "
                         "be >= 0 and sum to at most 1")
    rng, seen, out = random.Random(seed), set(), {}
    style = random.Random(f"rationale-style-{seed}")
    detours = random.Random(f"rationale-detour-{seed}")
    wanted = sum(sizes.get(s, 0) for s in SPLITS)
    attempts = 0
    for split in SPLITS:
        rows = out.setdefault(split, [])
        while len(rows) < sizes.get(split, 0):
            attempts += 1
            if attempts > 50 * wanted + 1000:
                knobs = f"candidates={candidates}" if problem == "search" else f"num_steps={num_steps}"
                raise ValueError(f"synthetic task: cannot draw {wanted} distinct {problem} problems with "
                                 f"{knobs}, max_operand={max_operand}; raise them.")
            if problem == "search":
                extra = style.randint(1, candidates) if style.random() < wasteful_share else 0
                row = make_search_problem(rng, candidates, max_operand, extra)
            else:
                stepwise = style.random() < stepwise_share
                draw = detours.random()
                detour = "restate" if draw < restate_share else "slip" if draw < restate_share + slip_share else ""
                row = make_problem(rng, num_steps, max_operand, stepwise, detour if stepwise else "", detours)
            if row["question"] not in seen:
                seen.add(row["question"])
                rows.append({"id": f"{split}-{len(rows)}", **row})
    return out


_SEARCH = re.compile(r"^Which of ([\d, ]+) added to (\d+) makes (\d+)\?$")
_STEP = re.compile(r"^(Wait, )?(\d+)([+-])(\d+)=(\d+)\.$")
_CHECK = re.compile(r"^(\d+)\+(\d+)=(\d+)(?: (yes|no))?\.$")  # unmarked: the first design's checks


def episode_kind(text: str) -> str:
    """What an episode of a synthetic rationale does: "step" (a right a+b=c.), "slip" (a
    wrong one), "fix" (" Wait, " and a step), "restate" ("Gus has 10 apples."), "terse"
    ("Total: 7."), else "other"."""
    text = text.strip()
    m = _STEP.match(text)
    if m:
        a, op, b, c = int(m.group(2)), m.group(3), int(m.group(4)), int(m.group(5))
        if m.group(1):
            return "fix"
        return "step" if (a + b if op == "+" else a - b) == c else "slip"
    if re.match(r"^Total: \d+\.$", text):
        return "terse"
    if re.match(r"^[A-Z][a-z]+ has \d+ [a-z]+\.$", text):
        return "restate"
    return "other"


def is_search(question: str) -> bool:
    """Whether `question` is a search problem ("Which of 4, 9, 7, 2 added to 5 makes 12?")."""
    return bool(_SEARCH.match(question.strip()))


def episode_kinds(question: str, texts: list[str]) -> list[str]:
    """The kind of each episode of a rationale for `question`: episode_kind's for a chain
    problem; for a search problem "check" (a wrong candidate, first time), "found" (the answer's
    check), "recheck" (a candidate checked before, no find yet), "after" (any check after the
    find), "slip" (a check with a wrong sum or a wrong yes / no), "answer" ("The answer is n."),
    else "other"."""
    search = _SEARCH.match(question.strip())
    if not search:
        return [episode_kind(t) for t in texts]
    options = {int(c) for c in search.group(1).split(", ")}
    base, target = int(search.group(2)), int(search.group(3))
    kinds, checked, found = [], set(), False
    for text in texts:
        text = text.strip()
        m = _CHECK.match(text)
        if m and int(m.group(1)) == base and int(m.group(2)) in options:
            c = int(m.group(2))
            if base + c != int(m.group(3)) or (m.group(4) and (m.group(4) == "yes") != (base + c == target)):
                kind = "slip"
            elif found:
                kind = "after"
            else:
                kind = "recheck" if c in checked else "found" if base + c == target else "check"
                found = kind == "found"
            checked.add(c)
        else:
            kind = "answer" if re.match(r"^The answer is \d+\.$", text) else "other"
        kinds.append(kind)
    return kinds
