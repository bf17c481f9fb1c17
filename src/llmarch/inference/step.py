"""A decoding step's layers in one native call (``llmarch_decode_layers`` in ``kernels.c``).

Decoding one token runs each layer's 15-20 modules and small torch operations, each a few
microseconds of Python and dispatch around kernels of a few microseconds more: on a 2-core CPU
that overhead is a quarter to a third of a small model's step. Where a packed model's layers are
all of the kinds the native step knows, :class:`PackedDecoder <llmarch.inference.packed.PackedDecoder>`
runs them with one call instead; the embedding, the RoPE tables, the final norm and the head stay
in Python (once a step, not once a layer).

What the native step runs is described once per model (:func:`plan`): every layer's norms, its
int8 / int4 projections (the same buffers the modules read: nothing is copied), attention shape,
FFN activation and cache. The description is checked on every step against the model (the same
modules, buffers, norm weights and no hooks; otherwise it is rebuilt, or the modules run), and
bound to each new :class:`~llmarch.model.cache.KVCache`. It applies to a CPU model packed by
:func:`~llmarch.inference.packed.pack_linears` whose layers all are: pre-, post- or sandwich-norm
RMSNorm blocks (no AltUp, LAuReL or per-layer inputs); grouped-query attention with head or no
QK-norm, half-layout RoPE or none, no soft-cap, temperature tuning or KV sharing, on a full or
ring cache; a SiLU or tanh-GELU gated FFN; every projection an :class:`~llmarch.inference.quant.Int8Linear`,
:class:`~llmarch.inference.quant.Q5Linear` or :class:`~llmarch.inference.quant.Int4Linear` on its native kernel. One sequence, one token,
outside autograd and compilation; anything else runs the modules.

The results are the modules' own (the same kernels on the same roundings) except the FFN's
activation, computed in C as x * sigmoid(.) (see ``kernels.c``): a few units of float32's last
place. :data:`enabled` (``--no-native-step`` on the command line) switches the step off.
"""

from __future__ import annotations

import contextlib
import ctypes
import operator
import weakref

import torch
from torch import nn

from ..model.attention import Attention
from ..model.cache import FullCache, RingCache
from ..model.decoder import Block
from . import native
from .quant import FusedInt8, Int4Linear, Int8Linear, Q5Linear

#: switch the native decoding step off (the modules run every layer)
enabled = True

_I64, _I32, _P, _F = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p, ctypes.c_float
_LIN_Q8, _LIN_Q4, _LIN_Q5_0 = 1, 2, 3
_ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}


class _Linear(ctypes.Structure):
    _fields_ = [("w", _P), ("scales", _P), ("bias", _P), ("n", _I64), ("k", _I64), ("ldw", _I64), ("npad", _I64),
                ("group", _I64), ("br", _I64), ("out_off", _I64), ("kind", _I32), ("bias_dtype", _I32)]


class _Norm(ctypes.Structure):
    _fields_ = [("scale", _P), ("eps", _F), ("scale_dtype", _I32), ("scale_f32", _I32), ("pad_", _I32)]


class _Layer(ctypes.Structure):
    _fields_ = [
        *[(n, _Norm) for n in ("attn_norm", "attn_post_norm", "mlp_norm", "mlp_post_norm", "q_norm", "k_norm")],
        ("qkv", _Linear * 3), ("o", _Linear), ("gate_up", _Linear * 2), ("down", _Linear),
        *[(n, _I64) for n in ("q_off", "k_off", "v_off", "qkv_width", "heads", "kv_heads", "head_dim", "gate_off",
                              "up_off", "ffn_width")],
        ("k_cache", _P), ("v_cache", _P), ("pos", _P),
        *[(n, _I64) for n in ("size", "window", "chunk", "slot", "keys")],
        ("attn_scale", _F), *[(n, _I32) for n in ("n_qkv", "n_gate_up", "act", "rope", "pad_")],
    ]


class Unsupported(Exception):
    """Why a model's layers cannot run as one native step (the modules run them)."""


