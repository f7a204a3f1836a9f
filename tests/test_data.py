"""Tasks, loading, iteration and tokenisation on the real GSM8K / ARC-Challenge files."""

import json
import os
import re

import numpy as np
import pytest
import transformers

from hf_models import SHARED, STORIES_HF, gpt2_tokenizer
from latro_jax.data import (STOP_PHRASES, BatchIterator, DataError, PromptFormatter, get_task,
                            load_examples)
from latro_jax.data.synthetic import episode_kinds, generate_splits

GSM8K = os.path.join(SHARED, "data", "gsm8k")
ARC = os.path.join(SHARED, "data", "arc_challenge")
PHI3_TOKENIZER = os.path.join(SHARED, "tokenizers", "phi-3-mini")


@pytest.fixture(scope="module")
def gsm8k():
    task = get_task("gsm8k")
    return task, {s: load_examples(task, GSM8K, s) for s in ("train", "test")}


@pytest.fixture(scope="module")
def arc():
    task = get_task("arc_challenge")
    return task, {s: load_examples(task, ARC, s) for s in ("train", "validation", "test")}


def test_local_jsonl_counts(gsm8k, arc):
    assert {s: len(v) for s, v in gsm8k[1].items()} == {"train": 7473, "test": 1319}
    assert {s: len(v) for s, v in arc[1].items()} == {"train": 1119, "validation": 299, "test": 1172}


def test_gsm8k_gold_solutions_score_correct_and_wrong_numbers_do_not(gsm8k):
    task, splits = gsm8k
    for split, examples in splits.items():
        for ex in examples:
            assert ex.question.endswith(" Let's think step by step.")
            assert "####" not in ex.rationale and "The answer is" in ex.rationale
            assert task.score(ex.rationale, ex.gold), (split, ex.id, ex.rationale[-80:], ex.gold)
            wrong = str(float(ex.gold) + 1)
            assert not task.score(ex.rationale.rsplit("The answer is", 1)[0] + f"The answer is {wrong}.", ex.gold)


@pytest.mark.parametrize("text,expected", [
    ("5 apples and 7 pears. The answer is 1,234.", "1234"),
    ("The answer is 3. Wait, 4+4=8. The answer is -12.5 dollars", "-12.5"),
    ("He has 3 and then 10,000 more", "10000"),          # no phrase: the last number
    ("The answer is $.75 each, so 3", ".75"),            # first number after the last phrase
    ("no digits at all", None),
    ("The answer is unclear but 4 + 5 = 9", "4"),
    ("9 * 2 = 18. The answer is eighteen.", "18"),       # nothing after the phrase: last number
    ("It is 3, so 3 * 4 = 12. The answer is", "12"),
])
def test_gsm8k_extraction_edge_cases(text, expected):
    assert get_task("gsm8k").extract(text) == expected


def test_gsm8k_comparison_is_numeric():
    task = get_task("gsm8k")
    assert task.score("The answer is 1,000.", "1000") and task.score("The answer is 5.0", "5")
    assert task.score("The answer is -3", "-3") and not task.score("The answer is 3", "-3")
    assert not task.score("nothing", "0")


def test_arc_gold_text_scores_and_other_options_do_not(arc):
    task, splits = arc
    label_sets, sizes = set(), set()
    for split, examples in splits.items():
        for ex in examples:
            options = eval(re.search(r"\nOptions: (\[.*\])\n", ex.question).group(1))  # python repr
            sizes.add(len(options))
            assert ex.gold in options
            assert task.score(f"Let me think. The answer is {ex.gold}.", ex.gold), (split, ex.id, ex.gold)
            for other in options:
                if other != ex.gold:
                    expected = ex.gold.lower().rstrip(".") in other.lower()
                    assert task.score(f"The answer is {other}.", ex.gold) == expected, (ex.id, other)
    rows = [json.loads(l) for s in ("train", "validation", "test") for l in open(os.path.join(ARC, f"{s}.jsonl"))]
    label_sets = {tuple(r["choices"]["label"]) for r in rows}
    assert ("1", "2", "3", "4") in label_sets and ("A", "B", "C", "D", "E") in label_sets
    assert sizes == {3, 4, 5}


@pytest.mark.parametrize("text", [
    "The answer is:\nwet palms", "The answer is:\n\n**wet palms**", "Rubbing hands.\nThe answer is: wet palms",
    "So the answer is (wet palms).", "The answer is\n\n- wet palms\n\nbecause friction heats them.",
])
def test_arc_answer_on_the_line_after_the_phrase_is_scored(text):
    task = get_task("arc_challenge")
    assert task.score(text, "wet palms"), task.extract(text)
    assert not task.score(text.replace("wet palms", "dry palms"), "wet palms")


