"""One small adapter per architecture family: where the layers are and what the output projection reads.

Code that needs to know a model's layout (student construction, the teacher's forward, the
chunked loss, feature matching) asks :func:`adapter_for` instead of assuming
``model.model.layers`` or ``get_decoder()``. An adapter is stateless: every method takes the
Hugging Face model it describes.

* decoder (Gemma 3, Llama, Qwen2/3, Mistral, ...): blocks in ``model.layers``, causal, the
  head reads the final normed hidden state; per-document attention in packed windows comes
  from position ids restarting at each document (``use_cache=False``).
* encoder (BERT / mBERT / MuRIL / IndicBERT v2, RoBERTa / XLM-R, DistilBERT masked LMs):
  bidirectional, so packed windows get an explicit block-diagonal attention mask built from the
  document ids; the head reads the MLM transform (dense + activation + LayerNorm) of the last
  layer, and the output projection has a bias (Devlin et al. 2019; Sanh et al. 2019).
"""

from __future__ import annotations

import abc
import inspect
from dataclasses import dataclass

import torch
from transformers.activations import gelu
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from megadistill.data.packing import document_attention_mask, position_ids_from_documents

__all__ = ["BertAdapter", "DecoderAdapter", "DistilBertAdapter", "EncoderAdapter", "ModelAdapter",
           "RobertaAdapter", "adapter_for", "supported_architectures"]


