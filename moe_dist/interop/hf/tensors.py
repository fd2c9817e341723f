"""Tensor names and layouts: moe_dist state dicts <-> a family's checkpoint tensors, both ways.

Names inside a layer go through the family's table, `TensorMap.layer`: pairs (ours, theirs) of exact
names or of prefixes ending in "." (the longest match wins), in the names transformers 5 keeps in
memory. Released ("original") checkpoints spell some names differently (`original`: substrings of
whole names), store experts one by one (`per_expert`: their gate/up/down names), or fuse projections
(`fused`). A checkpoint is read in either spelling; an export writes the one asked for.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import Tensor

from .registry import HFInteropError

TOP = (("embed_tokens.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight"),
       ("lm_head.weight", "lm_head.weight"))
# Llama / Qwen / DeepSeek names: the base most families change a few entries of.
LLAMA = (
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("attn.", "self_attn."),  # projections and their biases, q/k norms, MLA's projections and norms, sinks
    ("ffn.router.weight", "mlp.gate.weight"),
    ("ffn.router.expert_bias", "mlp.gate.e_score_correction_bias"),
    ("ffn.experts.", "mlp.experts."),
    ("ffn.shared_experts.", "mlp.shared_experts."),
    ("ffn.shared_expert_gate.weight", "mlp.shared_expert_gate.weight"),
    ("ffn.gate_proj.weight", "mlp.gate_proj.weight"),  # dense SwiGLU layers
    ("ffn.up_proj.weight", "mlp.up_proj.weight"),
    ("ffn.down_proj.weight", "mlp.down_proj.weight"),
)
GATE_UP_DOWN = ("gate_proj", "up_proj", "down_proj")


def table(base: tuple, changes: dict[str, Optional[str]]) -> tuple:
    """base with the entries of `changes` (ours -> theirs) replaced or added; None drops one."""
    changes = dict(changes)
    out = [(ours, changes.pop(ours, theirs)) for ours, theirs in base]
    return tuple((o, t) for o, t in out + list(changes.items()) if t is not None)


@dataclass(frozen=True)
class Fused:
    """One checkpoint tensor that is our `parts` concatenated along dim 0 (e.g. q, k, v rows)."""
    theirs: str  # inside model.layers.{i}.; in the original spelling when original_only
    parts: tuple[str, ...]
    original_only: bool = False  # fused in released checkpoints only; transformers 5 keeps them apart


@dataclass(frozen=True)
class TensorMap:
    layer: tuple[tuple[str, str], ...] = LLAMA
    original: tuple[tuple[str, str], ...] = ()  # (transformers-5, original) substrings of whole names
    per_expert: Optional[tuple[str, str, str]] = GATE_UP_DOWN  # original per-expert names; None: stacked there too
    # stacked: ours, [E, 2F, H] / [E, H, F]; transposed: [E, H, 2F] / [E, F, H] (Aria); gpt_oss: transposed,
    # gate and up columns interleaved (g0, u0, g1, u1, ...), biases likewise
    experts: str = "stacked"
    fused: tuple[Fused, ...] = ()
    unsqueezed: tuple[str, ...] = ()  # their names stored with a leading dim of 1 (Ernie's expert bias [1, E])
    may_lack: tuple[str, ...] = ()  # our names a checkpoint may lack: the model's initial value stays
    ignore: tuple[str, ...] = ()  # our names a checkpoint may have where our model has none (dropped)

    # -- names ---------------------------------------------------------------------------------

    def theirs(self, ours: str) -> Optional[str]:
        return _lookup(self.layer, ours, 0)

    def ours(self, theirs: str) -> Optional[str]:
        return _lookup(self.layer, theirs, 1)

    def to_original(self, name: str) -> str:
        for new, old in self.original:
            name = name.replace(new, old)
        return name

    def from_original(self, name: str) -> str:
        for new, old in self.original:
            name = name.replace(old, new)
        return name

    # -- expert layouts ------------------------------------------------------------------------

    def experts_to_ours(self, sub: str, t: Tensor) -> Tensor:
        """sub: the name after ffn.experts. (gate_up_proj, down_proj, gate_up_proj_bias, down_proj_bias)."""
        if self.experts == "stacked" or sub == "down_proj_bias":
            return t
        if sub in ("gate_up_proj", "down_proj"):
            t = t.transpose(1, 2)
        if self.experts == "gpt_oss" and sub.startswith("gate_up_proj"):
            t = torch.cat([t[:, 0::2], t[:, 1::2]], dim=1)  # interleaved rows -> gate rows, then up rows
        return t.contiguous()

    def experts_to_theirs(self, sub: str, t: Tensor) -> Tensor:
        if self.experts == "stacked" or sub == "down_proj_bias":
            return t
        if self.experts == "gpt_oss" and sub.startswith("gate_up_proj"):
            gate, up = t.chunk(2, dim=1)
            t = torch.stack([gate, up], dim=2).flatten(1, 2)  # g0, u0, g1, u1, ...
        if sub in ("gate_up_proj", "down_proj"):
            t = t.transpose(1, 2)
        return t.contiguous()


def _lookup(pairs, name: str, side: int) -> Optional[str]:
    best = None
    for pair in pairs:
        key = pair[side]
        if name == key or (key.endswith(".") and name.startswith(key)):
            if best is None or len(key) > len(best[side]):
                best = pair
    return None if best is None else best[1 - side] + name[len(best[side]):]


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _squeezed(shape) -> list[int]:
    return [d for d in shape if d != 1]


# ---------------------------------------------------------------------------------------------
# checkpoint -> ours


def to_ours(tmap: TensorMap, family: str, items: Iterable[tuple[str, Tensor]], expected: dict[str, torch.Size],
            n_layer: int, mtp_layers: int = 0, tie: bool = False) -> dict[str, Tensor]:
    """A checkpoint's (name, tensor) pairs -> our state dict for a model whose tensor shapes are `expected`.

    Unknown tensors, missing ones and wrong shapes raise HFInteropError naming them.
    """
    ours: dict[str, Tensor] = {}
    unknown: list[str] = []
    per_expert: dict[tuple[str, str], dict[int, Tensor]] = {}
    names = {v: k for k, v in zip(("gate", "up", "down"), tmap.per_expert or ())}
    expert_re = re.compile(r"^(.+\.experts)\.(\d+)\.(\w+)\.weight$")
    fused = {f.theirs: f for f in tmap.fused}

    def put(key: str, t: Tensor, source: str) -> None:
        if key not in expected:
            if not any(key.endswith(s) for s in tmap.ignore):
                unknown.append(source)
            return
        if t.shape != expected[key] and _squeezed(t.shape) == _squeezed(expected[key]):
            t = t.reshape(expected[key])  # the same values with dims of size 1 added or dropped
        ours[key] = t

    def place(name: str, t: Tensor) -> None:
        for mine, theirs in TOP:
            if name in (theirs, tmap.to_original(theirs)):
                return put(mine, t, name)
        match = _LAYER.match(name)
        if match is None:
            return None if name.endswith("rotary_emb.inv_freq") else unknown.append(name)  # a cache old files saved
        i, rest = int(match.group(1)), match.group(2)
        if i >= n_layer:
            return None if i < n_layer + mtp_layers else unknown.append(name)  # multi-token-prediction modules
        if rest.endswith("rotary_emb.inv_freq"):
            return None
        pre = f"layers.{i}."
        if rest in fused:
            f = fused[rest]
            sizes = [expected[pre + p][0] if pre + p in expected else 0 for p in f.parts]
            if sum(sizes) != t.shape[0]:
                return unknown.append(name)
            for p, part in zip(f.parts, t.split(sizes)):
                put(pre + p, part, name)
            return None
        key = tmap.ours(rest)
        if (key is None or pre + key not in expected) and tmap.original:  # the original spelling
            key = tmap.ours(tmap.from_original(name)[len(f"model.layers.{i}."):]) or key
        if key is None:
            return unknown.append(name)
        if key.startswith("ffn.experts."):
            t = tmap.experts_to_ours(key[len("ffn.experts."):], t)
        put(pre + key, t, name)

    for name, t in items:
        pe = expert_re.match(name) if names else None
        if pe is not None and pe.group(3) in names:
            per_expert.setdefault((pe.group(1), names[pe.group(3)]), {})[int(pe.group(2))] = t
        else:
            place(name, t)
    stacks: dict[str, dict[str, Tensor]] = {}
    for (prefix, part), tensors in per_expert.items():
        got = sorted(tensors)
        if got != list(range(len(got))):
            raise HFInteropError(f"{family} checkpoint: {prefix} has per-expert {part} weights for experts {got}, expected 0..{len(got) - 1}")
        stacks.setdefault(prefix, {})[part] = torch.stack([tensors[e] for e in got])
    for prefix, parts in stacks.items():
        if set(parts) != {"gate", "up", "down"}:
            raise HFInteropError(f"{family} checkpoint: {prefix} lacks per-expert {sorted({'gate', 'up', 'down'} - set(parts))} weights")
        place(prefix + ".gate_up_proj", torch.cat([parts["gate"], parts["up"]], dim=1))  # [E, 2F, H]
        place(prefix + ".down_proj", parts["down"])  # [E, H, F]
    if tie:
        ours.pop("lm_head.weight", None)
        if "embed_tokens.weight" in ours:
            ours["lm_head.weight"] = ours["embed_tokens.weight"]
    if unknown:
        more = f" (and {len(unknown) - 8} more)" if len(unknown) > 8 else ""
        raise HFInteropError(f"{family} checkpoint: tensors moe_dist has no place for: {', '.join(unknown[:8])}{more}")
    missing = [k for k in expected if k not in ours and not any(k.endswith(s) for s in tmap.may_lack)]
    if missing:
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise HFInteropError(f"{family} checkpoint: tensors missing for moe_dist: {', '.join(missing[:8])}{more}")
    for k, t in ours.items():
        if t.shape != expected[k]:
            raise HFInteropError(f"{family} checkpoint: {k} has shape {tuple(t.shape)}, the config implies {tuple(expected[k])}")
    return ours


# ---------------------------------------------------------------------------------------------
# ours -> checkpoint

TRAINING_ONLY = ("ffn.router.noise_weight",)  # noisy top-k acts in training only


def to_theirs(tmap: TensorMap, state: dict[str, Tensor], tie: bool, original: bool,
              always: Optional[dict[str, Tensor]] = None) -> dict[str, Tensor]:
    """Our state dict -> the family's tensors: transformers-5 names, or (original) the released checkpoints'.

    always: tensors of ours to write even though the state lacks them (DeepSeek-V3's zero expert bias).
    """
    out: dict[str, Tensor] = {}
    state = {**(always or {}), **state}
    for mine, theirs in TOP:
        if mine in state and not (mine == "lm_head.weight" and tie):
            out[tmap.to_original(theirs) if original else theirs] = state[mine]
    layers: dict[int, dict[str, Tensor]] = {}
    for key, t in state.items():
        if key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            layers.setdefault(int(i), {})[rest] = t
    for i in sorted(layers):
        pre, mine = f"model.layers.{i}.", layers[i]
        for f in tmap.fused:
            if (original or not f.original_only) and all(p in mine for p in f.parts):
                name = pre + f.theirs
                out[tmap.to_original(name) if original and not f.original_only else name] = torch.cat([mine.pop(p) for p in f.parts])
        for rest, t in mine.items():
            if rest in TRAINING_ONLY:
                continue
            theirs = tmap.theirs(rest)
            if theirs is None:
                raise HFInteropError(f"export: no Hugging Face name for layers.{i}.{rest}")
            if rest.startswith("ffn.experts."):
                t = tmap.experts_to_theirs(rest[len("ffn.experts."):], t)
            if theirs in tmap.unsqueezed:
                t = t.unsqueeze(0)
            name = tmap.to_original(pre + theirs) if original else pre + theirs
            if original and tmap.per_expert and rest in ("ffn.experts.gate_up_proj", "ffn.experts.down_proj"):
                base = name.rsplit(".", 1)[0]  # ...experts
                g, u, d = tmap.per_expert
                if rest == "ffn.experts.gate_up_proj":
                    gate, up = t.chunk(2, dim=1)  # [E, F, H] each
                    out.update({f"{base}.{e}.{g}.weight": gate[e] for e in range(t.shape[0])})
                    out.update({f"{base}.{e}.{u}.weight": up[e] for e in range(t.shape[0])})
                else:
                    out.update({f"{base}.{e}.{d}.weight": t[e] for e in range(t.shape[0])})
                continue
            out[name] = t
    return out