def test_arc_fallback_uses_the_last_segment():
    task = get_task("arc_challenge")
    assert task.score("Plants need light. So it is photosynthesis.", "photosynthesis")
    assert not task.score("Photosynthesis is not it. It is respiration.", "photosynthesis")
    assert task.score('the answer is: "(gravity)".', "Gravity")


def test_synthetic_task_is_deterministic_and_its_rationales_compute_the_answer():
    a = generate_splits(7, {"test": 50, "train": 200}, num_steps=3, max_operand=12)
    b = generate_splits(7, {"test": 50, "train": 200}, num_steps=3, max_operand=12)
    assert a == b and generate_splits(8, {"test": 50})["test"] != a["test"]
    assert not {r["question"] for r in a["test"]} & {r["question"] for r in a["train"]}
    task = get_task("synthetic")
    for row in a["test"] + a["train"]:
        ex = task.example(row, "synthetic")
        steps = re.findall(r"(\d+)([+-])(\d+)=(\d+)\.", ex.rationale)
        assert len(steps) == 3
        numbers = [int(n) for n in re.findall(r"(\d+)", row["question"])]
        value = numbers[0]
        for (x, op, y, result), n in zip(steps, numbers[1:]):
            assert int(x) == value and int(y) == n
            value = value + n if op == "+" else value - n
            assert int(result) == value >= 0
        assert ex.gold == str(value) and task.score(ex.rationale, ex.gold)
        assert not task.score(ex.rationale.replace(f"is {value}.", f"is {value + 1}."), ex.gold)


def test_synthetic_terse_rationales_keep_the_problems_and_state_the_answer():
    stepwise = generate_splits(3, {"test": 30, "train": 600}, num_steps=3, max_operand=9)
    mixed = generate_splits(3, {"test": 30, "train": 600}, num_steps=3, max_operand=9,
                            stepwise_share=0.4)
    task, terse = get_task("synthetic"), 0
    for a, b in zip(stepwise["test"] + stepwise["train"], mixed["test"] + mixed["train"]):
        assert (a["question"], a["answer"]) == (b["question"], b["answer"])
        if a["rationale"] != b["rationale"]:
            terse += 1
            assert b["rationale"] == f"Total: {a['answer']}. The answer is {a['answer']}."
            assert task.score(b["rationale"], b["answer"])
        else:
            assert len(re.findall(r"\d+[+-]\d+=\d+\.", b["rationale"])) == 3
    assert 0.5 < terse / 630 < 0.7  # 1 - stepwise_share of the rationales
    with pytest.raises(ValueError, match="stepwise_share"):
        generate_splits(3, {"test": 3}, stepwise_share=1.5)


def test_synthetic_search_rationales_check_candidates_in_order_up_to_the_find_and_some_after():
    a = generate_splits(4, {"test": 40, "train": 800}, problem="search", candidates=4, max_operand=9,
                        wasteful_share=0.7)
    assert a == generate_splits(4, {"test": 40, "train": 800}, problem="search", candidates=4, max_operand=9,
                                wasteful_share=0.7)
    plain = generate_splits(4, {"test": 40, "train": 800}, problem="search", candidates=4, max_operand=9)
    task, after, positions = get_task("synthetic"), [], []
    for row, same in zip(a["test"] + a["train"], plain["test"] + plain["train"]):
        assert (row["question"], row["answer"]) == (same["question"], same["answer"])  # the style never moves them
        m = re.fullmatch(r"Which of (\d), (\d), (\d), (\d) added to (\d) makes (\d+)\?", row["question"])
        options, base, target = [int(x) for x in m.groups()[:4]], int(m.group(5)), int(m.group(6))
        assert len(set(options)) == 4 and [o for o in options if base + o == target] == [int(row["answer"])]
        checks = [(int(x), int(y), int(z)) for x, y, z, mark in re.findall(r"(\d+)\+(\d+)=(\d+) (yes|no)\.",
                                                                         row["rationale"]) if mark == ("yes" if int(z) == target else "no")]
        find = options.index(int(row["answer"]))
        extra = len(checks) - find - 1
        assert [y for _, y, _ in checks] == options[:find + 1] + [options[(find + 1 + i) % 4] for i in range(extra)]
        assert all(x == base and z == x + y for x, y, z in checks)
        assert len(checks) >= find + 1 and same["rationale"].count("=") == find + 1  # plain rationales stop at the find
        assert task.score(row["rationale"], row["answer"]) and row["rationale"].endswith(f"The answer is {row['answer']}.")
        after.append(extra)
        positions.append(find)
    assert 0.62 < np.mean(np.array(after) > 0) < 0.78 and set(after) == {0, 1, 2, 3, 4}
    assert np.bincount(positions).min() > 150
    with pytest.raises(ValueError, match="candidates"):
        generate_splits(0, {"test": 3}, problem="search", candidates=5, max_operand=4)
    with pytest.raises(ValueError, match="problem"):
        generate_splits(0, {"test": 3}, problem="maze")


