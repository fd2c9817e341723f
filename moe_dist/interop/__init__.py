"""Checkpoint interop: Hugging Face families (hf/, one module per family) and sparse upcycling of dense models (upcycle.py)."""
from .hf import FAMILIES, HFInteropError, export_hf, import_hf
from .upcycle import upcycle

__all__ = ["FAMILIES", "HFInteropError", "import_hf", "export_hf", "upcycle"]
