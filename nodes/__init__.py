"""ComfyUI nodes of the pack. The only package that imports ComfyUI."""

from .adaspa import AdaSpaSearch
from .bridge import session_of  # noqa: F401  (for scripts: the session a patched model carries)
from .check import SparseAttentionCheck  # noqa: F401  (for scripts: the session a patched model carries)
from .inspector import SparseAttentionInspector
from .patch_nodes import RadialMask, SparseAttentionPatch
from .svg2_nodes import SVG2KMeansSettings
from .svg_nodes import SVGSettingsNode

NODE_CLASS_MAPPINGS = {
    "SparseAttentionPatch": SparseAttentionPatch,
    "RadialAttentionMask": RadialMask,
    "SparseAttentionInspector": SparseAttentionInspector,
    "SVG2KMeansSettings": SVG2KMeansSettings,
    "SVGSettings": SVGSettingsNode,
    "AdaSpaSearch": AdaSpaSearch,
    "SparseAttentionCheck": SparseAttentionCheck,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SparseAttentionPatch": "Sparse Attention Patch",
    "RadialAttentionMask": "Radial Mask",
    "SparseAttentionInspector": "Sparse Attention Inspector",
    "SVG2KMeansSettings": "SVG2 K-Means Settings",
    "SVGSettings": "SVG Settings",
    "AdaSpaSearch": "AdaSpa Search",
    "SparseAttentionCheck": "Sparse Attention Check",
}
