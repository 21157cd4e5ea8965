"""Sparse Video Attention: training-free sparse attention for video DiTs in ComfyUI.

ComfyUI imports this folder (under any name) from custom_nodes/ and reads the mappings below.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
