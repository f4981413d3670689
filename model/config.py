"""ModelConfig: one config for the Mistral, Mixtral and BLOOM families, with named presets."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

KERNEL_CHOICES = ("auto", "checked", "torch", "triton")  # model.kernels says what each means
POSITION_CHOICES = ("rope", "alibi")
NORM_CHOICES = ("rmsnorm", "layernorm")
MLP_CHOICES = ("swiglu", "gelu")

_MISTRAL_VOCAB = 32000

PRESETS: dict[str, dict[str, Any]] = {
    # For tests: a few hundred thousand parameters besides the embeddings; a step in milliseconds.
    "tiny": dict(
        vocab_size=_MISTRAL_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        sliding_window=64,
        tie_word_embeddings=True,
    ),
    # The demo run: about 21M parameters, trains visibly on two CPU cores.
    "demo": dict(
        vocab_size=_MISTRAL_VOCAB,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        sliding_window=256,
    ),
    # Mistral 7B v0.1: 7,241,732,096 parameters.
    "mistral-7b": dict(
        vocab_size=_MISTRAL_VOCAB,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        sliding_window=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
    ),
    # Mixtral 8x7B v0.1: 46,702,792,704 parameters.
    "mixtral-8x7b": dict(
        vocab_size=_MISTRAL_VOCAB,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        sliding_window=None,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        num_local_experts=8,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.02,
    ),
    # BLOOM-560m: 559,214,592 parameters.
    "bloom-560m": dict(
        vocab_size=250880,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
        sliding_window=None,
        position_embedding="alibi",
        norm="layernorm",
        mlp="gelu",
        attention_bias=True,
        mlp_bias=True,
        embedding_layernorm=True,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    ),
}


class ModelConfig(PretrainedConfig):
    """Decoder-only transformer config using transformers' field names.

    The architecture family is expressed by a few switches: `position_embedding` (rope or alibi),
    `norm` (rmsnorm or layernorm), `mlp` (swiglu or gelu), biases, `embedding_layernorm`, and
    `num_local_experts` (0 for a dense MLP, otherwise a sparse mixture of experts).
    """

    model_type = "starling"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = _MISTRAL_VOCAB,
        hidden_size: int = 256,
        intermediate_size: int = 768,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        max_position_embeddings: int = 2048,
        sliding_window: int | None = None,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        position_embedding: str = "rope",
        norm: str = "rmsnorm",
        mlp: str = "swiglu",
        attention_bias: bool = False,
        mlp_bias: bool = False,
        embedding_layernorm: bool = False,
        num_local_experts: int = 0,
        num_experts_per_tok: int = 2,
        router_aux_loss_coef: float = 0.02,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = False,
        kernels: str = "auto",
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        pad_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.sliding_window = sliding_window
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.position_embedding = position_embedding
        self.norm = norm
        self.mlp = mlp
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.embedding_layernorm = embedding_layernorm
        self.num_local_experts = num_local_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.router_aux_loss_coef = router_aux_loss_coef
        self.initializer_range = initializer_range
        self.kernels = kernels
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_fields()

    @property
    def attention_head_dim(self) -> int:
        """Width of one attention head (`head_dim` if set, else hidden_size / heads)."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    def validate_fields(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}) unless head_dim is set"
            )
        if self.position_embedding == "rope" and self.attention_head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.attention_head_dim}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ValueError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        for name, choices in (
            ("kernels", KERNEL_CHOICES),
            ("position_embedding", POSITION_CHOICES),
            ("norm", NORM_CHOICES),
            ("mlp", MLP_CHOICES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        if self.num_local_experts < 0:
            raise ValueError(f"num_local_experts must be >= 0, got {self.num_local_experts}")
        if self.is_moe:
            if self.mlp != "swiglu":
                raise ValueError("mlp must be 'swiglu' when num_local_experts > 0")
            if not 0 < self.num_experts_per_tok <= self.num_local_experts:
                raise ValueError(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) must be between 1 and "
                    f"num_local_experts ({self.num_local_experts})"
                )

    def architecture_fields(self) -> dict[str, Any]:
        """The fields that decide what the model computes from its weights, with their values: not the
        kernels, token ids, initialisation or max_position_embeddings; rope_theta only under RoPE and the
        routing fields only for a mixture of experts. Models whose configs agree on these compute the
        same function of the same weights (to_hf checks an export with them)."""
        names = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "attention_head_dim",
            "sliding_window",
            "rms_norm_eps",
            "position_embedding",
            "norm",
            "mlp",
            "attention_bias",
            "mlp_bias",
            "embedding_layernorm",
            "tie_word_embeddings",
            "num_local_experts",
        ]
        if self.position_embedding == "rope":
            names.append("rope_theta")
        if self.is_moe:
            names += ["num_experts_per_tok", "router_aux_loss_coef"]
        return {name: getattr(self, name) for name in names}

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """Build a named preset (see PRESETS), with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})
