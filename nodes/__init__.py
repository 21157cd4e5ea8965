"""ComfyUI nodes of the pack. The only package that imports ComfyUI."""

from .adaspa import AdaSpaSearch
from .bridge import session_of
from .inspector import SparseAttentionInspector
from .patch_nodes import RadialMask, SparseAttentionPatch

NODE_CLASS_MAPPINGS = {
    "SparseAttentionPatch": SparseAttentionPatch,
    "RadialAttentionMask": RadialMask,
    "SparseAttentionInspector": SparseAttentionInspector,
    "AdaSpaSearch": AdaSpaSearch,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SparseAttentionPatch": "Sparse Attention Patch",
    "RadialAttentionMask": "Radial Mask",
    "SparseAttentionInspector": "Sparse Attention Inspector",
    "AdaSpaSearch": "AdaSpa Search",
}
