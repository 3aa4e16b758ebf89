"""Structural surgery: physically remove attention heads, FFN neurons, whole layers and vocabulary entries.

Every operation slices ``nn.Linear``/``nn.Embedding`` weights (module paths come from the family's
adapter, never hard-coded) and returns an updated :class:`SurgeryPlan`: a JSON record of what was
*kept*, always in the indices of the base (unpruned) architecture. Steps compose: pruning an already
pruned model translates its current positions back to base indices, so one plan describes the result of
any number of steps.

Saving and loading: the model's ``config`` is never changed by surgery, so ``config.json`` stays the
base architecture the plan applies to. :func:`replay_plan` rebuilds the exact shapes on a model built
from that config, after which ``model.safetensors`` loads strictly. The real per-layer shapes live in the
modules (and in the plan), not in the config, because a config cannot express per-layer head counts.

A layer may lose all its heads (or all its FFN neurons). Then the block that computed them is replaced by
:class:`Empty` (a zero-width output) and the output projection by :class:`BiasOnly`, which is exactly
what a projection of zero inputs computes: its bias. No zero-size weights are kept, so quantizers and
exporters never meet an ``nn.Linear`` with no inputs. (Such a layer reports no attention weights.)

Decoders (the GPT-2 and Llama families):

* GPT-2 keeps ``Conv1D`` projections (weight ``[in, out]``), sliced along the matching axis
  (:func:`slice_projection`). Its fused ``attn.c_attn`` outputs ``[q | k | v]``; a head's rows are cut from
  each block, and the attention's ``split_size``/``num_heads`` follow (its forward splits by ``split_size``).
* Llama uses grouped-query attention: query heads ``g*k .. g*k+g-1`` share key/value head ``k``. Heads are
  removed in whole key/value groups, which removes the group's k/v rows and all its query heads, so
  ``num_key_value_groups`` is unchanged. The plan records kept *query* heads (always whole groups; the kept
  key/value heads are ``head // g``); :func:`prune_heads` refuses a keep-set that splits a group. FFN neurons
  are ``gate_proj``/``up_proj`` rows and ``down_proj`` columns.
* A decoder layer that loses every head gets :class:`HeadlessAttention` (its output projection is inside the
  attention module): it outputs the projection's bias and, with a KV cache, caches a one-wide placeholder so
  the cache still knows the sequence length. Layer removal renumbers ``layer_idx``, so the dynamic KV cache
  of ``generate`` works; a static cache (preallocated from the config's head counts) does not fit a pruned model.
* An LM head tied to the word embedding stays tied through vocabulary pruning (both are the same sliced
  matrix); an untied head is sliced alike.

Vocabulary pruning keeps the token ids a corpus uses plus all special tokens; the tokenizer is wrapped
(:func:`wrap_tokenizer`) so ordinary text still goes in: a WordPiece tokenizer is restricted to the kept
vocabulary (:mod:`slimformer.vocab`), so a word with dropped tokens is split into kept pieces; for other
tokenizers, ids outside the kept set are read as [UNK].
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from slimformer.arch import ArchAdapter, adapter_for
from slimformer.errors import SlimformerError
from slimformer.vocab import restricted_tokenizer

PLAN_FORMAT = 1


# --------------------------------------------------------------------------------------------------
# Replacement modules for a block that lost all its units
# --------------------------------------------------------------------------------------------------


class Empty(nn.Module):
    """Stands in for a projection (or a whole self-attention) with no output units left.

    Returns a zero-width tensor; as self-attention it also returns ``None`` attention weights."""

    def __init__(self, returns_attention: bool = False):
        super().__init__()
        self.returns_attention = returns_attention

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        out = hidden_states[..., :0]
        return (out, None) if self.returns_attention else out

    def extra_repr(self) -> str:
        return "attention with no heads" if self.returns_attention else "no output units"


class BiasOnly(nn.Module):
    """An output projection whose inputs were all removed: it outputs its bias at every position."""

    def __init__(self, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.out_features = out_features
        if bias is None:
            self.register_buffer("bias", torch.zeros(out_features), persistent=False)
        else:
            self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.to(x.dtype).expand(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features=0, out_features={self.out_features}"


class HeadlessAttention(nn.Module):
    """A decoder self-attention with no heads left, whose output projection lives inside it (GPT-2's
    ``attn.c_proj``, Llama's ``self_attn.o_proj``): it outputs that projection's bias (a :class:`BiasOnly`
    kept under the same name, so weights load by the same keys) and no attention weights.

    With a KV cache it still records the sequence length, caching a ``(batch, 1, seq, 1)`` zero key and value
    per step: Hugging Face caches read the length of the sequence so far from layer 0, and an empty layer 0
    would restart positions at every generated token."""

    def __init__(self, out_name: str, out: BiasOnly, layer_idx: int | None):
        super().__init__()
        self.out_name = out_name
        self.add_module(out_name, out)
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any):
        if hidden_states is None:
            raise TypeError("HeadlessAttention needs hidden_states")
        cache = kwargs.get("past_key_values", kwargs.get("past_key_value"))
        cache = getattr(cache, "self_attention_cache", cache)  # an encoder-decoder cache: its self part
        if cache is not None and self.layer_idx is not None:
            placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return getattr(self, self.out_name)(hidden_states), None

    def extra_repr(self) -> str:
        return "attention with no heads"


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


@dataclass
class SurgeryPlan:
    """What survives surgery, in base-architecture indices. ``heads``/``neurons`` are keyed by the base
    index of a kept layer; ``layers`` lists kept base layers in order; ``vocab`` the kept token ids
    (``None``: vocabulary untouched)."""

    family: str
    base: dict[str, int]
    layers: list[int]
    heads: dict[int, list[int]]
    neurons: dict[int, list[int]]
    vocab: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def identity(cls, model: nn.Module) -> SurgeryPlan:
        """The plan of an unpruned model (everything kept)."""
        adapter = adapter_for(model)
        base = _base_dims(model.config, adapter)
        n_layers, n_heads, n_ffn = base["layers"], base["heads"], base["ffn"]
        return cls(family=adapter.family, base=base, layers=list(range(n_layers)),
                   heads={i: list(range(n_heads)) for i in range(n_layers)},
                   neurons={i: list(range(n_ffn)) for i in range(n_layers)})

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SurgeryPlan:
        try:
            if int(data.get("format", PLAN_FORMAT)) > PLAN_FORMAT:
                raise SlimformerError(f"surgery plan format {data['format']} is newer than this slimformer "
                                      f"({PLAN_FORMAT}); upgrade slimformer")
            return cls(family=str(data["family"]), base={k: int(v) for k, v in data["base"].items()},
                       layers=[int(i) for i in data["layers"]],
                       heads={int(k): [int(i) for i in v] for k, v in data["heads"].items()},
                       neurons={int(k): [int(i) for i in v] for k, v in data["neurons"].items()},
                       vocab=None if data.get("vocab") is None else [int(i) for i in data["vocab"]],
                       extra=dict(data.get("extra", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SlimformerError(f"the surgery plan is malformed ({type(e).__name__}: {e}); "
                                  "re-save the model with slimformer") from None

    def to_json(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "family": self.family, "base": dict(self.base), "layers": list(self.layers),
                "heads": {str(k): list(v) for k, v in self.heads.items()},
                "neurons": {str(k): list(v) for k, v in self.neurons.items()},
                "vocab": None if self.vocab is None else list(self.vocab), "extra": dict(self.extra)}

    def copy(self) -> SurgeryPlan:
        return SurgeryPlan.from_json(self.to_json())

    def is_identity(self) -> bool:
        b = self.base
        return (self.layers == list(range(b["layers"])) and self.vocab is None
                and all(self.heads[i] == list(range(b["heads"])) for i in self.layers)
                and all(self.neurons[i] == list(range(b["ffn"])) for i in self.layers))

    def summary(self) -> dict[str, Any]:
        """Counts for reports: kept layers, heads and neurons per kept layer, vocabulary size."""
        b = self.base
        return {
            "layers": f"{len(self.layers)}/{b['layers']}",
            "heads_per_layer": [len(self.heads[i]) for i in self.layers],
            "heads": f"{sum(len(self.heads[i]) for i in self.layers)}/{b['layers'] * b['heads']}",
            "neurons_per_layer": [len(self.neurons[i]) for i in self.layers],
            "neurons": f"{sum(len(self.neurons[i]) for i in self.layers)}/{b['layers'] * b['ffn']}",
            "vocab": f"{len(self.vocab) if self.vocab is not None else b['vocab']}/{b['vocab']}",
        }


def _base_dims(config, adapter: ArchAdapter) -> dict[str, int]:
    dims = {"layers": int(getattr(config, adapter.n_layers_field)), "heads": adapter.n_heads(config),
            "head_dim": adapter.head_dim(config), "ffn": adapter.ffn_size(config),
            "vocab": int(getattr(config, adapter.vocab_field))}
    if adapter.n_kv_heads_field is not None:  # only grouped-query families record it (old plans stay valid)
        dims["kv_heads"] = adapter.n_kv_heads(config)
    return dims


def _plan_for(model: nn.Module, plan: SurgeryPlan | None) -> SurgeryPlan:
    plan = plan.copy() if plan is not None else SurgeryPlan.identity(model)
    n = len(adapter_for(model).get_layers(model))
    if len(plan.layers) != n:
        raise SlimformerError(f"the surgery plan lists {len(plan.layers)} layers but the model has {n}; "
                              "pass the plan that belongs to this model")
    return plan


# --------------------------------------------------------------------------------------------------
# Tensor slicing
# --------------------------------------------------------------------------------------------------


def _is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, Conv1D)


def in_features(module: nn.Module) -> int:
    """Input width of a projection (``nn.Linear``, GPT-2's ``Conv1D``; 0 for :class:`BiasOnly`)."""
    if isinstance(module, BiasOnly):
        return 0
    return int(module.weight.shape[0] if _is_conv1d(module) else module.in_features)


def out_features(module: nn.Module) -> int:
    """Output width of a projection (``nn.Linear``, ``Conv1D`` or :class:`BiasOnly`)."""
    if isinstance(module, BiasOnly):
        return module.out_features
    return int(module.weight.shape[1] if _is_conv1d(module) else module.out_features)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """A projection's weight as ``[out, in]`` (a transposed view for ``Conv1D``, whose weight is ``[in, out]``)."""
    return module.weight.t() if _is_conv1d(module) else module.weight


def slice_linear(linear: nn.Linear, index: torch.Tensor | Sequence[int], dim: int) -> nn.Linear:
    """A new Linear keeping output features (``dim=0``: weight rows and bias) or input features
    (``dim=1``: weight columns) ``index``. Dtype, device and ``requires_grad`` are kept."""
    index = torch.as_tensor(index, dtype=torch.long, device=linear.weight.device)
    w = linear.weight.detach().index_select(dim, index).clone()
    bias = linear.bias
    if dim == 0 and bias is not None:
        bias = bias.detach()[index].clone()
    elif bias is not None:
        bias = bias.detach().clone()
    new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if bias is not None:
            new.bias.copy_(bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(linear.bias.requires_grad)
    return new


def slice_conv1d(conv: Conv1D, index: torch.Tensor | Sequence[int], dim: int) -> Conv1D:
    """Like :func:`slice_linear` for GPT-2's ``Conv1D`` (weight ``[in, out]``): ``dim=0`` keeps output
    features (weight columns and bias), ``dim=1`` input features (weight rows)."""
    index = torch.as_tensor(index, dtype=torch.long, device=conv.weight.device)
    w = conv.weight.detach().index_select(1 - dim, index).clone()
    b = conv.bias.detach()[index].clone() if dim == 0 else conv.bias.detach().clone()
    new = Conv1D.__new__(Conv1D)  # skip Conv1D's random init of a weight we overwrite anyway
    nn.Module.__init__(new)
    new.nx, new.nf = w.shape
    new.weight = nn.Parameter(w, requires_grad=conv.weight.requires_grad)
    new.bias = nn.Parameter(b, requires_grad=conv.bias.requires_grad)
    return new


def slice_projection(module: nn.Module, index: torch.Tensor | Sequence[int], dim: int) -> nn.Module:
    """Keep output (``dim=0``) or input (``dim=1``) features ``index`` of an ``nn.Linear`` or ``Conv1D``."""
    return slice_conv1d(module, index, dim) if _is_conv1d(module) else slice_linear(module, index, dim)


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _check_keep(keep: Sequence[int], current: int, what: str, where: str) -> list[int]:
    keep = [int(i) for i in keep]
    if len(set(keep)) != len(keep):
        raise SlimformerError(f"{where}the {what} to keep contain duplicates {keep}; list each once")
    bad = [i for i in keep if not 0 <= i < current]
    if bad:
        raise SlimformerError(f"{where}{what} {bad} do not exist (there are {current}); use indices 0..{current - 1}")
    return sorted(keep)


def _check_groups(keep: list[int], group: int, where: str) -> list[int]:
    """The key/value groups of kept query heads; refuses a keep-set that splits a group."""
    groups = sorted({h // group for h in keep})
    if len(keep) != len(groups) * group:
        split = [g for g in groups if any(g * group + j not in keep for j in range(group))]
        raise SlimformerError(
            f"{where}heads {keep} split key/value groups {split} (each group of {group} query heads shares one "
            "key/value head); keep or remove whole groups")
    return groups


def head_count(layer: nn.Module, adapter: ArchAdapter, head_dim: int) -> int:
    """Current number of (query) attention heads of one layer (0 once all were removed)."""
    return in_features(layer.get_submodule(adapter.attn_out)) // head_dim


def neuron_count(layer: nn.Module, adapter: ArchAdapter) -> int:
    """Current number of FFN neurons of one layer (0 once all were removed)."""
    return in_features(layer.get_submodule(adapter.ffn_out))


def attention_weights(layer: nn.Module, adapter: ArchAdapter) -> tuple[torch.Tensor, ...]:
    """The q, k, v and output-projection weights of a layer with heads, each as ``[out, in]`` views
    (a fused GPT-2 ``c_attn`` split into its three blocks). k and v have one row block per key/value head."""
    o = weight_out_in(layer.get_submodule(adapter.attn_out))
    if adapter.fused_qkv:
        q, k, v = weight_out_in(layer.get_submodule(adapter.query)).split(o.shape[1], dim=0)
    else:
        q, k, v = (weight_out_in(layer.get_submodule(p)) for p in (adapter.query, adapter.key, adapter.value))
    return q, k, v, o


def _slice_heads(layer: nn.Module, adapter: ArchAdapter, head_dim: int, keep: list[int], group: int = 1) -> None:
    attn_path = _parent(adapter.query)
    out = layer.get_submodule(adapter.attn_out)
    if not keep:
        if attn_path and adapter.attn_out.startswith(attn_path + ".") and "." not in adapter.attn_out[
                len(attn_path) + 1:]:
            # A decoder keeps the output projection inside the attention module: replace them together.
            attn = layer.get_submodule(attn_path)
            layer.set_submodule(attn_path, HeadlessAttention(
                adapter.attn_out[len(attn_path) + 1:], BiasOnly(out_features(out), out.bias),
                getattr(attn, "layer_idx", None)))
            return
        if not attn_path or adapter.attn_out.startswith(attn_path + "."):
            raise SlimformerError(f"family '{adapter.family}' cannot drop all heads of a layer; keep at least one")
        layer.set_submodule(attn_path, Empty(returns_attention=True))
        layer.set_submodule(adapter.attn_out, BiasOnly(out_features(out), out.bias))
        return
    rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in keep])
    kv_rows = torch.cat([torch.arange(g * head_dim, (g + 1) * head_dim) for g in sorted({h // group for h in keep})])
    if adapter.fused_qkv:  # outputs [q | k | v], each block as wide as the attention output's input
        width = in_features(out)
        qkv = layer.get_submodule(adapter.query)
        layer.set_submodule(adapter.query, slice_projection(qkv, torch.cat([rows, rows + width, rows + 2 * width]), 0))
    else:
        for path, index in ((adapter.query, rows), (adapter.key, kv_rows), (adapter.value, kv_rows)):
            layer.set_submodule(path, slice_projection(layer.get_submodule(path), index, dim=0))
    layer.set_submodule(adapter.attn_out, slice_projection(out, rows, dim=1))
    attn = layer.get_submodule(attn_path) if attn_path else layer
    # The forwards reshape with -1 heads; GPT-2 splits c_attn's output by split_size. Keep the rest true too.
    for name, value in (("num_attention_heads", len(keep)), ("all_head_size", len(keep) * head_dim),
                        ("num_heads", len(keep)), ("split_size", len(keep) * head_dim),
                        ("num_key_value_heads", len(keep) // group)):
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, value)


def _slice_neurons(layer: nn.Module, adapter: ArchAdapter, keep: list[int]) -> None:
    out = layer.get_submodule(adapter.ffn_out)
    if not keep:
        for path in adapter.ffn_in:
            layer.set_submodule(path, Empty())
        layer.set_submodule(adapter.ffn_out, BiasOnly(out_features(out), out.bias))
        return
    for path in adapter.ffn_in:
        layer.set_submodule(path, slice_projection(layer.get_submodule(path), keep, dim=0))
    layer.set_submodule(adapter.ffn_out, slice_projection(out, keep, dim=1))


# --------------------------------------------------------------------------------------------------
# Surgery (in place; returns the updated plan)
# --------------------------------------------------------------------------------------------------


def prune_heads(model: nn.Module, keep: Mapping[int, Sequence[int]], plan: SurgeryPlan | None = None
                ) -> SurgeryPlan:
    """Keep only heads ``keep[layer]`` (current layer position -> current head positions) in each listed
    layer; unlisted layers are untouched. Returns the updated plan.

    Heads are query heads. With grouped-query attention a keep-set must hold whole key/value groups (query
    heads ``g*k .. g*k+g-1`` share key/value head ``k``): removing a group removes its key/value rows and all
    its query heads, so ``num_key_value_groups`` stays right."""
    adapter = adapter_for(model)
    plan = _plan_for(model, plan)
    layers = adapter.get_layers(model)
    head_dim = plan.base["head_dim"]
    group = adapter.group_size(model.config)
    for pos, kept in keep.items():
        if not 0 <= int(pos) < len(layers):
            raise SlimformerError(f"layer {pos} does not exist (the model has {len(layers)}); use 0..{len(layers) - 1}")
        layer = layers[int(pos)]
        current = head_count(layer, adapter, head_dim)
        kept = _check_keep(kept, current, "heads", f"layer {pos}: ")
        if group > 1:
            _check_groups(kept, group, f"layer {pos}: ")
        if len(kept) == current:
            continue
        _slice_heads(layer, adapter, head_dim, kept, group)
        base_layer = plan.layers[int(pos)]
        plan.heads[base_layer] = [plan.heads[base_layer][i] for i in kept]
    return plan


def prune_neurons(model: nn.Module, keep: Mapping[int, Sequence[int]], plan: SurgeryPlan | None = None
                  ) -> SurgeryPlan:
    """Keep only FFN neurons ``keep[layer]`` (current positions) in each listed layer."""
    adapter = adapter_for(model)
    plan = _plan_for(model, plan)
    layers = adapter.get_layers(model)
    for pos, kept in keep.items():
        if not 0 <= int(pos) < len(layers):
            raise SlimformerError(f"layer {pos} does not exist (the model has {len(layers)}); use 0..{len(layers) - 1}")
        layer = layers[int(pos)]
        current = neuron_count(layer, adapter)
        kept = _check_keep(kept, current, "neurons", f"layer {pos}: ")
        if len(kept) == current:
            continue
        _slice_neurons(layer, adapter, kept)
        base_layer = plan.layers[int(pos)]
        plan.neurons[base_layer] = [plan.neurons[base_layer][i] for i in kept]
    return plan


def keep_layers(model: nn.Module, keep: Sequence[int], plan: SurgeryPlan | None = None) -> SurgeryPlan:
    """Keep only the layers at current positions ``keep`` (in model order)."""
    adapter = adapter_for(model)
    plan = _plan_for(model, plan)
    layers = adapter.get_layers(model)
    if not keep:
        raise SlimformerError(f"pruning would remove all {len(layers)} layers; keep at least one")
    kept = _check_keep(keep, len(layers), "layers", "")
    if len(kept) == len(layers):
        return plan
    base = adapter.base(model)
    parent, _, name = adapter.layers.rpartition(".")
    holder = base.get_submodule(parent) if parent else base
    new = nn.ModuleList([layers[i] for i in kept])
    setattr(holder, name, new)
    # Caches index layers by layer_idx; keep it equal to the new position.
    for new_pos, layer in enumerate(new):
        for m in layer.modules():
            if hasattr(m, "layer_idx") and isinstance(m.layer_idx, int):
                m.layer_idx = new_pos
    plan.layers = [plan.layers[i] for i in kept]
    kept_base = set(plan.layers)
    plan.heads = {k: v for k, v in plan.heads.items() if k in kept_base}
    plan.neurons = {k: v for k, v in plan.neurons.items() if k in kept_base}
    return plan


def drop_layers(model: nn.Module, drop: Sequence[int], plan: SurgeryPlan | None = None) -> SurgeryPlan:
    """Remove the layers at current positions ``drop``."""
    n = len(adapter_for(model).get_layers(model))
    drop = set(_check_keep(list(dict.fromkeys(drop)), n, "layers", ""))
    if len(drop) >= n:
        raise SlimformerError(f"dropping layers {sorted(drop)} would remove all {n} layers; keep at least one")
    return keep_layers(model, [i for i in range(n) if i not in drop], plan)


def prune_vocab(model: nn.Module, keep_ids: Iterable[int], plan: SurgeryPlan | None = None) -> SurgeryPlan:
    """Keep only the embedding rows ``keep_ids`` (current ids); new id = rank of the old id among the kept.
    Linear layers that read the vocabulary (the adapter's ``vocab_heads``) are sliced alike; an LM head tied
    to the embedding (GPT-2, Llama with ``tie_word_embeddings``) stays tied to the new embedding."""
    adapter = adapter_for(model)
    plan = _plan_for(model, plan)
    emb = adapter.base(model).get_submodule(adapter.embeddings)
    kept = sorted({int(i) for i in keep_ids})
    if not kept:
        raise SlimformerError("vocabulary pruning would keep no tokens; give a non-empty corpus")
    if kept[0] < 0 or kept[-1] >= emb.num_embeddings:
        raise SlimformerError(f"token ids must lie in 0..{emb.num_embeddings - 1}; check the tokenizer and corpus")
    idx = torch.tensor(kept, device=emb.weight.device)
    pad = emb.padding_idx
    new_pad = kept.index(pad) if pad is not None and pad in kept else None
    new = nn.Embedding(len(kept), emb.embedding_dim, padding_idx=new_pad, device=emb.weight.device,
                       dtype=emb.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(emb.weight.detach()[idx])
    new.weight.requires_grad_(emb.weight.requires_grad)
    pad_id = getattr(model.config, "pad_token_id", None)
    if adapter.decoder and pad_id is not None and type(model).__name__.endswith("ForSequenceClassification") \
            and (pad_id not in kept or kept.index(pad_id) != pad_id):
        # These heads find each row's last token by comparing ids with config.pad_token_id, which surgery keeps.
        raise SlimformerError(f"vocabulary pruning would move the pad token id {pad_id} that this decoder's "
                              "classification head reads from config.json; keep ids 0..pad_token_id or skip --vocab")
    adapter.base(model).set_submodule(adapter.embeddings, new)
    for path in adapter.vocab_heads:
        try:
            head = model.get_submodule(path)
        except AttributeError:
            continue  # e.g. a classification model has no LM head
        if head.weight is emb.weight:  # tied to the embedding: stay tied
            if getattr(head, "bias", None) is not None:
                raise SlimformerError(f"'{path}' is tied to the embedding but has a bias; untie it before pruning")
            head.weight = new.weight
            if hasattr(head, "out_features"):
                head.out_features = len(kept)
        else:
            model.set_submodule(path, slice_linear(head, idx, dim=0))
    plan.vocab = [plan.vocab[i] for i in kept] if plan.vocab is not None else kept
    return plan


def replay_plan(model: nn.Module, plan: SurgeryPlan | Mapping[str, Any]) -> nn.Module:
    """Apply a saved plan to a freshly built base model, giving exactly the saved shapes."""
    plan = plan if isinstance(plan, SurgeryPlan) else SurgeryPlan.from_json(plan)
    adapter = adapter_for(model)
    if plan.family != adapter.family:
        raise SlimformerError(f"the surgery plan is for family '{plan.family}' but the model is '{adapter.family}'; "
                              "load it with its own config.json")
    base = _base_dims(model.config, adapter)
    if base != plan.base:
        raise SlimformerError(f"config.json {base} is not the base architecture of the surgery plan {plan.base}; "
                              "restore the saved config.json")
    current = SurgeryPlan.identity(model)
    # Heads and neurons are keyed by base layer, so apply them while all layers are still in place.
    current = prune_heads(model, {i: plan.heads[i] for i in plan.layers}, current)
    current = prune_neurons(model, {i: plan.neurons[i] for i in plan.layers}, current)
    current = keep_layers(model, plan.layers, current)
    if plan.vocab is not None:
        prune_vocab(model, plan.vocab, current)
    return model


# --------------------------------------------------------------------------------------------------
# Masking (the reference that physical removal must equal; also a cheap "what if")
# --------------------------------------------------------------------------------------------------


def _pre_mask(mask: torch.Tensor):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (args[0] * mask.to(args[0].dtype),) + tuple(args[1:])

    return hook


def mask_heads(model: nn.Module, masks: Mapping[int, torch.Tensor]) -> list[torch.utils.hooks.RemovableHandle]:
    """Multiply each head's context vector by ``masks[layer][head]`` (0 = removed) before the attention
    output projection. Returns hook handles; call ``.remove()`` on them to unmask."""
    adapter = adapter_for(model)
    layers = adapter.get_layers(model)
    d = adapter.head_dim(model.config)
    return [layers[i].get_submodule(adapter.attn_out).register_forward_pre_hook(
        _pre_mask(torch.as_tensor(m, dtype=torch.float32).repeat_interleave(d))) for i, m in masks.items()]


def mask_neurons(model: nn.Module, masks: Mapping[int, torch.Tensor]) -> list[torch.utils.hooks.RemovableHandle]:
    """Multiply each FFN neuron's activation by ``masks[layer][neuron]`` before the FFN output projection."""
    adapter = adapter_for(model)
    layers = adapter.get_layers(model)
    return [layers[i].get_submodule(adapter.ffn_out).register_forward_pre_hook(
        _pre_mask(torch.as_tensor(m, dtype=torch.float32))) for i, m in masks.items()]


# --------------------------------------------------------------------------------------------------
# Vocabulary: corpus ids and the tokenizer wrapper
# --------------------------------------------------------------------------------------------------


def corpus_token_ids(tokenizer: Any, texts: Iterable[str] | Iterable[list[str]], *, split_into_words: bool = False
                     ) -> list[int]:
    """Sorted token ids that ``tokenizer`` produces for ``texts``, plus all its special ids."""
    ids: set[int] = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None:
        ids.add(int(unk))
    batch: list = []

    def flush() -> None:
        enc = tokenizer(batch, is_split_into_words=split_into_words, add_special_tokens=False)
        for row in enc["input_ids"]:
            ids.update(int(i) for i in row)
        batch.clear()

    for t in texts:
        batch.append(t)
        if len(batch) == 1024:
            flush()
    if batch:
        flush()
    return sorted(ids)


class VocabMappedTokenizer:
    """A tokenizer whose ids are remapped onto a pruned vocabulary (new id = rank among kept old ids; a
    WordPiece tokenizer re-splits words into kept pieces, otherwise anything outside the kept set becomes
    [UNK]). Text is split into words as by ``base_tokenizer``, so the pruned model reads ordinary text;
    ``word_ids()`` and the other encoding helpers keep working."""

    # Methods that take or return ids but are not remapped here: refuse rather than give wrong ids.
    _UNMAPPED = frozenset({"pad", "encode_plus", "batch_encode_plus", "prepare_for_model",
                           "build_inputs_with_special_tokens", "apply_chat_template"})

    def __init__(self, base_tokenizer: Any, vocab_map: Sequence[int]):
        self.base_tokenizer = base_tokenizer
        self.vocab_map = [int(i) for i in vocab_map]
        unk = base_tokenizer.unk_token_id
        if unk is None or unk not in self.vocab_map:
            raise SlimformerError("the kept vocabulary has no [UNK] token; prune the vocabulary with slimformer")
        old_size = max(len(base_tokenizer), max(self.vocab_map) + 1)
        new_of_old = np.full(old_size, self.vocab_map.index(unk), dtype=np.int64)
        new_of_old[self.vocab_map] = np.arange(len(self.vocab_map))
        self._new_of_old = new_of_old
        self._new_of_old_t = torch.from_numpy(new_of_old)
        self._old_of_new = np.asarray(self.vocab_map, dtype=np.int64)
        # WordPiece: split words with dropped tokens into kept pieces rather than reading them as [UNK].
        self._restricted = restricted_tokenizer(base_tokenizer, self.vocab_map)

    # ---- id translation ------------------------------------------------------------------------
    def to_new(self, ids: Any) -> Any:
        """Map base-tokenizer ids (int, nested lists, numpy array or tensor) to pruned-vocabulary ids."""
        if isinstance(ids, torch.Tensor):
            return self._new_of_old_t.to(ids.device)[ids]
        if isinstance(ids, np.ndarray):
            return self._new_of_old[ids]
        if isinstance(ids, (list, tuple)):
            return [self.to_new(i) for i in ids]
        return int(self._new_of_old[int(ids)])

    def to_old(self, ids: Any) -> Any:
        """Map pruned-vocabulary ids back to base-tokenizer ids."""
        if isinstance(ids, torch.Tensor):
            return torch.from_numpy(self._old_of_new).to(ids.device)[ids]
        if isinstance(ids, np.ndarray):
            return self._old_of_new[ids]
        if isinstance(ids, (list, tuple)):
            return [self.to_old(i) for i in ids]
        return int(self._old_of_new[int(ids)])

    # ---- the tokenizer surface ------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any):
        if self._restricted is not None:
            return self._restricted(*args, **kwargs)
        enc = self.base_tokenizer(*args, **kwargs)
        if "input_ids" in enc:
            enc["input_ids"] = self.to_new(enc["input_ids"])
        return enc

    def encode(self, *args: Any, **kwargs: Any) -> list[int]:
        if self._restricted is not None:
            return self._restricted.encode(*args, **kwargs)
        return self.to_new(self.base_tokenizer.encode(*args, **kwargs))

    def decode(self, ids: Any, *args: Any, **kwargs: Any) -> str:
        return self.base_tokenizer.decode(self.to_old(ids), *args, **kwargs)

    def batch_decode(self, ids: Any, *args: Any, **kwargs: Any) -> list[str]:
        return self.base_tokenizer.batch_decode(self.to_old(ids), *args, **kwargs)

    def convert_ids_to_tokens(self, ids: Any, *args: Any, **kwargs: Any):
        return self.base_tokenizer.convert_ids_to_tokens(self.to_old(ids), *args, **kwargs)

    def convert_tokens_to_ids(self, tokens: Any):
        return self.to_new(self.base_tokenizer.convert_tokens_to_ids(tokens))

    def get_vocab(self) -> dict[str, int]:
        kept = set(self.vocab_map)
        return {t: int(self._new_of_old[i]) for t, i in self.base_tokenizer.get_vocab().items() if i in kept}

    def __len__(self) -> int:
        return len(self.vocab_map)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab_map)

    @property
    def all_special_ids(self) -> list[int]:
        return [self.to_new(i) for i in self.base_tokenizer.all_special_ids]

    def save_pretrained(self, *args: Any, **kwargs: Any):
        # The base tokenizer is saved; the kept ids travel in slimformer.json ("vocab_map").
        return self.base_tokenizer.save_pretrained(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("base_tokenizer", "vocab_map", "_new_of_old", "_new_of_old_t",
                                             "_old_of_new", "_restricted"):
            raise AttributeError(name)
        if name in self._UNMAPPED:
            raise AttributeError(f"{name} is not available on a pruned-vocabulary tokenizer; call the tokenizer "
                                 "and pad with slimformer.tasks.Collator")
        value = getattr(self.base_tokenizer, name)
        if name.endswith("_token_id") and value is not None:
            return self.to_new(value)
        return value

    def __repr__(self) -> str:
        return f"VocabMappedTokenizer({type(self.base_tokenizer).__name__}, {len(self)} of " \
               f"{len(self.base_tokenizer)} tokens)"


def wrap_tokenizer(tokenizer: Any, vocab_map: Sequence[int]) -> VocabMappedTokenizer:
    """Wrap a base tokenizer so its ids index a pruned vocabulary (``vocab_map`` = kept base ids)."""
    return VocabMappedTokenizer(base_tokenizer(tokenizer), vocab_map)


def base_tokenizer(tokenizer: Any) -> Any:
    """The underlying Hugging Face tokenizer of a (possibly wrapped) tokenizer."""
    return getattr(tokenizer, "base_tokenizer", tokenizer)


# --------------------------------------------------------------------------------------------------
# SlimModel helpers: the plan lives in the record
# --------------------------------------------------------------------------------------------------


def plan_of(slim: Any) -> SurgeryPlan:
    """The current surgery plan of a SlimModel (identity if it was never pruned)."""
    data = slim.record.get("surgery")
    return SurgeryPlan.from_json(data) if data else SurgeryPlan.identity(slim.model)


def set_plan(slim: Any, plan: SurgeryPlan) -> None:
    """Store ``plan`` in the record (what models.save writes and models.load replays) and keep the
    tokenizer's id mapping in step with the plan's vocabulary."""
    slim.record["surgery"] = plan.to_json()
    if plan.vocab is not None:
        slim.record["vocab_map"] = list(plan.vocab)
        slim.tokenizer = wrap_tokenizer(slim.tokenizer, plan.vocab)
    else:
        slim.record.pop("vocab_map", None)


__all__ = ["BiasOnly", "Empty", "SurgeryPlan", "VocabMappedTokenizer", "base_tokenizer", "corpus_token_ids",
           "drop_layers", "head_count", "keep_layers", "mask_heads", "mask_neurons", "neuron_count", "plan_of",
           "prune_heads", "prune_neurons", "prune_vocab", "replay_plan", "set_plan", "slice_linear",
           "wrap_tokenizer"]