def test_episode_kinds_of_search_and_chain_traces():
    q = "Which of 4, 9, 7, 2 added to 5 makes 12?"
    texts = ["5+4=9 no.", " 5+4=9 no.", " 5+9=15 no.", " 5+2=7 yes.", " 5+7=12 yes.", " 5+2=7 no.", " 5+4=9 no.",
             " Hmm.", " The answer is 7."]
    assert episode_kinds(q, texts) == ["check", "recheck", "slip", "slip", "found", "after", "after", "other",
                                       "answer"]
    assert episode_kinds(q, ["6+4=10 no.", "5+3=8 no.", "5+4=9 maybe."]) == ["other"] * 3  # base, candidate, mark
    assert episode_kinds(q, ["5+4=9.", " 5+7=12.", " 5+2=7."]) == ["check", "found", "after"]  # unmarked checks
    assert episode_kinds("Ann has 3 apples. Ann gets 4 more. How many apples?",
                         ["3+4=7.", " Ann has 7 apples.", " 3+4=8.", " Wait, 3+4=7.", " The answer is 7."]) == [
        "step", "restate", "slip", "fix", "other"]


def test_word_tokenizer_keeps_words_whole_digits_single_and_round_trips(tmp_path):
    from latro_jax.data.task_tokenizers import build_char_tokenizer, build_word_tokenizer
    rows = generate_splits(0, {"train": 300}, num_steps=3, max_operand=9, stepwise_share=0.5)["train"]
    texts = [r["question"] for r in rows] + [r["rationale"] for r in rows]
    tok = build_word_tokenizer(texts)
    assert tok.get_vocab() == build_word_tokenizer(texts).get_vocab()  # deterministic
    pieces = lambda text: [tok.decode([i]) for i in tok(text, add_special_tokens=False).input_ids]
    assert pieces("Ann has 12 apples. 12+3=15. The answer is 15.") == [
        "Ann", " has", " 1", "2", " apples", ".", " 1", "2", "+", "3", "=", "1", "5", ".",
        " The", " answer", " is", " 1", "5", "."]
    unseen = "Zed owns 40 kiwis!\nAnswer: 7"  # outside the learned words: characters
    for text in texts[:50] + [unseen]:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == text
    assert tok.unk_token_id not in tok(unseen).input_ids
    chars = build_char_tokenizer()
    ratio = np.mean([len(chars(q).input_ids) / len(tok(q).input_ids) for q in texts[:300]])
    assert ratio > 3  # questions are ~3.4x shorter than in characters
    fmt = PromptFormatter(tok)
    ids = fmt.completion_ids(rows[0]["rationale"])
    assert any(ids[i:i + len(p)] == list(p) for p in fmt.stops.phrases for i in range(len(ids)))
    assert fmt.answer_ids("15")[:-1] == tok(" 15", add_special_tokens=False).input_ids
    tok.save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(texts[0]).input_ids == tok(texts[0]).input_ids


def test_iteration_resumes_exactly_and_hosts_get_disjoint_covering_shares():
    it = BatchIterator(103, 8, seed=3)
    first = [it.next() for _ in range(5)]
    saved = it.state()
    rest = [it.next() for _ in range(20)]  # crosses an epoch boundary (12 batches per epoch)
    resumed = BatchIterator(103, 8, seed=3)
    resumed.restore(saved)
    assert [resumed.next() for _ in range(20)] == rest
    assert len(set(sum(first + rest[:7], []))) == 96  # one epoch: no repeats
    hosts = [BatchIterator(103, 8, seed=3, process_index=p, process_count=2) for p in range(2)]
    for step in range(15):
        a, b = (h.next() for h in hosts)
        assert len(a) == len(b) == 4 and not set(a) & set(b)
        assert a + b == (first + rest)[step]


@pytest.mark.parametrize("content,match", [
    ({"question": "q"}, r"bad\.jsonl: row 2: missing field 'answer'"),
    ({"question": "q", "answer": "so\n#### twelve"}, r"bad\.jsonl: row 2: final answer 'twelve' is not a number"),
])
def test_malformed_gsm8k_rows_name_file_and_row(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "ok", "answer": "1+1=2\n#### 2"}) + "\n" + json.dumps(content) + "\n")
    with pytest.raises(DataError, match=match):
        load_examples(get_task("gsm8k"), str(path), "train")


