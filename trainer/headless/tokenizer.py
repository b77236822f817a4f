"""CLIP's byte-level BPE tokenizer (both SDXL text encoders use it), from the vocabulary shipped beside this file.

A port of OpenAI CLIP's ``simple_tokenizer.py`` (MIT licence, ``assets/CLIP_LICENSE.txt``); the merges are
its ``bpe_simple_vocab_16e6.txt.gz``. No installed package carries that file reliably (transformers and
diffusers download tokenizers at run time; open_clip is not a dependency), so it ships here: 1.3 MB, read
once. Token ids equal Hugging Face's ``CLIPTokenizer`` for ``openai/clip-vit-large-patch14``: 49406 start,
49407 end, 49408 in all. ``ftfy``'s text repair is used when installed (as CLIP does), else skipped.
"""

from __future__ import annotations

import functools
import gzip
import html
from pathlib import Path

import regex
import torch

VOCAB_FILE = Path(__file__).with_name("assets") / "bpe_simple_vocab_16e6.txt.gz"
START, END, CONTEXT = 49406, 49407, 77
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map of the 256 byte values to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def _clean(text: str) -> str:
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # optional, as in open_clip; only odd mojibake is affected
        pass
    text = html.unescape(html.unescape(text))
    return regex.sub(r"\s+", " ", text).strip().lower()


class ClipTokenizer:
    """``encode(text)`` -> BPE ids; ``__call__(text, pad_id)`` -> ``[77]`` ids with start, end and padding."""

    def __init__(self, vocab_file: Path = VOCAB_FILE) -> None:
        lines = gzip.decompress(vocab_file.read_bytes()).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        vocab = list(bytes_to_unicode().values())
        vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {token: index for index, token in enumerate(vocab)}
        self.ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.cache: dict[str, list[str]] = {}

    def _bpe(self, token: str) -> list[str]:
        if token in self.cache:
            return self.cache[token]
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:], strict=False)}
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):  # merge every occurrence of the best pair, left to right
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self.cache[token] = word
        return word

    def encode(self, text: str) -> list[int]:
        byte_map = bytes_to_unicode()
        ids: list[int] = []
        for token in _PATTERN.findall(_clean(text)):
            token = "".join(byte_map[b] for b in token.encode("utf-8"))
            ids += [self.encoder[piece] for piece in self._bpe(token)]
        return ids

    def __call__(self, text: str, pad_id: int) -> torch.Tensor:
        """``[start, ids (at most 75), end, pad...]`` as int64 ``[77]``; longer prompts are cut (as SDXL's
        training scripts do; the hosts' prompt chunking is an inference feature)."""
        ids = [START, *self.encode(text)[: CONTEXT - 2], END]
        return torch.tensor(ids + [pad_id] * (CONTEXT - len(ids)), dtype=torch.long)

    def count(self, text: str) -> int:
        return len(self.encode(text))


@functools.cache
def clip_tokenizer() -> ClipTokenizer:
    return ClipTokenizer()