class ModelAdapter(abc.ABC):
    """Interface of a family adapter (see :class:`DecoderAdapter` and :class:`EncoderAdapter`).

    Attributes:
        family: ``"decoder"`` or ``"encoder"``.
        causal: True when attention only looks back (next-token models).
        layers_prefix: state-dict prefix of the block list, e.g. ``"model.layers."``.
        depth_field: config field holding the number of blocks (``num_hidden_layers``; DistilBERT ``n_layers``).
        position_offset: positions are embedded at row ``pad_token_id + 1 + p`` (RoBERTa, XLM-R).
        blocks: dotted path from :meth:`body` to the block list.
        attention: dotted path from a block to the module holding the Q/K/V projections.
        qkv: names of the Q, K and V projections in that module.
    """

    family: str
    causal: bool
    layers_prefix: str
    depth_field: str = "num_hidden_layers"
    position_offset: bool = False
    blocks: str
    attention: str
    qkv: tuple[str, str, str]

    @abc.abstractmethod
    def body(self, model: torch.nn.Module) -> torch.nn.Module:
        """The transformer body (embeddings + blocks + final norm), without the LM head."""

    def layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        """The list of transformer blocks, in order.

        Raises:
            ValueError: the model does not keep its blocks where this family does.
        """
        blocks = _get_path(self.body(model), self.blocks)
        if not isinstance(blocks, torch.nn.ModuleList):
            where = self.layers_prefix.rstrip(".")
            raise ValueError(f"{type(model).__name__} does not keep its {self.family} blocks in {where}")
        return blocks

    @abc.abstractmethod
    def body_outputs(self, model, input_ids: torch.Tensor, document_ids: torch.Tensor | None = None,
                     position_ids: torch.Tensor | None = None, **kwargs):
        """Run the body; ``kwargs`` go to it (``output_hidden_states``, ``output_attentions``, ``attention_mask``).

        Args:
            input_ids: ``[B, L]`` int64.
            document_ids: ``[B, L]`` int64 document index of each token of a packed window, or None.
                When given without ``position_ids``, positions restart at each document.
            position_ids: ``[B, L]`` int64 restarting at 0 at each document, or None.

        Returns:
            The HF base-model output (``last_hidden_state`` ``[B, L, H]``, optional ``hidden_states``
            tuple of ``num_layers + 1`` ``[B, L, H]`` and ``attentions``).
        """

    @abc.abstractmethod
    def head_input(self, model, last_hidden_state: torch.Tensor) -> torch.Tensor:
        """What the output projection reads, from the body's last hidden state ``[B, L, H]`` -> ``[B, L, H]``."""

    def output_weight(self, model) -> torch.Tensor:
        """The output projection ``[Vp, H]`` (may be tied to the input embedding; ``Vp`` may include padding rows)."""
        return model.get_output_embeddings().weight

    def output_bias(self, model) -> torch.Tensor | None:
        """The output projection's bias ``[Vp]``, or None."""
        return None

    def head_parameters(self, model) -> list[torch.nn.Parameter]:
        """Parameters the loss reads outside any module's forward (ZeRO-3 must gather them explicitly)."""
        params = [self.output_weight(model)]
        bias = self.output_bias(model)
        return params + ([bias] if bias is not None else [])

    def vocab_parameters(self, model) -> list[torch.nn.Parameter]:
        """Every parameter indexed by token id on dim 0 (input embedding, output weight and bias(es)).

        Trimming a vocabulary restricts exactly these rows (Abdaoui et al. 2020, "Load What You Need").
        """
        return [model.get_input_embeddings().weight, *self.head_parameters(model)]

    def qkv_modules(self, model, layer: int) -> dict[str, torch.nn.Module]:
        """``{"q", "k", "v"}`` -> the projection modules of block ``layer`` (0-based), for MiniLM relations.

        Raises:
            ValueError: ``layer`` is out of range or the block has no such projections.
        """
        attn = _get_path(self._layer(model, layer), self.attention)
        if attn is None or not all(hasattr(attn, n) for n in self.qkv):
            raise ValueError(f"{type(model).__name__} layer {layer + 1} has no {self.attention}."
                             f"{'/'.join(self.qkv)} to take relations from")
        return {key: getattr(attn, name) for key, name in zip("qkv", self.qkv)}

    def final_hidden_states(self, model, input_ids: torch.Tensor, document_ids: torch.Tensor | None = None,
                            position_ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """``[B, L, H]`` head input for ``input_ids`` ``[B, L]``: ``logits == head_input @ W.T (+ b)`` (before softcap).

        ``kwargs`` (e.g. a ``[B, L]`` padding ``attention_mask``) go to :meth:`body_outputs`.
        """
        out = self.body_outputs(model, input_ids, document_ids=document_ids, position_ids=position_ids, **kwargs)
        return self.head_input(model, out.last_hidden_state)

    def _layer(self, model, layer: int) -> torch.nn.Module:
        blocks = self.layers(model)
        if not 0 <= layer < len(blocks):
            raise ValueError(f"layer {layer + 1} is not a{'n' if self.family == 'encoder' else ''} {self.family} "
                             f"layer of {type(model).__name__} (it has {len(blocks)})")
        return blocks[layer]


@dataclass(frozen=True)
class DecoderAdapter(ModelAdapter):
    """Decoder-only causal LMs keeping their blocks in ``model.layers`` (Gemma 3, Llama, Qwen, Mistral)."""

    family: str = "decoder"
    causal: bool = True
    layers_prefix: str = "model.layers."
    depth_field: str = "num_hidden_layers"
    blocks: str = "layers"
    attention: str = "self_attn"
    qkv: tuple[str, str, str] = ("q_proj", "k_proj", "v_proj")

    def body(self, model):
        return model.get_decoder()

    def body_outputs(self, model, input_ids, document_ids=None, position_ids=None, **kwargs):
        # Position ids restarting per document make HF decoders keep attention inside documents
        # (varlen flash-attn, a FlexAttention block mask or a block-diagonal SDPA mask); only with use_cache=False.
        if position_ids is None and document_ids is not None:
            position_ids = position_ids_from_documents(document_ids)
        return self.body(model)(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kwargs)

    def head_input(self, model, last_hidden_state):
        return last_hidden_state


@dataclass(frozen=True)
class EncoderAdapter(ModelAdapter):
    """Bidirectional masked-LM encoders; subclasses say where the body, blocks, Q/K/V and MLM head live.

    Attributes (besides :class:`ModelAdapter`'s):
        base: attribute of the masked-LM model holding the base model (``bert``, ``roberta``, ``distilbert``).
    """

    family: str = "encoder"
    causal: bool = False
    layers_prefix: str = "bert.encoder.layer."
    depth_field: str = "num_hidden_layers"
    base: str = "bert"
    blocks: str = "encoder.layer"
    attention: str = "attention.self"
    qkv: tuple[str, str, str] = ("query", "key", "value")
    position_offset: bool = False

    def body(self, model):
        return getattr(model, self.base)

    def body_outputs(self, model, input_ids, document_ids=None, position_ids=None, **kwargs):
        if document_ids is not None:
            if position_ids is None:
                position_ids = position_ids_from_documents(document_ids)
            kwargs["attention_mask"] = self._document_mask(model, document_ids, kwargs.get("attention_mask"))
        body = self.body(model)
        if position_ids is not None:
            if "position_ids" not in inspect.signature(body.forward).parameters:
                raise ValueError(f"{type(body).__name__} takes no position_ids in this transformers version "
                                 "(DistilBERT before transformers 5): packed windows need transformers >= 5")
            if self.position_offset:
                # RoBERTa/XLM-R embed position p at row padding_idx + 1 + p and use explicit ids as given.
                position_ids = position_ids + body.embeddings.padding_idx + 1
            kwargs["position_ids"] = position_ids
        return body(input_ids=input_ids, **kwargs)

    def _document_mask(self, model, document_ids: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """Additive ``[B, 1, L, L]`` mask in the model dtype: 0 inside a document, dtype-min across documents.

        HF encoders pass a 4-D mask through unchanged; eager attention ADDS it to the scores (a bool
        mask would add 0/1 and isolate nothing), SDPA accepts the additive form too.

        Raises:
            ValueError: an attention implementation that ignores 4-D masks (flash-attn, flex).
        """
        impl = getattr(model.config, "_attn_implementation", None) or "eager"
        if impl not in ("eager", "sdpa"):
            raise ValueError(f"packed encoder windows need attn_implementation 'sdpa' or 'eager' (a 4-D document "
                             f"mask), not {impl!r}: set it with model.set_attn_implementation('sdpa')")
        if padding_mask is not None and padding_mask.dim() != 2:
            raise ValueError("with document_ids, attention_mask must be a [B, L] padding mask")
        allowed = document_attention_mask(document_ids, causal=False, padding_mask=padding_mask)
        dtype = model.get_input_embeddings().weight.dtype
        zeros = torch.zeros(allowed.shape, dtype=dtype, device=document_ids.device)
        return zeros.masked_fill(~allowed, torch.finfo(dtype).min)

    def output_bias(self, model):
        return model.get_output_embeddings().bias


@dataclass(frozen=True)
class BertAdapter(EncoderAdapter):
    """``BertForMaskedLM`` (mBERT, MuRIL, IndicBERT v2): head input = ``cls.predictions.transform``
    (dense -> ``hidden_act`` -> LayerNorm), then the decoder ``[V, H]`` with its bias."""

    def head_input(self, model, last_hidden_state):
        return model.cls.predictions.transform(last_hidden_state)

    def vocab_parameters(self, model):
        # cls.predictions.bias is tied to decoder.bias only while tie_word_embeddings is on; list both.
        return _unique([*super().vocab_parameters(model), model.cls.predictions.bias])


@dataclass(frozen=True)
class RobertaAdapter(EncoderAdapter):
    """``RobertaForMaskedLM`` / ``XLMRobertaForMaskedLM``: head input = ``lm_head.layer_norm(gelu(lm_head.dense(h)))``
    (the exact erf GELU the HF head hard-codes), positions offset by ``padding_idx + 1``."""

    layers_prefix: str = "roberta.encoder.layer."
    base: str = "roberta"
    position_offset: bool = True

    def head_input(self, model, last_hidden_state):
        head = model.lm_head
        return head.layer_norm(gelu(head.dense(last_hidden_state)))

    def vocab_parameters(self, model):
        return _unique([*super().vocab_parameters(model), model.lm_head.bias])


@dataclass(frozen=True)
class DistilBertAdapter(EncoderAdapter):
    """``DistilBertForMaskedLM`` (Sanh et al. 2019): head input = ``vocab_layer_norm(activation(vocab_transform(h)))``,
    blocks in ``distilbert.transformer.layer``, depth in ``n_layers``, Q/K/V in ``attention.{q,k,v}_lin``."""

    layers_prefix: str = "distilbert.transformer.layer."
    depth_field: str = "n_layers"
    base: str = "distilbert"
    blocks: str = "transformer.layer"
    attention: str = "attention"
    qkv: tuple[str, str, str] = ("q_lin", "k_lin", "v_lin")

    def head_input(self, model, last_hidden_state):
        return model.vocab_layer_norm(model.activation(model.vocab_transform(last_hidden_state)))


def _get_path(module, path: str):
    """``module.a.b`` for ``path == "a.b"``, or None when an attribute is missing."""
    for name in path.split("."):
        module = getattr(module, name, None)
    return module


def _unique(params: list) -> list:
    """``params`` without repeated tensors (tied parameters appear once), order kept."""
    seen, result = set(), []
    for p in params:
        if p is not None and id(p) not in seen:
            seen.add(id(p))
            result.append(p)
    return result


DECODER_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_DECODER = DecoderAdapter()
ENCODERS: dict[str, ModelAdapter] = {
    "BertForMaskedLM": BertAdapter(),
    "RobertaForMaskedLM": RobertaAdapter(),
    "XLMRobertaForMaskedLM": RobertaAdapter(),
    "DistilBertForMaskedLM": DistilBertAdapter(),
}
"""Masked-LM architectures (``config.architectures`` / class names) with an encoder adapter."""
_ENCODER_MODEL_TYPES = {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM",
                        "xlm-roberta": "XLMRobertaForMaskedLM", "distilbert": "DistilBertForMaskedLM"}


def supported_architectures() -> str:
    """Human-readable list of supported families, for error messages."""
    return ("decoders (*ForCausalLM: Gemma 3, Llama, Qwen2/3, Mistral) and masked-LM encoders ("
            + ", ".join(ENCODERS) + ": mBERT, MuRIL, IndicBERT v2, XLM-R, DistilBERT)")


def adapter_for(model_or_config) -> ModelAdapter:
    """The adapter of a HF model or config.

    A model's class name decides first, then ``config.architectures``; a config without
    architectures (one built in code) falls back to its ``model_type``: the encoder families by
    name, else the class ``AutoModelForCausalLM`` would build for it.

    Raises:
        ValueError: an architecture no adapter supports, naming the supported ones.
    """
    config = getattr(model_or_config, "config", model_or_config)
    names = [type(model_or_config).__name__] if isinstance(model_or_config, torch.nn.Module) else []
    names += list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in ENCODERS:
            return ENCODERS[name]
        if name.endswith(DECODER_SUFFIXES):
            return _DECODER
    if not names:
        model_type = getattr(config, "model_type", None)
        if model_type in _ENCODER_MODEL_TYPES:
            return ENCODERS[_ENCODER_MODEL_TYPES[model_type]]
        if MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "").endswith(DECODER_SUFFIXES):
            return _DECODER
    raise ValueError(f"architecture {names or type(model_or_config).__name__} is not supported: "
                     f"supported are {supported_architectures()}")
