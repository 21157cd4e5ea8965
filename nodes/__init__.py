"""ComfyUI nodes of the pack. The only package that imports ComfyUI."""

from .bridge import session_of
from .inspector import SparseAttentionInspector
from .patch_nodes import RadialMask, SparseAttentionPatch
from .svg_nodes import SVGSettingsNode

NODE_CLASS_MAPPINGS = {
    "SparseAttentionPatch": SparseAttentionPatch,
    "RadialAttentionMask": RadialMask,
    "SparseAttentionInspector": SparseAttentionInspector,
    "SVGSettings": SVGSettingsNode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SparseAttentionPatch": "Sparse Attention Patch",
    "RadialAttentionMask": "Radial Mask",
    "SparseAttentionInspector": "Sparse Attention Inspector",
    "SVGSettings": "SVG Settings",
}
