"""A character-level tokenizer in Hugging Face format (built with `tokenizers`), for the
synthetic task: one token per character, <pad>=0, <s>=1 (prepended), </s>=2."""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")
DEFAULT_ALPHABET = string.ascii_letters + string.digits + " .,?!+-=*:'\n"


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET):
    """A transformers PreTrainedTokenizerFast over the characters of `alphabet`."""
    from transformers import PreTrainedTokenizerFast
    chars = sorted(set(alphabet))
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    vocab.update({c: len(SPECIAL) + i for i, c in enumerate(chars)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
