"""Tasks: how a dataset row becomes a question, a gold answer and (when the data has one) a gold
rationale, and how a model's output is scored (SPEC 1.4).

Every task turns rows into `Example`s with `example(row, where)` (`where` names the file and row
for error messages), extracts a comparable answer from an output with `extract(text)`, and
decides correctness with `is_correct(extracted, gold)`; `score(text, gold)` combines the two.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

ANSWER_PHRASE = "The answer is"
# SPEC 1.3: the rationale ends at the first of these (matched on token ids by the trainer).
STOP_PHRASES = ("The answer is", " The answer is", "\nThe answer is", "The answer is:",
                " the answer is", "Answer:", "\nAnswer:", "Therefore, the answer is",
                "So, the answer is", "so the final answer is")


class DataError(ValueError):
    """A dataset row that cannot be used, with its file and row number."""


@dataclasses.dataclass(frozen=True)
class Example:
    id: str
    question: str  # the user turn, chain-of-thought trigger included
    gold: str  # the gold answer text (GSM8K: the number; ARC: the option text)
    rationale: str | None = None  # gold rationale ending in "The answer is {gold}." (SFT)

    @property
    def answer(self) -> str:
        """y: the text appended after a rationale (the end token is added at tokenisation)."""
        return answer_text(self.gold)


def answer_text(gold: str) -> str:
    return f"{ANSWER_PHRASE} {gold}."


def _field(row: Mapping[str, Any], name: str, where: str):
    if name not in row or row[name] is None:
        raise DataError(f"{where}: missing field {name!r} (fields: {sorted(row)}); "
                        "map the dataset's field names with the task's `fields` option.")
    return row[name]


class Task:
    name = "task"
    fields: Mapping[str, str] = {}

    def __init__(self, fields: Mapping[str, str] | None = None):
        self.fields = {**self.fields, **(fields or {})}

    def example(self, row: Mapping[str, Any], where: str) -> Example:
        raise NotImplementedError

    def extract(self, text: str) -> str | None:
        raise NotImplementedError

    def is_correct(self, extracted: str | None, gold: str) -> bool:
        raise NotImplementedError

    def score(self, text: str, gold: str) -> bool:
        """The evaluation rule: extract (with the task's fallbacks) and grade."""
        return self.is_correct(self.extract(text), gold)

    def given_answer(self, text: str) -> str | None:
        """The answer an output states, without extract's fallbacks (none when it states none)."""
        return self.extract(text)

    def reward(self, text: str, gold: str, finished: bool) -> float:
        """The training reward of an output (SPEC 2.6; MRT-RL, GRPO, STaR): 1 only when it finished
        within its budget and the answer it states is right. A cut-off output scores 0 even when
        its text holds the gold, or nothing would press on length."""
        return float(finished and self.is_correct(self.given_answer(text), gold))

    def vote_key(self, extracted: str):
        """What maj@k votes over: answers with equal keys are the same answer."""
        return extracted


# ---------------------------------------------------------------- GSM8K
NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def _to_float(s: str) -> float | None:
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


class GSM8K(Task):
    """Grade-school math. Gold = the text after the last "#### " (commas removed); the gold
    rationale is the solution with "####" replaced by "The answer is"."""

    name = "gsm8k"
    fields = {"question": "question", "answer": "answer"}

    def example(self, row, where):
        question = str(_field(row, self.fields["question"], where)).strip()
        solution = str(_field(row, self.fields["answer"], where))
        if "#### " not in solution:
            raise DataError(f"{where}: the answer field has no '#### <number>' final answer.")
        gold = solution.rsplit("#### ", 1)[1].strip().replace(",", "")
        if not NUMBER.fullmatch(gold):
            raise DataError(f"{where}: final answer {gold!r} is not a number.")
        rationale = solution.replace("####", ANSWER_PHRASE).rstrip()
        rationale = rationale if rationale.endswith(".") else rationale + "."
        return Example(id=str(row.get("id", where)), question=f"{question} Let's think step by step.",
                       gold=gold, rationale=rationale)

    def extract(self, text):
        """given_answer; when no number follows the last "The answer is" (or the phrase is
        absent), the last number in the text ("9 * 2 = 18. The answer is eighteen." -> 18)."""
        stated = self.given_answer(text)
        if stated is not None:
            return stated
        numbers = NUMBER.findall(text)[-1:]
        return numbers[0].replace(",", "") if numbers else None

    def given_answer(self, text):
        """The first number after the LAST "The answer is" (no last-number fallback)."""
        numbers = NUMBER.findall(text.rsplit(ANSWER_PHRASE, 1)[1]) if ANSWER_PHRASE in text else []
        return numbers[0].replace(",", "") if numbers else None

    def vote_key(self, extracted):
        value = _to_float(extracted)
        return extracted if value is None else value

    def is_correct(self, extracted, gold):
        value, target = _to_float(extracted or ""), _to_float(gold)
        return value is not None and target is not None and value == target


# ---------------------------------------------------------------- ARC-Challenge
_ARC_STRIP = " :[]()\"'.*"  # SPEC 1.4's characters, plus markdown emphasis
_SENTENCE_END = re.compile(r"(?<=\.)\s+")


class ARCChallenge(Task):
    """Multiple choice science questions; gold y uses the option TEXT, not its label."""

    name = "arc_challenge"
    fields = {"question": "question", "choices": "choices", "answer_key": "answerKey"}

    def example(self, row, where):
        question = str(_field(row, self.fields["question"], where)).strip()
        choices = _field(row, self.fields["choices"], where)
        key = str(_field(row, self.fields["answer_key"], where))
        try:
            texts, labels = list(choices["text"]), [str(x) for x in choices["label"]]
        except (KeyError, TypeError) as e:
            raise DataError(f"{where}: choices must be {{'text': [...], 'label': [...]}}") from e
        if len(texts) != len(labels) or not texts:
            raise DataError(f"{where}: choices have {len(texts)} texts and {len(labels)} labels.")
        if key not in labels:
            raise DataError(f"{where}: answerKey {key!r} is not one of the labels {labels}.")
        prompt = (f"Question: {question}\nOptions: {texts!r}\nLet's think step by step first then "
                  "print your answer like 'The answer is (one of the options)'.")
        return Example(id=str(row.get("id", where)), question=prompt, gold=str(texts[labels.index(key)]))

    def extract(self, text):
        """After the first "the answer is": the text after the phrase up to the end of its first
        non-empty line (the answer may sit on the next line: "The answer is:\n\n**wet palms**"),
        stripped of ' :[]()". quotes and markdown emphasis; without the phrase: the last
        "."-separated segment. Lower-case."""
        lowered = text.lower()
        phrase = ANSWER_PHRASE.lower()
        if phrase in lowered:
            after = lowered.split(phrase, 1)[1].lstrip(_ARC_STRIP + "\n\t")
            return after.split("\n", 1)[0].strip(_ARC_STRIP)
        segments = [s for s in lowered.split(".") if s.strip()]
        return segments[-1].strip(_ARC_STRIP) if segments else None

    def given_answer(self, text):
        """extract's answer after "the answer is"; none without the phrase (no last-segment fallback)."""
        return self.extract(text) if ANSWER_PHRASE.lower() in text.lower() else None

    def vote_key(self, extracted):
        return _first_sentence(extracted)

    def is_correct(self, extracted, gold):
        """SPEC 1.4: the gold text (lower-case, trailing "." removed) is a substring of the first
        sentence of the extracted text. Also correct: the extracted text starts with the gold
        text (options that are several sentences long). The gold is stripped of the same
        characters as the extracted text (an option may end in ")")."""
        if extracted is None:
            return False
        target = gold.lower().strip()
        target = (target[:-1] if target.endswith(".") else target).strip(_ARC_STRIP)
        return bool(target) and (target in _first_sentence(extracted) or extracted.startswith(target))


def _first_sentence(text: str) -> str:
    return _SENTENCE_END.split(text, 1)[0].strip(_ARC_STRIP)


# ---------------------------------------------------------------- synthetic arithmetic
class SyntheticArithmetic(GSM8K):
    """The arithmetic problems of data/synthetic.py, scored like GSM8K (the number after
    "The answer is")."""

    name = "synthetic"
    fields = {"question": "question", "answer": "answer", "rationale": "rationale"}

    def example(self, row, where):
        try:
            question, gold = str(row[self.fields["question"]]), str(row[self.fields["answer"]])
        except KeyError as e:
            raise DataError(f"{where}: missing field {e}") from e
        return Example(id=str(row.get("id", where)), question=question, gold=gold,
                       rationale=row.get(self.fields["rationale"]))


# ---------------------------------------------------------------- competition math (\boxed{})
def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}) of `text`, braces balanced; None
    when there is none or it is not closed."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:]
    brace = rest.find("{")
    if brace < 0:  # "\boxed 5"
        return rest.split(None, 1)[1].split("$")[0].strip() if len(rest.split(None, 1)) > 1 else None
    depth = 0
    for i in range(brace, len(rest)):
        depth += {"{": 1, "}": -1}.get(rest[i], 0)
        if depth == 0:
            return rest[brace + 1:i]
    return None