def test_unknown_arc_answer_key_names_file_and_row(tmp_path):
    path = tmp_path / "arc.jsonl"
    row = {"id": "x", "question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"}
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"arc\.jsonl: row 1: answerKey 'E' is not one of the labels"):
        load_examples(get_task("arc_challenge"), str(path), "train")


def test_missing_data_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        load_examples(get_task("gsm8k"), str(tmp_path / "nope.jsonl"), "train")
    with pytest.raises(FileNotFoundError, match="no validation.jsonl"):
        load_examples(get_task("gsm8k"), GSM8K, "validation")


def test_chat_template_prompts_and_end_of_turn_answers():
    tok = transformers.AutoTokenizer.from_pretrained(PHI3_TOKENIZER)
    fmt = PromptFormatter(tok)
    ids = fmt.prompt_ids("What is 2+3? Let's think step by step.")
    assert ids[0] == 32010 and ids[-2:] == [32007, 32001]  # <|user|> ... <|end|> <|assistant|>
    assert fmt.end_id == 32007 and 32007 in fmt.stops.ids
    answer = fmt.answer_ids("The answer is 5.")
    assert answer[-1] == 32007 and tok.decode(answer[:-1]) == "The answer is 5."
    assert tuple(tok(" The answer is", add_special_tokens=False).input_ids) in fmt.stops.phrases


def test_plain_text_prompts_without_chat_template():
    tok = transformers.AutoTokenizer.from_pretrained(STORIES_HF)
    fmt = PromptFormatter(tok)
    assert not fmt.chat and fmt.prompt_ids("Tom has 3 apples.") == tok("Tom has 3 apples.").input_ids
    assert fmt.answer_ids("The answer is 5.")[-1] == tok.eos_token_id == fmt.end_id


POSITIONS = {  # text before the phrase
    "start of text": "",
    "after '. '": "Add 3 and 4 to get 7. ",
    "start of a line": "Add 3 and 4 to get 7.\n",
    "after a blank line": "Add 3 and 4 to get 7.\n\n",
}


@pytest.fixture(scope="module", params=["phi-3-mini", "gpt2", pytest.param("smollm2", marks=pytest.mark.slow)])
def real_tokenizer(request):
    if request.param == "smollm2":
        return transformers.AutoTokenizer.from_pretrained(request.getfixturevalue("smollm2_dir"))
    if request.param == "gpt2":
        return gpt2_tokenizer()
    return transformers.AutoTokenizer.from_pretrained(PHI3_TOKENIZER)


@pytest.mark.parametrize("gold", ["18", "1,250", "-3", "wet palms", "B"])
def test_the_gold_span_is_the_gold_answers_own_tokens(real_tokenizer, gold):
    """RLPR scores only the gold answer's tokens of y*: after a rationale and as a whole
    completion, the span decodes to the gold, the answer phrase before it, the period after."""
    fmt = PromptFormatter(real_tokenizer)
    for ids in (fmt.answer_ids(f"The answer is {gold}."), fmt.completion_ids(f"The answer is {gold}.")):
        start, end = fmt.gold_span(ids, gold)
        assert fmt.decode(ids[start:end]).strip() == gold
        assert fmt.decode(ids[:start]).strip() == "The answer is" and fmt.decode(ids[end:]).strip() == "."


@pytest.mark.parametrize("phrase", STOP_PHRASES)
def test_every_stop_phrase_is_cut_at_its_start_in_every_position(real_tokenizer, phrase):
    """SPEC 1.3 on real tokenizers (SentencePiece: Phi-3; byte-level BPE: GPT-2, SmolLM2): the
    phrase as the tokenizer spells it at the start of the text, after a space, at the start of
    a line and after a blank line ends the rationale at the phrase's first character. Phrases
    that contain another ("So, the answer is" holds " the answer is") are cut at their own
    start."""
    from latro_jax.stops import truncate
    fmt = PromptFormatter(real_tokenizer)
    stops = fmt.stops
    for position, before in POSITIONS.items():
        text = before + phrase.lstrip(" \n") + " 42."
        ids = real_tokenizer(text, add_special_tokens=False).input_ids
        cut, finished = truncate(ids, stops)
        assert finished, (position, text)
        assert real_tokenizer.decode(ids[:cut]).rstrip() == before.rstrip(), (position, text, ids[:cut])


