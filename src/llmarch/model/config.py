"""The architecture configuration: every difference between the article's models is a field.

A :class:`ModelConfig` fully determines the module tree that :class:`llmarch.model.decoder.Decoder`
builds. Nothing in the model code looks at a model's *name*; families differ only through
the values below (see ``llmarch/families/`` for the presets and checkpoint mappings).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, GenerationError

# Attention kinds a layer can have (``layer_types``).
FULL = "full"
SLIDING = "sliding"
CHUNKED = "chunked"
LAYER_TYPES = (FULL, SLIDING, CHUNKED)

NORM_KINDS = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("pre", "post", "sandwich")  # sandwich = pre + post (Gemma 2/3)
QK_NORMS = ("none", "head", "proj", "l2")
FFN_KINDS = ("mlp", "glu")
ACTIVATIONS = ("gelu_tanh", "gelu", "silu", "relu")
POSITIONS = ("rope", "learned", "none")
ATTENTION_KINDS = ("mha", "mla")  # mha: q/k/v heads (MHA, GQA, MQA); mla: DeepSeek latent attention
ROUTER_SCORES = ("softmax", "sigmoid")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def check_token_ids(ids: Any, vocab_size: int) -> None:
    """Token ids must index the vocabulary: a GenerationError (not an IndexError) otherwise."""
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise GenerationError(f"token id {bad} is outside the model's vocabulary [0, {vocab_size})")


@dataclass
class RopeConfig:
    """Rotary position embedding of one kind of layer.

    ``scaling`` follows the Hugging Face ``rope_scaling`` / ``rope_parameters`` dict:
    ``{"rope_type": "llama3", "factor": 32, "low_freq_factor": 1, ...}``.
    """

    theta: float = 10000.0
    scaling: dict[str, Any] | None = None

    @property
    def rope_type(self) -> str:
        if not self.scaling:
            return "default"
        return self.scaling.get("rope_type", self.scaling.get("type", "default"))


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3, Kimi K2): HF field names."""

    q_lora_rank: int | None = 1536  # None: a plain q_proj instead of q_a_proj -> norm -> q_b_proj
    kv_lora_rank: int = 512  # the compressed latent: all the KV cache holds besides the RoPE key
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64  # the decoupled RoPE key, one head shared by all query heads
    v_head_dim: int = 128


@dataclass
class MoEConfig:
    """A mixture-of-experts FFN. The routing rules of the article's models are values here:

    * Qwen3-MoE: ``score="softmax"`` over all experts, top-k, ``norm_topk_prob``.
    * DeepSeek-V3 / Kimi K2: ``score="sigmoid"``, ``score_correction_bias`` (selection only),
      group-limited top-k (``n_group``/``topk_group``), renormalised, ``routed_scaling_factor``,
      one shared expert.
    * Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): softmax top-k plus a shared expert behind a
      sigmoid gate (``shared_expert_gate``).
    * Llama 4: ``score="sigmoid"``, top-1, ``scale_input`` (the router score multiplies the
      expert's input, not its output), a shared expert always added.
    """

    num_experts: int = 8
    top_k: int = 2
    expert_size: int = 1024  # width of one routed expert (HF moe_intermediate_size)
    score: str = "softmax"
    norm_topk_prob: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    score_correction_bias: bool = False
    scale_input: bool = False
    shared_expert_size: int = 0  # width of the always-on shared GLU; 0 = none
    # Qwen2-MoE: the shared expert's output is scaled by sigmoid(w . x), a learned per-token gate
    shared_expert_gate: bool = False
    # DeepSeek-V3 / Kimi K2 route in float32: logits from float32 inputs and weights, and each
    # expert's output is weighted in float32 before rounding to the activations' dtype.
    # Otherwise (Qwen3-MoE, Llama 4) the logits and the routing weights are rounded to the
    # activations' dtype. Scores are computed in float32 either way.
    router_fp32: bool = False
    # DeepSeek's reference takes its top-k unsorted (torch.topk(sorted=False)); the order is
    # that of the float32 sum that renormalises the weights, so it is part of the numerics
    topk_sorted: bool = True