_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_FRAC_SHORT = re.compile(r"\\frac(\d)(\d)")
_SQRT_SHORT = re.compile(r"\\sqrt(\w)")


def normalize_math_answer(answer: str) -> str:
    """MATH-style normalisation before comparing answers: no spaces, \\left/\\right, $, degree
    marks, percent signs or \\text{} wrappers; dfrac/tfrac as frac; \\frac12 as \\frac{1}{2};
    a/b of integers as \\frac{a}{b}; "x = 5" as "5"; thousands separators dropped; a leading
    "." gets a 0 and a trailing "." goes."""
    s = answer.strip().replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "").replace("%", "")
    s = _TEXT.sub(r"\1", s).replace(" ", "")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if len(s.split("=")) == 2 and len(s.split("=")[0]) <= 2:
        s = s.split("=")[1]
    s = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", s)
    s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
    if re.fullmatch(r"-?\d+/\d+", s):
        num, den = s.split("/")
        s = f"\\frac{{{num}}}{{{den}}}"
    if s.startswith("."):
        s = "0" + s
    return s.rstrip(".")


class MathBoxed(Task):
    """Competition math (MATH, AIME, DeepScaleR): the bare problem is the user turn; an output's
    answer is the content of its LAST \\boxed{} (MRT's R1 runs), right when it equals the gold
    after normalize_math_answer, or as numbers."""

    name = "math_boxed"
    fields = {"question": "problem", "answer": "answer", "rationale": "solution"}

    def example(self, row, where):
        question = str(_field(row, self.fields["question"], where)).strip()
        gold = str(_field(row, self.fields["answer"], where)).strip()
        gold = last_boxed(gold) or gold
        if not gold:
            raise DataError(f"{where}: empty answer.")
        rationale = row.get(self.fields["rationale"])
        return Example(id=str(row.get("id", row.get("unique_id", where))), question=question, gold=gold,
                       rationale=None if rationale is None else str(rationale))

    def extract(self, text):
        return last_boxed(text)

    def given_answer(self, text):
        """The last \\boxed{} of the solution: after the last "</think>" when the output thinks."""
        return last_boxed(text.rsplit("</think>", 1)[1] if "</think>" in text else text)

    def vote_key(self, extracted):
        return normalize_math_answer(extracted)

    def is_correct(self, extracted, gold):
        if extracted is None:
            return False
        a, b = normalize_math_answer(extracted), normalize_math_answer(gold)
        if a == b:
            return True
        x, y = _to_float(a), _to_float(b)
        return x is not None and y is not None and abs(x - y) <= 1e-9 * max(1.0, abs(y))


TASKS = {"gsm8k": GSM8K, "arc_challenge": ARCChallenge, "synthetic": SyntheticArithmetic,
         "math_boxed": MathBoxed}


def get_task(name: str, fields: Mapping[str, str] | None = None) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](fields)
