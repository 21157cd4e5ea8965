"""ComfyUI nodes of the pack. The only package that imports ComfyUI."""

from .bridge import session_of
from .patch_nodes import RadialMask, SparseAttentionPatch

NODE_CLASS_MAPPINGS = {
    "SparseAttentionPatch": SparseAttentionPatch,
    "RadialAttentionMask": RadialMask,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "SparseAttentionPatch": "Sparse Attention Patch",
    "RadialAttentionMask": "Radial Mask",
}