class _Recorder:
    """What the description read from the model, to check on every step that it still holds:
    the modules' parameter / buffer / submodule entries (by identity), the norm weights' versions
    (a norm's scale may be a derived copy), and the modules' hook tables."""

    def __init__(self):
        self.entries: list[tuple[dict, str, object]] = []
        self.versions: list[tuple[torch.Tensor, int]] = []
        self.attrs: list[tuple[object, str, object]] = []  # settings read off a layer (its kernel choice)
        self.hooks: list[dict] = []
        self.hooked = False  # whether a hook was on when the description was made (it then stopped it)
        self.keep: list[object] = []  # tensors the description points into (a norm's derived scale)

    def module(self, m: nn.Module) -> nn.Module:
        self.hooks += [m._forward_hooks, m._forward_pre_hooks]
        if m._forward_hooks or m._forward_pre_hooks:
            raise Unsupported(f"a hook on {type(m).__name__}")
        return m

    def child(self, parent: nn.Module, name: str) -> nn.Module | None:
        m = parent._modules.get(name)
        self.entries.append((parent._modules, name, m))
        return None if m is None else self.module(m)

    def tensor(self, m: nn.Module, name: str) -> torch.Tensor | None:
        table = m._buffers if name in m._buffers else m._parameters
        t = table.get(name)
        self.entries.append((table, name, t))
        return t

    def setting(self, obj: object, name: str):
        value = getattr(obj, name)
        self.attrs.append((obj, name, value))
        return value

    def version(self, t: torch.Tensor) -> None:
        try:
            self.versions.append((t, t._version))
        except RuntimeError as exc:  # an inference tensor keeps no version
            raise Unsupported("a norm weight made in inference mode") from exc

    def seal(self) -> None:
        """Done recording: what :meth:`valid` compares, as columns."""
        self._columns = (*_columns(self.entries, 3), *_columns(self.versions, 2), *_columns(self.attrs, 3))

    def valid(self) -> bool:
        """Whether all that was recorded still holds. Run on every decoding step, so the
        comparisons run in C (``map``): Gemma 3 270M's (about 1,200, over 650 hook tables) 0.10-0.14
        -> 0.08 ms with them in the caches, 0.48-0.50 -> 0.39-0.44 ms out of them, as in decoding
        (the head streams 160 MB between two checks): reaching the objects is most of it."""
        tables, names, objs, tensors, versions, owners, attrs, values = self._columns
        return (all(map(operator.is_, map(dict.get, tables, names), objs))
                and tuple(map(_version, tensors)) == versions
                and all(map(operator.is_, map(getattr, owners, attrs), values))
                and any(self.hooks) == self.hooked)


_version = operator.attrgetter("_version")


def _columns(rows: list[tuple], width: int) -> list[tuple]:
    return list(zip(*rows)) if rows else [()] * width


def _dtype_code(t: torch.Tensor) -> int:
    code = native._DTYPES.get(t.dtype)
    if code is None:
        raise Unsupported(f"a tensor of {t.dtype}")
    return code


def _kind(m: nn.Module | None) -> str | None:
    """What the native step runs in place of this module's class (``native_step_kind``, set on
    llmarch.inference.packed's PackedRMSNorm, PackedAttention, PackedGLU), read off the class
    itself: a subclass, whose forward may differ, has none."""
    return None if m is None else type(m).__dict__.get("native_step_kind")


def _norm(rec: _Recorder, parent: nn.Module, name: str, dtype: torch.dtype, dim: int) -> _Norm:
    norm = rec.child(parent, name)
    out = _Norm()
    if norm is None:
        return out
    if _kind(norm) != "rms_norm":
        raise Unsupported(f"{name} is a {type(norm).__name__}")
    rec.version(rec.tensor(norm, "weight"))
    scale = norm.scale()
    # the scale PackedRMSNorm hands its native kernel: float32 with weight_fp32, else the activations'
    if scale.dtype != (torch.float32 if norm.weight_fp32 else dtype) or scale.shape != (dim,) or not scale.is_contiguous():
        raise Unsupported(f"{name}'s scale ({scale.dtype}, {tuple(scale.shape)})")
    rec.keep.append(scale)
    out.scale, out.eps, out.scale_dtype, out.scale_f32 = scale.data_ptr(), norm.eps, _dtype_code(scale), int(norm.weight_fp32)
    return out


def _bias(rec: _Recorder, layer: nn.Module, out: _Linear, n: int) -> None:
    b = rec.tensor(layer, "bias")
    if b is None:
        return
    if b.shape != (n,) or not b.is_contiguous():
        raise Unsupported("a bias of another shape")
    out.bias, out.bias_dtype = b.data_ptr(), _dtype_code(b)