@pytest.mark.parametrize("text,gold,correct", [
    (r"so \boxed{\frac{1}{2}}.", r"\frac12", True), (r"\boxed{0.5}", r"\frac{1}{2}", False),
    (r"\boxed{1,000}", "1000", True), (r"\boxed{x = 5}", "5", True), (r"\boxed{\dfrac{3}{4}}", "3/4", True),
    (r"first \boxed{2} then \boxed{3}", "3", True), (r"first \boxed{3} then \boxed{2}", "3", False),
    (r"\boxed{ 10^{\circ} }", "10", True), (r"\boxed{\text{(A)}}", "(A)", True), (r"\boxed{5", "5", False),
    (r"\boxed{\left( 1, 2 \right)}", "(1,2)", True), (r"\boxed{50\%}", "50", True), ("no box 5", "5", False),
    (r"\boxed{\sqrt2}", r"\sqrt{2}", True), (r"\boxed{.5}", "0.5", True), (r"\boxed{2.50}", "2.5", True),
    (r"\boxed{\frac{a}{\{b\}}}", r"\frac{a}{\{b\}}", True),
])
def test_math_boxed_scores_the_last_box_after_normalisation(text, gold, correct):
    assert get_task("math_boxed").score(text, gold) == correct


def test_math_boxed_rows_take_the_bare_problem_and_unbox_a_boxed_gold():
    task = get_task("math_boxed")
    ex = task.example({"problem": " What is 1+1? ", "answer": r"\boxed{2}", "solution": "1+1=2"}, "row")
    assert (ex.question, ex.gold, ex.rationale) == ("What is 1+1?", "2", "1+1=2")
    with pytest.raises(DataError, match="missing field 'problem'"):
        task.example({"answer": "2"}, "row 3")


def test_restate_and_slip_styles_are_seeded_right_and_segment_as_episodes():
    """The detours of worked rationales: fixed by the task seed, the problems unchanged, every
    rationale ends with the right answer, a restatement repeats the running value (one episode
    of its own) and a slip is followed by " Wait, " and the right step (two episodes)."""
    from latro_jax.data.task_tokenizers import build_word_tokenizer
    from latro_jax.episodes import SegmentConfig, make_segmenter
    knobs = dict(num_steps=4, max_operand=9, stepwise_share=0.6, restate_share=0.3, slip_share=0.3)
    rows = generate_splits(5, {"test": 40, "train": 400}, **knobs)
    assert rows == generate_splits(5, {"test": 40, "train": 400}, **knobs)
    plain = generate_splits(5, {"test": 40, "train": 400}, num_steps=4, max_operand=9, stepwise_share=0.6)
    assert [r["question"] for r in rows["train"]] == [r["question"] for r in plain["train"]]
    task = get_task("synthetic")
    tok = build_word_tokenizer([r["question"] for r in rows["train"]] + [r["rationale"] for r in rows["train"]])
    segment = make_segmenter(SegmentConfig(), PromptFormatter(tok))
    kinds = {"restate": 0, "slip": 0}
    for row in rows["test"] + rows["train"]:
        rationale, gold = row["rationale"], row["answer"]
        assert rationale.endswith(f"The answer is {gold}.") and task.score(rationale, gold)
        steps = re.findall(r"(\d+)([+-])(\d+)=(\d+)\.", rationale)
        pieces = segment(tok(rationale, add_special_tokens=False).input_ids).texts(tok)
        if " has " in rationale:
            kinds["restate"] += 1
            restated = re.search(r"(?:^|\. )(\w+) has (\d+) (\w+)\.", rationale)
            index = next(i for i, p in enumerate(pieces) if " has " in p)
            assert pieces[index].strip() == f"{restated.group(1)} has {restated.group(2)} {restated.group(3)}."
            assert steps[index - 1][3] == restated.group(2)  # the value just computed, nothing new
        if "Wait, " in rationale:
            kinds["slip"] += 1
            index = next(i for i, p in enumerate(pieces) if p.strip().startswith("Wait, "))
            slip, fix = re.search(r"(\d+[+-]\d+)=(\d+)\.", pieces[index - 1]), re.search(r"(\d+[+-]\d+)=(\d+)\.", pieces[index])
            assert slip.group(1) == fix.group(1) and slip.group(2) != fix.group(2)
            assert eval(fix.group(1)) == int(fix.group(2)) != int(slip.group(2))
    assert 40 < kinds["restate"] < 110 and 40 < kinds["slip"] < 110  # ~0.6 x 0.3 of 440
    with pytest.raises(ValueError, match="sum to at most 1"):
        generate_splits(5, {"test": 3}, restate_share=0.7, slip_share=0.5)
