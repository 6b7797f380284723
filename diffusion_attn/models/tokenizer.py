"""Small tokenizers built in-process, so the embedded tiny models need no download.

Each builder returns the tokenizer class the real pipeline ships with, so that ``pipe(prompt=...)``
follows the real text path and ``save_pretrained`` / ``from_pretrained`` round-trip exactly:

* :func:`clip_tokenizer` -- a real ``CLIPTokenizer`` (byte-level BPE) over the 256 byte symbols and their
  ``</w>`` end-of-word forms, no merges: one token per character. 514 ids.
* :func:`t5_tokenizer` -- a real ``T5Tokenizer`` (Unigram / SentencePiece style) over printable ASCII plus
  the ``▁`` word marker: one token per character. Unknown characters map to ``<unk>``.
* :func:`llama_tokenizer` -- a Llama-3 style ``PreTrainedTokenizerFast`` (the class Llama-3 checkpoints use):
  Llama-3 pre-tokenization regex, byte-level BPE over the 256 bytes, plus every pre-token of the default
  HunyuanVideo prompt template as a whole-word token. The template prefix therefore tokenizes to exactly
  95 tokens, as with the real HunyuanVideo tokenizer, so the pipeline's default ``crop_start=95`` is right.

All three are deterministic functions of their arguments (no training, no randomness).
"""

from __future__ import annotations

import re
import string
from functools import lru_cache

from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import CLIPTokenizer, PreTrainedTokenizerFast, T5Tokenizer

__all__ = ["clip_tokenizer", "t5_tokenizer", "llama_tokenizer", "HUNYUAN_TEMPLATE_CROP_START"]

# The Llama-3 pre-tokenizer split pattern (from Meta-Llama-3's tokenizer.json).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
)
# Number of tokens before the user prompt in diffusers' default HunyuanVideo template (its `crop_start`).
HUNYUAN_TEMPLATE_CROP_START = 95


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode table (the byte-level BPE alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level(text: str) -> str:
    table = _bytes_to_unicode()
    return "".join(table[b] for b in text.encode("utf-8"))


def _word_merges(words) -> list[tuple[str, str]]:
    """BPE merges that build each lower-case ASCII word left to right into one ``word</w>`` token.

    Longer words come first, so a pair inside a long word (``t o`` in ``bottom``) is never taken by the
    merges of a shorter word (``top``) before the long word is complete."""
    merges: list[tuple[str, str]] = []
    for word in sorted(dict.fromkeys(words), key=lambda w: (-len(w), w)):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        prefix = symbols[0]
        for symbol in symbols[1:]:
            if (prefix, symbol) not in merges:
                merges.append((prefix, symbol))
            prefix += symbol
    return merges


def clip_tokenizer(model_max_length: int = 77, words=()) -> CLIPTokenizer:
    """Character-level ``CLIPTokenizer``: ids 0-255 bytes, 256-511 bytes + ``</w>``, 512 BOS, 513 EOS (= pad).

    ``words`` (lower-case ASCII) each become one whole-word token (ids from 514 on, with the BPE merges
    that build them); any other word still falls back to characters."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    merges = _word_merges(words)
    tokens += [a + b for a, b in merges]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def t5_tokenizer(model_max_length: int = 512, words=()) -> T5Tokenizer:
    """Character-level ``T5Tokenizer``: 0 pad, 1 EOS, 2 unk, 3 ``▁``, then printable ASCII characters.

    ``words`` each become one whole-word piece ``▁word`` scored above any split into characters."""
    chars = [c for c in string.printable if not c.isspace()]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)] + [(c, -1.0) for c in chars]
    pieces += [("▁" + w, -0.5) for w in dict.fromkeys(words)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def _llama_template_words() -> list[str]:
    """Byte-level forms of the Llama-3 pre-tokens of the default HunyuanVideo template (whole-word tokens)."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    pre = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")
    specials = "|".join(re.escape(s) for s in _LLAMA3_SPECIALS)
    segments = re.split(specials + r"|\{\}", DEFAULT_PROMPT_TEMPLATE["template"])
    words: list[str] = []
    for segment in segments:
        for piece, _ in pre.pre_tokenize_str(segment):
            word = _byte_level(piece)
            if len(word) > 1 and word not in words:
                words.append(word)
    return words


def llama_tokenizer(model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """Llama-3 style byte-level BPE tokenizer (right padding, BOS added), ~330 ids."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + _llama_template_words()
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = Tokenizer(BPE(vocab=vocab, merges=[], ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(_LLAMA3_SPECIALS))
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, backend.token_to_id(bos))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        padding_side="right",
        model_max_length=model_max_length,
    )