def _linear(rec: _Recorder, layer: nn.Module, in_features: int, out_off: int) -> _Linear:
    """One projection as the native kernel its module would call for one row."""
    out = _Linear()
    out.out_off = out_off
    if type(layer) is Int8Linear:
        w, s = rec.tensor(layer, "weight_int8"), rec.tensor(layer, "scales")
        if (not rec.setting(layer, "native") or rec.setting(layer, "w8a8_min_rows") <= 1
                or rec.setting(layer, "dynamic") is not None):
            raise Unsupported("an int8 layer set to another kernel (batch invariance, fast kernels)")
        n = layer.out_features
        group = native.Q8_GROUP if s.dim() == 2 else 0  # one scale per 32 inputs of a row, or one a row
        if (w.dtype != torch.int8 or w.dim() != 2 or w.stride(1) != 1 or w.shape[1] < in_features
                or layer.in_features != in_features or s.dtype != (torch.float16 if group else torch.bfloat16)
                or not s.is_contiguous()
                or s.shape != ((n, in_features // group) if group else (n,)) or (group and in_features % group)
                or w.device.type != "cpu"):
            raise Unsupported("an int8 weight the native kernel does not read")
        out.kind, out.w, out.ldw, out.scales, out.n, out.k = _LIN_Q8, w.data_ptr(), w.stride(0), s.data_ptr(), n, in_features
        out.group = group
        rec.keep += layer.keep_alive  # a fused view's memory
    elif type(layer) is Int4Linear:
        w, sz = rec.tensor(layer, "weight_int4pack"), rec.tensor(layer, "scales_and_zeros")
        br, n, g = native.int4_block_rows(), layer.out_features, layer.group_size
        if not rec.setting(layer, "native") or not br:
            raise Unsupported("an int4 layer on torch's kernel")
        if (w.dtype != torch.uint8 or not w.is_contiguous() or w.shape[0] % br or w.shape[1] * 2 != in_features
                or layer.in_features != in_features or in_features % g or sz.dtype != torch.bfloat16
                or not sz.is_contiguous() or sz.shape != (in_features // g, w.shape[0], 2) or n > w.shape[0]):
            raise Unsupported("an int4 weight the native kernel does not read")
        out.kind, out.w, out.scales, out.n, out.k = _LIN_Q4, w.data_ptr(), sz.data_ptr(), n, in_features
        out.npad, out.group, out.br = w.shape[0], g, br
    elif type(layer) is Q5Linear:
        w, s = rec.tensor(layer, "blocks"), rec.tensor(layer, "scales")
        if not rec.setting(layer, "native") or rec.setting(layer, "w8a8_min_rows") <= 1:
            raise Unsupported("a Q5_0 layer set to another kernel (batch invariance)")
        if layer.in_features != in_features or not native._q5_0_weight(w, s, in_features):
            raise Unsupported("Q5_0 codes the native kernel does not read")
        out.kind, out.w, out.ldw, out.scales = _LIN_Q5_0, w.data_ptr(), w.stride(0), s.data_ptr()
        out.n, out.k = layer.out_features, in_features
    else:
        raise Unsupported(f"a {type(layer).__name__} projection (the native step runs int8, Q5_0 and int4 ones)")
    _bias(rec, layer, out, out.n)
    return out


def _group(rec: _Recorder, module: nn.Module, group: str, names: tuple[str, ...], in_features: int,
           targets: list[_Linear]) -> tuple[int, list[int]]:
    """The projections ``names`` of ``module``, as the module computes them: its fused int8 group
    when it has one, else each layer apart; their outputs side by side in one buffer. Fills
    ``targets``; returns how many of them it filled and where each name's outputs start."""
    fused = module.__dict__.get("_fused", {}).get(group)
    layers = [rec.child(module, n) for n in names]
    if fused is not None:
        if type(fused) is not FusedInt8 or not fused.usable(None):
            raise Unsupported(f"the {group} group is not an int8 one")
        for m, w, s, b in fused._parts:  # what FusedInt8.usable checks on each call
            rec.entries += [(m._buffers, "weight_int8", w), (m._buffers, "scales", s), (m._buffers, "bias", b)]
        targets[0] = _linear(rec, rec.module(fused.layer), in_features, 0)
        return 1, list(_starts(layers)) if fused.order is None else [a for a, _ in fused._slices]
    starts = list(_starts(layers))
    for i, (m, start) in enumerate(zip(layers, starts)):
        targets[i] = _linear(rec, m, in_features, start)
    return len(layers), starts


def _starts(layers: list[nn.Module]):
    start = 0
    for m in layers:
        yield start
        start += m.out_features


def _layer(rec: _Recorder, block: nn.Module, cfg, dtype: torch.dtype, rope_index: int) -> _Layer:
    if type(block) is not Block:
        raise Unsupported(f"a {type(block).__name__} layer")
    rec.module(block)
    for name in ("altup", "laurel", "ple"):
        if rec.child(block, name) is not None:
            raise Unsupported(f"a layer with {name}")
    hidden = cfg.hidden_size
    L = _Layer()
    L.attn_norm, L.attn_post_norm = _norm(rec, block, "attn_norm", dtype, hidden), _norm(rec, block, "attn_post_norm", dtype, hidden)
    L.mlp_norm, L.mlp_post_norm = _norm(rec, block, "mlp_norm", dtype, hidden), _norm(rec, block, "mlp_post_norm", dtype, hidden)
    attn = rec.child(block, "attn")
    if _kind(attn) != "attention":
        raise Unsupported(f"{type(attn).__name__} attention")
    if (attn.kv_source is not None or attn.is_kv_source or attn.logit_softcap is not None or attn.temperature_tuning
            or attn.logit_observer is not None or attn.qk_norm not in ("none", "head")
            or (attn.use_rope and attn.rope_interleaved) or attn.head_dim > 8192 or attn.head_dim % 2):
        raise Unsupported("an attention feature the native step does not run")
    if rec.child(attn, "v_norm") is not None:
        raise Unsupported("a value norm")
    d, h, kv = attn.head_dim, attn.num_heads, attn.num_kv_heads
    L.heads, L.kv_heads, L.head_dim, L.attn_scale = h, kv, d, attn.scale
    if attn.qk_norm == "head":
        L.q_norm, L.k_norm = _norm(rec, attn, "q_norm", dtype, d), _norm(rec, attn, "k_norm", dtype, d)
    L.window, L.chunk = attn.window or 0, attn.chunk or 0
    L.rope = rope_index if attn.use_rope else -1
    L.n_qkv, (L.q_off, L.k_off, L.v_off) = _group(rec, attn, "qkv", ("q_proj", "k_proj", "v_proj"), hidden, L.qkv)
    L.qkv_width = (h + 2 * kv) * d
    if [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features] != [h * d, kv * d, kv * d]:
        raise Unsupported("projections of another width")
    L.o = _linear(rec, rec.child(attn, "o_proj"), h * d, 0)
    if L.o.n != hidden:
        raise Unsupported("an output projection of another width")
    mlp = rec.child(block, "mlp")
    if _kind(mlp) != "glu" or mlp.activation not in _ACTIVATIONS or mlp.sparsity:
        raise Unsupported(f"a {type(mlp).__name__} feed-forward")
    width = mlp.up_proj.out_features
    L.act, L.ffn_width = _ACTIVATIONS[mlp.activation], width
    L.n_gate_up, (L.gate_off, L.up_off) = _group(rec, mlp, "gate_up", ("gate_proj", "up_proj"), hidden, L.gate_up)
    if mlp.gate_proj.out_features != width:
        raise Unsupported("gate and up projections of two widths")
    L.down = _linear(rec, rec.child(mlp, "down_proj"), width, 0)
    if L.down.n != hidden:
        raise Unsupported("a down projection of another width")
    return L


class Plan:
    """A model's layers described for ``llmarch_decode_layers`` (see the module docstring)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, rec: _Recorder):
        if native.library() is None:
            raise Unsupported(f"no native kernels: {native.status()}")
        lib = native.library()
        if lib.llmarch_layer_struct_size() != ctypes.sizeof(_Layer):
            raise Unsupported("the native library describes layers otherwise")
        cfg = model.config
        if model.ple is not None or model.altup_projections is not None:
            raise Unsupported("per-layer embeddings or AltUp streams")
        self.dtype = dtype
        self.rope_keys = sorted({k for k in model._layer_rope if k is not None})
        n = len(model.layers)
        self.layers = (_Layer * n)()
        for i, block in enumerate(model.layers):
            key = model._layer_rope[i]
            if key is not None and model.rotary[key].dim != block.attn.head_dim:
                raise Unsupported("RoPE tables of another width")
            self.layers[i] = _layer(rec, block, cfg, dtype, self.rope_keys.index(key) if key is not None else -1)
        self.cache: object = None  # the KVCache bound last, and its layer caches' tensors
        self.cache_tensors: list[tuple] = []

    def bind(self, cache) -> None:
        """Point every layer at its cache's tensors (a new KVCache, one sequence)."""
        if len(cache.layers) != len(self.layers):
            raise Unsupported("a cache for another number of layers")
        tensors = []
        for L, c in zip(self.layers, cache.layers):
            if type(c) not in (FullCache, RingCache):
                raise Unsupported(f"a {type(c).__name__} cache")
            size = c.max_len if type(c) is FullCache else c.size
            shape = (1, L.kv_heads, size, L.head_dim)
            if any(t.shape != shape or t.dtype != self.dtype or not t.is_contiguous() or t.device.type != "cpu"
                   for t in (c.k, c.v)) or c.pos.shape != (1, size) or c.pos.dtype != torch.int64 or not c.pos.is_contiguous():
                raise Unsupported("a cache of another shape or dtype")
            L.k_cache, L.v_cache, L.pos, L.size = c.k.data_ptr(), c.v.data_ptr(), c.pos.data_ptr(), size
            tensors.append((c, c.k, c.v, c.pos))
        self.cache, self.cache_tensors = cache, tensors


# model -> (dtype, what was read, its description (a Plan) or why it has none (a str)): beside the
# model, not in it, so that a copy of the model (its own tensors) never inherits pointers into the original
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plan(model: nn.Module, dtype: torch.dtype) -> Plan | None:
    """The model's description (kept while it holds, rebuilt when it no longer does), or None
    where its layers cannot run natively (also kept while what stopped it holds)."""
    memo = _PLANS.get(model)
    if memo is not None and memo[0] == dtype and memo[1].valid():
        return memo[2] if isinstance(memo[2], Plan) else None
    rec = _Recorder()
    try:
        p = Plan(model, dtype, rec)
    except Unsupported as exc:
        rec.hooked = any(rec.hooks)
        rec.seal()
        _PLANS[model] = (dtype, rec, str(exc))
        return None
    rec.seal()
    _PLANS[model] = (dtype, rec, p)
    return p


def forget(model: nn.Module) -> None:
    """Drop what :func:`plan` remembered of ``model`` (say, after making its layers supported)."""
    _PLANS.pop(model, None)


def why_not(model: nn.Module) -> str | None:
    """Why the native step does not run this model's layers (None: it does, or was not tried)."""
    memo = _PLANS.get(model)
    return memo[2] if memo is not None and isinstance(memo[2], str) else None


@contextlib.contextmanager
def disabled():
    """Within this block the modules run every layer."""
    global enabled
    before, enabled = enabled, False
    try:
        yield
    finally:
        enabled = before


def decode(model, input_ids: torch.Tensor, positions: torch.Tensor | None, cache) -> torch.Tensor | None:
    """The hidden states (1, 1, hidden) after the last layer (before the final norm) of one
    token, the layers run natively and the cache advanced; or None (nothing done) where the
    native step does not apply."""
    if (not enabled or torch.is_grad_enabled() or torch.compiler.is_compiling() or input_ids.shape != (1, 1)
            or input_ids.device.type != "cpu"
            or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
            or native.library() is None):
        return None
    embed = model.embed  # the activations' dtype: a quantised table's, or the embedding's weight's
    dtype = embed.dtype if isinstance(getattr(embed, "dtype", None), torch.dtype) else embed.weight.dtype
    if dtype not in native._DTYPES:
        return None
    p = plan(model, dtype)
    if p is None:
        return None
    positions = model.default_positions(input_ids, positions, cache)
    x = model.embed_tokens(input_ids, positions)
    if x.dtype != dtype or not x.is_contiguous():
        return None
    if p.cache is not cache or len(cache.layers) != len(p.layers) or any(
            now is not c or c.k is not k or c.v is not v or c.pos is not pos
            for now, (c, k, v, pos) in zip(cache.layers, p.cache_tensors)):
        try:
            p.bind(cache)
        except Unsupported:
            return None
    pos = int(positions[0, 0])
    # the caches' bookkeeping, as their update() would do it; written back once the step has run
    layers, caches = p.layers, p.cache_tensors
    for L, (c, *_) in zip(layers, caches):
        if type(c) is FullCache:
            if c.len >= c.max_len:
                return None  # the modules raise the cache-full error
            L.slot, L.keys = c.len, c.len + 1
        else:
            L.slot, L.keys = c.written % c.size, min(c.written + 1, c.size)
    tables = [model.rotary[k](positions, x.dtype) for k in p.rope_keys]
    if not all(c.is_contiguous() and s.is_contiguous() for c, s in tables):
        return None
    cos = (ctypes.c_void_p * max(len(tables), 1))(*[t[0].data_ptr() for t in tables])
    sin = (ctypes.c_void_p * max(len(tables), 1))(*[t[1].data_ptr() for t in tables])
    rc = native.library().llmarch_decode_layers(layers, len(layers), x.data_ptr(), native._DTYPES[x.dtype],
                                                x.shape[-1], pos, cos, sin, torch.finfo(x.dtype).min)
    if rc == -1:
        raise MemoryError("llmarch_decode_layers: could not allocate a step's buffers")
    if rc != 0:
        raise RuntimeError(f"llmarch_decode_layers refused the model's description (code {rc})")
    for L, (c, *_) in zip(layers, caches):
        if type(c) is FullCache:
            c.len += 1
        else:
            c.written += 1
            c._returned = (1, L.keys)
    cache.seq_len += 1
    return x
