"""Models and tokenizers from scratch: an XLM-R-shaped masked LM with a Unigram tokenizer trained on a corpus.

No pretrained multilingual encoder can be downloaded on the project's machines, so the encoder
study trains its own small teacher. The tokenizer is a SentencePiece-style Unigram model
(Kudo 2018, arXiv:1804.10959) trained with Hugging Face ``tokenizers`` (NFC, Metaspace ``▁``,
byte-free: unknown characters map to ``<unk>``), framed like XLM-R (``<s> ... </s>``); the
model is ``XLMRobertaForMaskedLM`` with random weights (Conneau et al. 2020, arXiv:1911.02116).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaForMaskedLM

__all__ = ["XLMR_SPECIAL_TOKENS", "random_xlmr_encoder", "train_unigram_tokenizer"]

XLMR_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
"""Special tokens in XLM-R's order: ids 0..4 (``<mask>`` is last in XLM-R; here it is id 4)."""


def train_unigram_tokenizer(texts: Iterable[str], vocab_size: int = 8000) -> PreTrainedTokenizerFast:
    """A Unigram tokenizer with XLM-R framing trained on ``texts``.

    Args:
        texts: training sentences (any scripts); NFC-normalized by the tokenizer.
        vocab_size: target vocabulary including the 5 special tokens (the trainer may return fewer).

    Returns:
        A ``PreTrainedTokenizerFast`` with bos/cls ``<s>``, eos/sep ``</s>``, pad, unk and mask set;
        ``tokenizer(text)`` gives ``<s> pieces </s>``.

    Raises:
        ValueError: ``vocab_size`` < 16.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if vocab_size < 16:
        raise ValueError(f"vocab_size must be >= 16, got {vocab_size}")
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=XLMR_SPECIAL_TOKENS, unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                       special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                                   sep_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")


def random_xlmr_encoder(tokenizer, num_layers: int = 6, hidden_size: int = 256, num_heads: int = 4,
                        intermediate_size: int = 1024, max_positions: int = 514, seed: int = 0) -> XLMRobertaForMaskedLM:
    """A randomly initialized ``XLMRobertaForMaskedLM`` sized for ``tokenizer`` (tied input/output embeddings).

    Args:
        tokenizer: gives the vocabulary size and the pad/bos/eos ids.
        num_layers, hidden_size, num_heads, intermediate_size: the body's shape.
        max_positions: position-embedding rows (RoBERTa offsets positions by ``pad_id + 1``).
        seed: ``torch.manual_seed`` before initialization.

    Raises:
        ValueError: ``hidden_size`` not divisible by ``num_heads``.
    """
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
    config = XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                              num_attention_heads=num_heads, intermediate_size=intermediate_size,
                              max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              type_vocab_size=1, architectures=["XLMRobertaForMaskedLM"])
    torch.manual_seed(seed)
    return XLMRobertaForMaskedLM(config)
