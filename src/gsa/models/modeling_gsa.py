"""GSAModel / GSAForCausalLM: a Llama-style pre-norm decoder with Gated Slot Attention token mixers (spec §3).

Hugging Face conventions throughout: `PreTrainedModel`, `GenerationMixin`, save_pretrained / from_pretrained,
Auto-class registration (gsa/models/__init__.py). Parameter names follow the authors' release.
"""

from __future__ import annotations

import math
import os
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from ..layers import Attention, GatedSlotAttention, RMSNorm, SwiGLU
from ..layers.fused import add_norm
from ..layers.gsa import positions_from_cu_seqlens
from .cache import GSACache
from .configuration_gsa import GSAConfig
from .loss import IGNORE_INDEX, linear_cross_entropy


# transformers renamed the cache field of model outputs from `past_key_values` to `cache` during 5.x; use the name
# the installed version reads back in generate().
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class GSABlock(GradientCheckpointingLayer):
    def __init__(self, config: GSAConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        if layer_idx in config.attention_layers:
            spec = config.attn
            self.attn = Attention(
                config.hidden_size,
                spec.get("num_heads", config.num_heads),
                spec.get("num_kv_heads"),
                spec.get("qkv_bias", False),
                spec.get("rope_theta", 10000.0),
                layer_idx,
            )
        else:
            self.attn = GatedSlotAttention(
                config.hidden_size,
                config.num_heads,
                config.num_kv_heads,
                config.num_slots,
                config.expand_k,
                config.expand_v,
                config.gate_logit_normalizer,
                config.clamp_min,
                config.feature_map,
                config.use_short_conv,
                config.conv_size,
                use_norm=config.use_norm,
                elementwise_affine=config.elementwise_affine,
                norm_eps=config.norm_eps,
                layer_idx=layer_idx,
                recompute_features=config.recompute_features,
                recompute_states=config.recompute_states,
                recompute_norms=config.recompute_norms,
            )
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.mlp_intermediate_size, config.recompute_features,
                          config.recompute_norms)

    def forward(self, hidden_states, attention_mask=None, cu_seqlens=None, positions=None, state=None, use_cache=False,
                branch=None):
        """The pre-norm residual block on hidden_states + branch (branch: the previous block's MLP output, not yet
        added; None for the first block). Returns (residual, branch', state): the block's output is residual +
        branch', left for the next norm to add.

        Each residual addition is formed inside the pass of the norm that follows it (the next block's or the
        model's final norm), saving a pass over the rows each way. The GSA mixer and the MLP take their norm and
        apply it fused with their input projections (backward keeps the residual stream only, not its normalised
        copy as well)."""
        if isinstance(self.attn, Attention):
            hidden_states, normed = add_norm(branch, hidden_states, self.attn_norm)
            mixed, state = self.attn(normed, positions, attention_mask, cu_seqlens, state, use_cache)
        elif branch is None:
            mixed, state = self.attn(hidden_states, attention_mask, cu_seqlens, state, use_cache, norm=self.attn_norm)
        else:
            mixed, state, hidden_states = self.attn(branch, attention_mask, cu_seqlens, state, use_cache,
                                                    norm=self.attn_norm, residual=hidden_states)
        out, hidden_states = self.mlp(mixed, norm=self.mlp_norm, residual=hidden_states)
        return hidden_states, out, state


