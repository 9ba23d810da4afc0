"""Data sets in the VQA-X JSON format."""

from illume.data.vqax import VQAXItem, load_vqax, save_vqax

__all__ = ["VQAXItem", "load_vqax", "save_vqax"]
