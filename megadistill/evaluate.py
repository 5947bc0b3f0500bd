"""Held-out evaluation: bits per character (and per UTF-8 byte) of a causal LM on raw text.

Bits per character compares models with different tokenizers (a teacher with 262k ids, a
student with a trimmed vocabulary) on the same text: the total negative log-likelihood of
the text's tokens, in bits, divided by the text's length in Unicode code points (NFC).
This follows the bits-per-byte evaluation of karpathy/nanochat and the character-level
normalization common in language-modelling benchmarks.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass
class TextNLL:
    """Totals over a text collection; ``bits_per_char`` etc. are derived."""

    nll_nats: float
    tokens: int
    characters: int
    bytes_utf8: int
    texts: int

    @property
    def bits_per_char(self) -> float:
        return self.nll_nats / math.log(2) / max(1, self.characters)

    @property
    def bits_per_byte(self) -> float:
        return self.nll_nats / math.log(2) / max(1, self.bytes_utf8)

    @property
    def nats_per_token(self) -> float:
        return self.nll_nats / max(1, self.tokens)

    def to_dict(self) -> dict:
        """Totals plus the derived ratios, as a JSON-serializable dict."""
        out = asdict(self)
        out.update(bits_per_char=self.bits_per_char, bits_per_byte=self.bits_per_byte, nats_per_token=self.nats_per_token)
        return out


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` with a start token in front, so that the first real token is scored too."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("tokenizer has neither a BOS nor an EOS token to condition the first token on")
    return ids if ids and ids[0] == start else [start] + ids


@torch.no_grad()
def text_nll(model, tokenizer, texts: Sequence[str], batch_size: int = 4, device: str | torch.device = "cpu") -> TextNLL:
    """Sum the next-token NLL (nats) of ``texts`` under ``model``, one text per sequence.

    Args:
        model: a causal LM returning ``.logits`` [B, T, V].
        tokenizer: the model's own tokenizer (ids must be < the model's vocabulary).
        texts: raw strings; each is NFC-normalized and scored independently, the start
            token is not scored and no EOS is appended.
        batch_size: texts per forward pass (right-padded; padding is masked out).

    Raises:
        ValueError: a token id outside the model's vocabulary (tokenizer/model mismatch).
    """
    model.eval()
    # Rows past the tokenizer's ids are padding: never a prediction (padded-vocabulary pitfall).
    vocab = min(model.get_output_embeddings().weight.shape[0], len(tokenizer))
    nll, tokens = 0.0, 0
    texts = [unicodedata.normalize("NFC", t) for t in texts]
    for begin in range(0, len(texts), batch_size):
        encoded = [_encode(tokenizer, t) for t in texts[begin : begin + batch_size]]
        width = max(len(ids) for ids in encoded)
        if max(max(ids) for ids in encoded) >= vocab:
            raise ValueError(f"tokenizer produced an id >= the model's vocabulary ({vocab}): wrong tokenizer for this model")
        input_ids = torch.zeros(len(encoded), width, dtype=torch.long)
        mask = torch.zeros(len(encoded), width, dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits[..., :vocab].float()
        targets = input_ids[:, 1:].to(device).masked_fill(mask[:, 1:].to(device) == 0, -100)
        nll += F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="sum").item()
        tokens += int((targets != -100).sum())
    chars = sum(len(t) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return TextNLL(nll_nats=nll, tokens=tokens, characters=chars, bytes_utf8=nbytes, texts=len(texts))