@dataclass
class ModelConfig:
    # --- sizes -----------------------------------------------------------------------
    vocab_size: int = 32000
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int | None = None  # explicit: differs from hidden/heads in Qwen3, Gemma 3...
    intermediate_size: int = 2048
    max_position_embeddings: int = 4096

    # --- attention -------------------------------------------------------------------
    qkv_bias: bool = False  # bias on q/k/v projections (GPT-2, Qwen2)
    attn_out_bias: bool = False  # bias on the output projection (GPT-2)
    qk_norm: str = "none"  # none | head (Qwen3, Gemma 3) | proj (OLMo 2) | l2 (Llama 4)
    # softmax scale is query_pre_attn_scalar ** -0.5 (Gemma); None -> head_dim ** -0.5
    query_pre_attn_scalar: float | None = None
    # Gemma 2: attention scores pass through cap * tanh(score / cap) before the softmax
    attn_logit_softcap: float | None = None
    # per-layer schedule: "full", "sliding" (sliding_window) or "chunked" (attention_chunk_size)
    layer_types: list[str] | None = None
    sliding_window: int | None = None
    attention_chunk_size: int | None = None
    attention_kind: str = "mha"  # mha | mla (DeepSeek-V3, Kimi K2: fields in ``mla``)
    mla: MLAConfig | None = None
    # Llama 4 NoPE layers: queries scaled by log1p(floor((pos + 1) / floor_scale)) * scale + 1
    attn_temperature_tuning: bool = False
    attn_temperature_floor_scale: int = 8192
    attn_temperature_scale: float = 0.1

    # --- positions -------------------------------------------------------------------
    position: str = "rope"  # rope | learned (GPT-2) | none
    rope: RopeConfig = field(default_factory=RopeConfig)  # full / chunked layers
    rope_local: RopeConfig | None = None  # sliding layers, when they differ (Gemma 3)
    rope_interleaved: bool = False  # pairs (x0,x1) rotate together instead of halves
    # per-layer RoPE (True) or NoPE (False) schedule; None = RoPE everywhere (SmolLM3, Llama 4)
    rope_layers: list[bool] | None = None

    # --- feed-forward ----------------------------------------------------------------
    ffn_kind: str = "glu"  # glu (SwiGLU / GeGLU) | mlp (GPT-2)
    activation: str = "silu"  # silu -> SwiGLU, gelu_tanh -> GeGLU
    ffn_bias: bool = False
    moe: MoEConfig | None = None  # routed experts; dense layers keep intermediate_size
    # per-layer MoE (True) or dense FFN (False); None = every layer MoE when ``moe`` is set
    moe_layers: list[bool] | None = None

    # --- normalisation ---------------------------------------------------------------
    norm_kind: str = "rmsnorm"  # rmsnorm | layernorm (with bias)
    norm_eps: float = 1e-5
    norm_unit_offset: bool = False  # weight stored as w, applied as (1 + w) (Gemma)
    # True: multiply by the weight in float32, then cast (Gemma, OLMo 2);
    # False: cast the normalised activations to the input dtype, then multiply (Llama)
    norm_weight_fp32: bool = False
    norm_placement: str = "pre"  # pre | post (OLMo 2, inside the residual) | sandwich (Gemma 3)

    # --- embeddings and head ---------------------------------------------------------
    embed_scale: float | None = None  # Gemma multiplies embeddings by sqrt(hidden)
    tie_embeddings: bool = False
    final_logit_softcap: float | None = None

    # --- small-device components (Gemma 3n; see llmarch/model/components.py); all off by default ---
    # per-layer FFN widths (MatFormer); None = intermediate_size everywhere
    intermediate_sizes: list[int] | None = None
    # per-layer Gaussian top-k sparsity of the FFN gate: keep activations above
    # mean + std * Phi^-1(s); 0 = dense layer; None = dense everywhere
    activation_sparsity: list[float] | None = None
    v_norm: bool = False  # weightless RMSNorm on the values
    # the last n layers compute no K/V: each reuses those of the last earlier layer of its type
    num_kv_shared_layers: int = 0
    laurel_rank: int | None = None  # LAuReL: low-rank learned residual beside attention
    # AltUp: the residual stream is widened to n streams, one of which goes through the layer
    altup_num_inputs: int | None = None
    altup_active_idx: int = 0
    altup_coef_clip: float | None = None  # clip of the predict/correct coefficients (training)
    altup_correct_scale: bool = True
    # Per-layer embeddings (PLE): a vocab_size_per_layer_input x (num_layers * this) table
    hidden_size_per_layer_input: int | None = None
    vocab_size_per_layer_input: int | None = None

    # --- metadata (not architecture) -------------------------------------------------
    name: str | None = None
    hf_model_type: str | None = None  # family used for HF export
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rope, dict):
            self.rope = RopeConfig(**self.rope)
        if isinstance(self.rope_local, dict):
            self.rope_local = RopeConfig(**self.rope_local)
        if self.head_dim is None:
            if self.num_heads and self.hidden_size % self.num_heads == 0:
                self.head_dim = self.hidden_size // self.num_heads
        if self.layer_types is None:
            self.layer_types = [FULL] * self.num_layers
        else:
            self.layer_types = list(self.layer_types)
        if self.rope_layers is not None:
            self.rope_layers = [bool(x) for x in self.rope_layers]
        if self.intermediate_sizes is not None:
            self.intermediate_sizes = [int(x) for x in self.intermediate_sizes]
        if self.activation_sparsity is not None:
            self.activation_sparsity = [float(x) for x in self.activation_sparsity]
        if isinstance(self.mla, dict):
            self.mla = MLAConfig(**self.mla)
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if self.moe_layers is not None:
            self.moe_layers = [bool(x) for x in self.moe_layers]

    # ---------------------------------------------------------------------------------
    def validate(self) -> "ModelConfig":
        """Check the configuration is self-consistent; raise ConfigError naming the field."""

        def bad(msg: str) -> None:
            raise ConfigError(f"invalid config{' ' + repr(self.name) if self.name else ''}: {msg}")

        for fname in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                      "max_position_embeddings"):
            v = getattr(self, fname)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(f"{fname} must be a positive integer, got {v!r}")
        if not isinstance(self.norm_eps, (int, float)) or not 0 < self.norm_eps < 1:
            bad(f"norm_eps must be a small positive number, got {self.norm_eps!r}")
        if not isinstance(self.head_dim, int) or self.head_dim <= 0:
            bad(f"head_dim must be given when hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads != 0:
            bad(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.position == "rope" and self.head_dim % 2:
            bad(f"head_dim must be even for RoPE, got {self.head_dim}")
        choices = {
            "qk_norm": QK_NORMS,
            "ffn_kind": FFN_KINDS,
            "activation": ACTIVATIONS,
            "norm_kind": NORM_KINDS,
            "norm_placement": NORM_PLACEMENTS,
            "position": POSITIONS,
        }
        for fname, allowed in choices.items():
            if getattr(self, fname) not in allowed:
                bad(f"{fname} must be one of {', '.join(allowed)}; got {getattr(self, fname)!r}")
        if len(self.layer_types) != self.num_layers:
            bad(f"layer_types has {len(self.layer_types)} entries, expected num_layers = {self.num_layers}")
        for i, t in enumerate(self.layer_types):
            if t not in LAYER_TYPES:
                bad(f"layer_types[{i}] = {t!r}; expected one of {', '.join(LAYER_TYPES)}")
        if SLIDING in self.layer_types and not (self.sliding_window and self.sliding_window > 0):
            bad("sliding layers need a positive sliding_window")
        if CHUNKED in self.layer_types and not (self.attention_chunk_size and self.attention_chunk_size > 0):
            bad("chunked layers need a positive attention_chunk_size")
        if self.rope_layers is not None and len(self.rope_layers) != self.num_layers:
            bad(f"rope_layers has {len(self.rope_layers)} entries, expected num_layers = {self.num_layers}")
        for rc in (self.rope, self.rope_local):
            if rc is not None and rc.rope_type not in ROPE_TYPES:
                bad(f"rope scaling type {rc.rope_type!r} is not supported; expected one of {', '.join(ROPE_TYPES)}")
        self._validate_sparse_and_latent(bad)
        self._validate_small_device_fields(bad)
        return self

    def _validate_small_device_fields(self, bad) -> None:
        n = self.num_layers
        for fname in ("intermediate_sizes", "activation_sparsity"):
            v = getattr(self, fname)
            if v is not None and len(v) != n:
                bad(f"{fname} has {len(v)} entries, expected num_layers = {n}")
        if self.intermediate_sizes is not None and min(self.intermediate_sizes) <= 0:
            bad(f"intermediate_sizes must be positive, got {self.intermediate_sizes}")
        if self.activation_sparsity is not None and any(not 0.0 <= s < 1.0 for s in self.activation_sparsity):
            bad(f"activation_sparsity values must be in [0, 1), got {self.activation_sparsity}")
        if not 0 <= self.num_kv_shared_layers < n:
            bad(f"num_kv_shared_layers must be in [0, num_layers), got {self.num_kv_shared_layers}")
        first_shared = n - self.num_kv_shared_layers
        missing = set(self.layer_types[first_shared:]) - set(self.layer_types[:first_shared])
        if missing:
            bad(f"KV-shared layers of type {sorted(missing)} have no earlier layer of that type to share K/V with")
        if self.altup_num_inputs is not None:
            if self.altup_num_inputs < 1:
                bad(f"altup_num_inputs must be >= 1, got {self.altup_num_inputs}")
            if not 0 <= self.altup_active_idx < self.altup_num_inputs:
                bad(f"altup_active_idx must be in [0, altup_num_inputs), got {self.altup_active_idx}")
        if self.hidden_size_per_layer_input is not None:
            if (self.altup_num_inputs or 1) < 2:
                bad("per-layer embeddings are added to the AltUp streams other than the first: they need altup_num_inputs >= 2")
            if not self.vocab_size_per_layer_input or self.vocab_size_per_layer_input <= 0:
                bad("hidden_size_per_layer_input needs a positive vocab_size_per_layer_input")
        if self.laurel_rank is not None and self.laurel_rank <= 0:
            bad(f"laurel_rank must be positive, got {self.laurel_rank}")
        if self.attention_kind == "mla" and (self.num_kv_shared_layers or self.v_norm):
            bad("num_kv_shared_layers and v_norm apply to q/k/v attention; MLA layers (attention_kind 'mla') "
                "cache one latent per token instead: set num_kv_shared_layers = 0 and v_norm = False")
        sparse_moe = [i for i in range(n) if self.layer_is_moe(i) and self.layer_activation_sparsity(i) > 0]
        if sparse_moe:
            bad(f"activation_sparsity applies to dense FFN layers; layers {sparse_moe} are MoE layers: set their "
                "activation_sparsity to 0")

    def _validate_sparse_and_latent(self, bad) -> None:
        if self.attention_kind not in ATTENTION_KINDS:
            bad(f"attention_kind must be one of {', '.join(ATTENTION_KINDS)}; got {self.attention_kind!r}")
        if self.attention_kind == "mla":
            if self.mla is None:
                bad("attention_kind 'mla' needs the mla fields (kv_lora_rank, qk_rope_head_dim, ...)")
            if set(self.layer_types) != {FULL}:
                bad("MLA layers support full attention only (layer_types must all be 'full')")
            if self.attn_logit_softcap is not None:
                bad("attn_logit_softcap is not supported with MLA (attention_kind 'mla')")
            if self.mla.qk_rope_head_dim % 2:
                bad(f"mla.qk_rope_head_dim must be even, got {self.mla.qk_rope_head_dim}")
        if self.moe_layers is not None:
            if self.moe is None:
                bad("moe_layers is set but there is no moe configuration")
            if len(self.moe_layers) != self.num_layers:
                bad(f"moe_layers has {len(self.moe_layers)} entries, expected num_layers = {self.num_layers}")
        m = self.moe
        if m is None:
            return
        if m.score not in ROUTER_SCORES:
            bad(f"moe.score must be one of {', '.join(ROUTER_SCORES)}; got {m.score!r}")
        if not 0 < m.top_k <= m.num_experts:
            bad(f"moe.top_k ({m.top_k}) must be between 1 and moe.num_experts ({m.num_experts})")
        if m.num_experts % m.n_group or not 0 < m.topk_group <= m.n_group:
            bad(f"moe.n_group ({m.n_group}) must divide num_experts ({m.num_experts}) and 0 < topk_group "
                f"({m.topk_group}) <= n_group")
        if m.n_group > 1 and m.top_k > m.topk_group * (m.num_experts // m.n_group):
            bad(f"moe.top_k ({m.top_k}) exceeds the experts in the {m.topk_group} selected groups")

    def layer_is_moe(self, i: int) -> bool:
        if self.moe is None:
            return False
        return True if self.moe_layers is None else self.moe_layers[i]

    # ---------------------------------------------------------------------------------
    def layer_uses_rope(self, i: int) -> bool:
        if self.position != "rope":
            return False
        return True if self.rope_layers is None else self.rope_layers[i]

    def layer_rope(self, i: int) -> RopeConfig:
        if self.layer_types[i] == SLIDING and self.rope_local is not None:
            return self.rope_local
        return self.rope

    def layer_window(self, i: int) -> int | None:
        return self.sliding_window if self.layer_types[i] == SLIDING else None

    def layer_chunk(self, i: int) -> int | None:
        return self.attention_chunk_size if self.layer_types[i] == CHUNKED else None

    def layer_intermediate_size(self, i: int) -> int:
        return self.intermediate_size if self.intermediate_sizes is None else self.intermediate_sizes[i]

    def layer_activation_sparsity(self, i: int) -> float:
        return 0.0 if self.activation_sparsity is None else self.activation_sparsity[i]

    def layer_kv_source(self, i: int) -> int | None:
        """The layer whose keys/values layer i reuses (Gemma 3n KV sharing), or None.

        Layers in the last ``num_kv_shared_layers`` reuse the K/V of the last layer of the same
        attention type before that range.
        """
        first_shared = self.num_layers - self.num_kv_shared_layers
        if i < first_shared:
            return None
        return max(j for j in range(first_shared) if self.layer_types[j] == self.layer_types[i])

    @property
    def attn_scale(self) -> float:
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim
        return float(base) ** -0.5

    # ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}; known fields: {', '.join(sorted(names))}")
        return cls(**d)

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def from_json(cls, path: str) -> "ModelConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def replace(self, **changes: Any) -> "ModelConfig":
        d = self.to_dict()
        d.update(changes)
        return type(self).from_dict(d)

