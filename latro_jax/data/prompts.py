"""Token ids for prompts, answers, rationales and stops with the model's tokenizer: the chat
template (user turn + generation prompt) when the tokenizer has one, plain text otherwise."""

from __future__ import annotations

from typing import Sequence

from latro_jax.data.tasks import STOP_PHRASES
from latro_jax.stops import Stops


def continuation_ids(tokenizer, prefix: str, text: str) -> list[int]:
    """The ids of `text` as it tokenizes after `prefix` (SentencePiece tokenizers mark a word
    start differently at the start of a string than after other text)."""
    base = tokenizer(prefix, add_special_tokens=False).input_ids
    full = tokenizer(prefix + text, add_special_tokens=False).input_ids
    if full[:len(base)] == base:
        return full[len(base):]
    return tokenizer(text, add_special_tokens=False).input_ids


def phrase_variants(tokenizer, phrase: str) -> set[tuple[int, ...]]:
    """The token ids of `phrase` in every position a tokenizer spells differently: at the start
    of the text, after a space, at the start of a line, after a blank line. (SentencePiece marks
    a word start; byte-level BPE folds a leading space into the word: " Answer:" is not
    "Answer:" with a space token before it.)"""
    core = phrase.lstrip(" \n")
    variants = (tokenizer(core, add_special_tokens=False).input_ids,
                continuation_ids(tokenizer, "x.", " " + core),
                continuation_ids(tokenizer, "x.\n", core),
                continuation_ids(tokenizer, "x.\n\n", core))
    return {tuple(v) for v in variants if v}


class PromptFormatter:
    """Question text -> prompt ids; answer / rationale text -> ids ending in the end token.

    stops: stops.ids, every id that ends a generation -- the end-of-turn token of the chat
    template, the tokenizer's EOS and pad, and `eos_ids` (the model's own end ids: config.json
    and generation_config.json); stops.phrases, the SPEC 1.3 phrases in each position's
    tokenization (phrase_variants). LaTRO cuts rationales at both, completions end at the ids
    (stops.ends_only())."""

    def __init__(self, tokenizer, *, chat_template: bool | None = None,
                 stop_phrases: Sequence[str] = STOP_PHRASES, eos_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.chat = bool(tokenizer.chat_template) if chat_template is None else chat_template
        if self.chat and not tokenizer.chat_template:
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        self.end_id = self._end_of_turn_id() if self.chat else tokenizer.eos_token_id
        if self.end_id is None:
            raise ValueError("the tokenizer has no eos token; set one (it ends answers and rationales)")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_id
        ends = {self.end_id, tokenizer.eos_token_id, self.pad_id, *map(int, eos_ids)}
        self.stops = Stops(tuple(sorted(ends - {None})),
                           tuple(sorted(set().union(*(phrase_variants(tokenizer, p) for p in stop_phrases)))))

    def _end_of_turn_id(self) -> int:
        """The first special token the template puts after an assistant message."""
        tok = self.tokenizer
        marker = "ZQXJ"
        text = tok.apply_chat_template([{"role": "user", "content": "hi"},
                                        {"role": "assistant", "content": marker}], tokenize=False)
        after = tok(text.split(marker, 1)[1], add_special_tokens=False).input_ids
        special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
        return next((i for i in after if i in special), tok.eos_token_id)

    def vocabulary_problem(self, vocab_size: int, source: str) -> str | None:
        """Why this tokenizer cannot drive a model of `vocab_size` embedding rows (named by
        `source`), or None: ids past the embedding would read NaN logits."""
        tok = self.tokenizer
        largest = max(tok.get_vocab().values())
        if largest >= vocab_size:
            return (f"the tokenizer has ids up to {largest} ({len(tok)} tokens) but the model ({source}) "
                    f"has {vocab_size} embedding rows; use the model's own tokenizer or a model built for this one.")
        outside = [i for i in (*self.stops.ids, self.pad_id, tok.bos_token_id) if i is not None and i >= vocab_size]
        if outside:
            return f"token ids {outside} (stops, pad, bos) lie beyond the model's {vocab_size} embedding rows ({source})."
        return None

    def prompt_ids(self, question: str) -> list[int]:
        if self.chat:
            return list(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], add_generation_prompt=True,
                tokenize=True, return_dict=True)["input_ids"])
        return self.tokenizer(question).input_ids

    def answer_ids(self, answer: str) -> list[int]:
        """y as it follows a rationale ending in ".", plus the end token."""
        return continuation_ids(self.tokenizer, "x.", " " + answer.lstrip()) + [self.end_id]

    def completion_ids(self, text: str) -> list[int]:
        """A full assistant completion (SFT target), plus the end token."""
        return self.tokenizer(text, add_special_tokens=False).input_ids + [self.end_id]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def gold_span(self, ids: Sequence[int], gold: str) -> tuple[int, int]:
        """(start, end): the tokens of `ids` (an answer, "The answer is {gold}." + end) that
        spell the gold answer itself -- the last start and then the shortest span whose text,
        stripped, is `gold` (or `gold` followed by "." where the tokenizer merged them); the
        answer phrase, the period and the end token are context. Every token but the end
        token when no span spells it."""
        want = gold.strip()
        for strict in (True, False):
            for start in range(len(ids) - 1, -1, -1):
                for end in range(start + 1, len(ids) + 1):
                    text = self.decode(ids[start:end]).strip()
                    if text == want or (not strict and text.rstrip(".") == want and text.startswith(want)):
                        return start, end
        return 0, max(len(ids) - 1, 1)
