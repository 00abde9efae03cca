"""GSAConfig: the authors' field names (flash-linear-attention's `GSAConfig`), so their config.json loads as is."""

from __future__ import annotations

from transformers import PretrainedConfig

from ..ops.projections import FEATURE_MAPS
from ..layers.mlp import swiglu_intermediate_size

ATTENTION_KEYS = {"layers", "num_heads", "num_kv_heads", "qkv_bias", "window_size", "rope_theta"}


class GSAConfig(PretrainedConfig):
    """A Llama-style decoder whose token mixers are Gated Slot Attention (some may be softmax attention).

    Args (the ones that shape the model; others are kept for compatibility with released configs):
        hidden_size, num_hidden_layers, vocab_size, norm_eps: as in Llama.
        num_heads / num_kv_heads: GSA query heads and key/value heads (GQA when fewer kv heads).
        num_slots: slots per key/value head (m, 64 in the paper); gate_logit_normalizer: the damping τ.
        feature_map: "swish", "relu" or "identity" on q and k; use_short_conv / conv_size: causal conv on q/k/v.
        expand_k / expand_v: key/value width as a multiple of hidden_size.
        hidden_ratio / intermediate_size: SwiGLU width (default 2/3 * 4d rounded up to 256).
        attn: softmax-attention layers, {"layers": [i, ...], "num_heads": .., "num_kv_heads": ..,
            "rope_theta": ..}; every layer listed becomes Transformer++ attention (all layers: the baseline).
        norm_first: the authors' older exports put the pre-norms inside the mixers; loading converts them.
        recompute_features: training memory against speed. True: backward recomputes the operator's inputs φ(q),
            φ(k), swish(v) from the projections and the norms' outputs before the products from their inputs;
            False: keeps them (6 x width more values a token and block; docs/performance.md has the 1.3B model's
            memory and tokens/s either way).
        recompute_states: True: the GSA operator computes its chunk states again in backward (the paper's
            choice); False: keeps the forward's ((T / 64 + 1) x H x (K + V) x M values a sequence and layer).
        recompute_norms: the norms' outputs alone (3 x width a token and block); None (the default) follows
            recompute_features. recompute_norms=False with recompute_states=False keeps the norms' outputs and
            the chunk states but recomputes the features: at the 1.3B shape 34 GiB, about as fast as keeping the
            features (35.7 GiB), both under FLA's 37.0.
    """

    model_type = "gsa"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 2048,
        num_hidden_layers: int = 24,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        num_slots: int | None = 64,
        expand_k: float = 1,
        expand_v: float = 1,
        gate_logit_normalizer: float = 8,
        clamp_min: float | None = None,
        feature_map: str = "swish",
        use_short_conv: bool = False,
        conv_size: int = 4,
        use_norm: bool = True,
        elementwise_affine: bool = True,
        hidden_ratio: float = 4,
        intermediate_size: int | None = None,
        hidden_act: str = "swish",
        norm_eps: float = 1e-6,
        attn: dict | None = None,
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        norm_first: bool = False,
        recompute_features: bool = True,
        recompute_states: bool = True,
        recompute_norms: bool | None = None,
        **kwargs,
    ):
        kwargs.pop("exapnd_k", None)  # a misspelt alias some released configs carry next to expand_k
        kwargs.pop("exapnd_v", None)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.num_slots = num_slots
        self.expand_k = expand_k
        self.expand_v = expand_v
        self.gate_logit_normalizer = gate_logit_normalizer
        self.clamp_min = clamp_min
        self.feature_map = feature_map
        self.use_short_conv = use_short_conv
        self.conv_size = conv_size
        self.use_norm = use_norm
        self.elementwise_affine = elementwise_affine
        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.norm_eps = norm_eps
        self.attn = attn
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.norm_first = norm_first
        self.recompute_features = recompute_features
        self.recompute_states = recompute_states
        self.recompute_norms = recompute_norms
        self.validate_gsa()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def mlp_intermediate_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return swiglu_intermediate_size(self.hidden_size, self.hidden_ratio)

    @property
    def attention_layers(self) -> set[int]:
        return set(self.attn["layers"]) if self.attn else set()

    def validate_gsa(self) -> None:
        """Raise ValueError naming the field that cannot describe a model."""
        def need(ok: bool, message: str):
            if not ok:
                raise ValueError(f"invalid GSAConfig: {message}")

        need(self.vocab_size >= 1, f"vocab_size must be >= 1, got {self.vocab_size}")
        need(self.num_hidden_layers >= 1, f"num_hidden_layers must be >= 1, got {self.num_hidden_layers}")
        need(self.num_heads >= 1, f"num_heads must be >= 1, got {self.num_heads}")
        for name, expand in (("expand_k", self.expand_k), ("expand_v", self.expand_v)):
            width = self.hidden_size * expand
            need(
                width == round(width) and round(width) % self.num_heads == 0,
                f"hidden_size * {name} = {width} must be an integer divisible by num_heads = {self.num_heads}",
            )
        kv = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        need(kv >= 1 and self.num_heads % kv == 0,
             f"num_heads = {self.num_heads} must be a multiple of num_kv_heads = {kv}")
        need(self.num_slots is None or self.num_slots >= 1, f"num_slots must be >= 1, got {self.num_slots}")
        need(self.gate_logit_normalizer > 0, f"gate_logit_normalizer must be > 0, got {self.gate_logit_normalizer}")
        need(self.feature_map in FEATURE_MAPS,
             f"unknown feature_map {self.feature_map!r}; expected one of {sorted(FEATURE_MAPS)}")
        need(self.hidden_act in ("swish", "silu"), f"hidden_act must be 'swish' (SwiGLU), got {self.hidden_act!r}")
        need(self.norm_eps > 0, f"norm_eps must be > 0, got {self.norm_eps}")
        need(isinstance(self.recompute_features, bool),
             f"recompute_features must be true or false, got {self.recompute_features!r}")
        need(isinstance(self.recompute_states, bool),
             f"recompute_states must be true or false, got {self.recompute_states!r}")
        need(self.recompute_norms is None or isinstance(self.recompute_norms, bool),
             f"recompute_norms must be true, false or null, got {self.recompute_norms!r}")
        if self.attn is not None:
            need(isinstance(self.attn, dict) and "layers" in self.attn, "attn must be a dict with a 'layers' list")
            unknown = set(self.attn) - ATTENTION_KEYS
            need(not unknown, f"attn has unknown keys {sorted(unknown)}; expected some of {sorted(ATTENTION_KEYS)}")
            bad = [i for i in self.attn["layers"] if not 0 <= i < self.num_hidden_layers]
            need(not bad, f"attn layers {bad} are outside 0..{self.num_hidden_layers - 1}")
            need(self.attn.get("window_size") is None, "sliding-window attention (attn.window_size) is not supported")
            heads = self.attn.get("num_heads", self.num_heads)
            need(self.hidden_size % heads == 0, f"hidden_size must be divisible by attn num_heads = {heads}")