class GSAPreTrainedModel(PreTrainedModel):
    config_class = GSAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GSABlock"]
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model makes its own GSACache

    def _init_weights(self, module: nn.Module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm) and module.weight is not None:
            nn.init.ones_(module.weight)
        if isinstance(module, GSABlock):
            # GPT-2 scheme: each residual branch's output projection shrinks with depth, 2 branches per block
            for proj in (module.attn.o_proj, module.mlp.down_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Local folders load through `gsa.models.checkpoint` (strict: missing or unexpected tensors are an error,
        the authors' older layout is converted, only safetensors are read); anything else goes to transformers."""
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(path):
            from .checkpoint import load_pretrained

            return load_pretrained(cls, path, *args, **kwargs)
        kwargs.setdefault("use_safetensors", True)
        return super().from_pretrained(path, *args, **kwargs)


def _check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    if torch.compiler.is_compiling() or (input_ids.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    low, high = torch.aminmax(input_ids)
    low, high = torch.stack((low, high)).tolist()  # one read back (a device sync), not one for each
    if low < 0 or high >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}) (the vocabulary size); got ids from {low} to {high}")


class GSAModel(GSAPreTrainedModel):
    def __init__(self, config: GSAConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(GSABlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: GSACache | None = None,
        past_key_values: GSACache | None = None,
        use_cache: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids [B, T] and inputs_embeds [B, T, D]")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"expected input_ids of shape [B, T], got {list(input_ids.shape)}")
            _check_token_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embeddings(input_ids)
        B, T = inputs_embeds.shape[:2]
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        use_cache = use_cache and not self.training and cu_seqlens is None
        if use_cache and cache is None:
            cache = GSACache(len(self.layers))
        if attention_mask is not None:
            seen = cache.seen_tokens if cache is not None else 0
            if (attention_mask.dim() != 2 or attention_mask.shape[0] != B
                    or attention_mask.shape[1] not in (T, seen + T)):
                raise ValueError(
                    f"expected attention_mask of shape [B, T] = [{B}, {T}] or [B, past + T] = [{B}, {seen + T}] "
                    f"(1 = token, 0 = padding), got {list(attention_mask.shape)}"
                )
            if bool(attention_mask.all()):
                attention_mask = None  # nothing to mask: take the fast path
        positions = self._positions(position_ids, attention_mask, cu_seqlens, cache, B, T, inputs_embeds.device)

        # the residual stream is hidden_states + branch (each block's last addition left to the next norm's pass)
        hidden_states, branch = inputs_embeds, None
        all_hidden = [] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if all_hidden is not None:
                all_hidden.append(hidden_states if branch is None else hidden_states + branch)
            state = cache.states[i] if cache is not None else None
            hidden_states, branch, state = layer(hidden_states, attention_mask, cu_seqlens, positions, state,
                                                 use_cache, branch)
            if cache is not None:
                cache.states[i] = state
        hidden_states = add_norm(branch, hidden_states, self.norm)[1]
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        if cache is not None:
            cache.seen_tokens += T
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            **{CACHE_FIELD: cache},
        )

    def _positions(self, position_ids, attention_mask, cu_seqlens, cache, B, T, device):
        """Rotary positions for attention layers (GSA layers need none)."""
        if not self.config.attention_layers:
            return None
        if position_ids is not None:
            return position_ids
        if cu_seqlens is not None:
            return positions_from_cu_seqlens(cu_seqlens, T)
        if attention_mask is not None:
            return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        start = cache.seen_tokens if cache is not None else 0
        return torch.arange(start, start + T, device=device).expand(B, T)


class GSAForCausalLM(GSAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: GSAConfig):
        super().__init__(config)
        self.model = GSAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embeddings

    def set_input_embeddings(self, value):
        self.model.embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: GSACache | None = None,
        past_key_values: GSACache | None = None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        shift_labels: bool = True,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """labels [B, T]: next-token targets (shifted inside, as in transformers, unless shift_labels=False), -100 is
        ignored. With labels the loss is computed chunk by chunk (`linear_cross_entropy`) and logits is None."""
        out = self.model(
            input_ids, attention_mask, inputs_embeds, cache, past_key_values, use_cache, cu_seqlens, position_ids,
            output_hidden_states,
        )
        hidden = out.last_hidden_state
        cache = getattr(out, CACHE_FIELD)
        loss = logits = None
        if labels is not None:
            if labels.shape != hidden.shape[:2]:
                raise ValueError(
                    f"expected labels of shape [B, T] = {list(hidden.shape[:2])}, got {list(labels.shape)}")
            if shift_labels:
                labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
            loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, labels.reshape(-1))
        else:
            kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
            logits = self.lm_head(kept)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, **{CACHE_FIELD: cache}
        )

    def prepare_inputs_for_generation(
        self, input_ids, attention_mask=None, inputs_embeds=None, use_cache=True, **kwargs
    ):
        cache = kwargs.get("cache")
        if cache is None:
            cache = kwargs.get("past_key_values")
        seen = cache.seen_tokens if cache is not None else 0
        inputs = {"attention_mask": attention_mask, "cache": cache, "use_cache": use_cache}
        if inputs_embeds is not None and seen == 0:
            inputs["inputs_embeds"] = inputs_embeds
        else:
            inputs["input_ids"] = input_ids[:, seen:].contiguous() if seen else input_ids
        inputs["logits_to_keep"] = kwargs.get("logits_to_keep") or 1
        return inputs

    def _reorder_cache(self, cache, beam_idx):
        cache.reorder_cache(beam_idx)
        return cache
