"""Dense Llama, Mistral, Qwen2 and Qwen3: imported (never exported) as sources for upcycle()."""
from __future__ import annotations

from .common import no_partial_rotary, read_layer_types, unsupported
from .registry import Family, register
from .tensors import TensorMap


def _dense(family: str):
    def read(hf: dict, m: dict, e: dict) -> None:
        no_partial_rotary(family, m)
        if hf.get("mlp_bias"):
            raise unsupported(family, "mlp_bias", True, "FFNs are bias-free")
        bias = bool(hf.get("attention_bias", False))
        if family == "llama":
            m.update(qkv_bias=bias, attn_out_bias=bias)
        elif family == "mistral":
            if hf.get("sliding_window") is not None:
                m["sliding_window"] = hf["sliding_window"]  # every layer
        else:
            if family == "qwen2":
                m["qkv_bias"] = True  # Qwen2 always has q/k/v biases
            else:
                m.update(qk_norm=True, qkv_bias=bias, attn_out_bias=bias)
            on, n, max_window = bool(hf.get("use_sliding_window")), m["n_layer"], hf.get("max_window_layers", 28)
            if on and not hf.get("layer_types"):  # transformers' defaults for the sliding layers
                sliding = (lambda i: (i + 1) % 2 and i < max_window) if family == "qwen2" else (lambda i: i >= max_window)
                hf = {**hf, "layer_types": ["sliding_attention" if sliding(i) else "full_attention" for i in range(n)]}
            read_layer_types(family, hf, m, hf.get("sliding_window") if on else 0)

    return read


def _no_export(cfg, moe) -> dict:  # pragma: no cover - dense families are import-only (Family.moe=False)
    raise AssertionError("dense families are not exported")


register(*(Family(t, "", _dense(t), _no_export, TensorMap(), moe=False) for t in ("llama", "mistral", "qwen2", "qwen3")))
