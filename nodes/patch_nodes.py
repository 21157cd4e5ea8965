"""ComfyUI node classes: read inputs, build the core settings, clone the model, install the patch."""

from __future__ import annotations

from ..core import RadialSettings, SparseAttentionSession, SparseSchedule
from ..core.session import COMPENSATE
from ..kernels import BACKENDS
from ..kernels.eight_bit import PRECISIONS
from .bridge import install

METHOD_TYPE = "SPARSE_ATTENTION_METHOD"
CATEGORY = "model_patches/sparse_attention"


class SparseAttentionPatch:
    """MODEL in, MODEL out: a clone whose video self-attention runs sparse."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A Wan 2.1 / 2.2 or HunyuanVideo model from a loader. Other models "
                                               "pass through unchanged."}),
                "dense_steps": ("FLOAT", {
                    "default": 0.25, "min": 0.0, "max": 1000.0, "step": 0.01,
                    "tooltip": "The first steps run dense: they lay out the composition. Below 1 it is a fraction "
                               "of the run's steps (0.25 = the first quarter, at least one step); from 1 up, a "
                               "number of steps."}),
                "sparse_end": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "Sparse attention stops after this fraction of the steps (1.0 = to the end). Lower "
                               "it to render the last, detail-refining steps dense."}),
                "dense_layers": ("INT", {
                    "default": 1, "min": 0, "max": 100,
                    "tooltip": "The first transformer blocks always run dense (the papers keep about 3%: 1 of "
                               "Wan's 30-40 blocks)."}),
                "backend": (list(BACKENDS), {
                    "default": "auto",
                    "tooltip": "auto: the Triton kernel on NVIDIA GPUs, the torch reference elsewhere. triton / "
                               "reference force one (reference is slow: for checking)."}),
                "verbose": ("BOOLEAN", {"default": False,
                                        "tooltip": "Time every video attention call (sparse against dense) for the "
                                                   "run summary in the log and the Sparse Attention Inspector. "
                                                   "Small overhead; off: nothing is timed."}),
            },
            "optional": {
                "method": (METHOD_TYPE, {"tooltip": "Method settings from a settings node (Radial Mask...). "
                                                    "Unconnected: Radial with its defaults."}),
                "compensate": (list(COMPENSATE), {
                    "default": "auto",
                    "tooltip": "on: the keys a sparse layout skips are not dropped. Block methods (Radial, SVG, "
                               "AdaSpa) add one term per row: every skipped key summed exactly at the row's query "
                               "block's mean query and moved to the row; SVG2 adds each skipped key cluster through "
                               "its mean key and value. off: the papers' methods as they are. auto: on for Radial, "
                               "SVG and SVG2 (their videos came much closer to dense, Radial's and SVG's 4-step proxy "
                               "videos from 33 to 42 dB, for ~1.3x their attention time, still well below dense's); "
                               "off for AdaSpa (1-5 dB closer for ~2x its attention time, which its 64-token "
                               "blocks make costlier) and with precision 8-bit."}),
                "precision": (list(PRECISIONS), {
                    "default": "bf16",
                    "tooltip": "What the sparse kernel computes in. 8-bit: FP8 on Ada / Hopper / Blackwell GPUs, "
                               "INT8 on Ampere (faster, slightly less exact; a GPU without them runs bf16 and "
                               "says why). auto: 8-bit where the GPU has it. Dense steps and layers keep your "
                               "own attention, except with '8-bit + dense calls': they too run on the 8-bit "
                               "kernel, over every key (a GPU without 8-bit units keeps them on your attention)."}),
            },
        }

    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Makes video self-attention sparse (training-free). Place it between the model loader and the "
                   "sampler.")

    def patch(self, model, dense_steps, sparse_end, dense_layers, backend, verbose, method=None, compensate="auto",
              precision="bf16"):
        schedule = SparseSchedule(dense_steps=dense_steps, sparse_end=sparse_end, dense_layers=dense_layers)
        session = SparseAttentionSession(method or RadialSettings(), schedule, backend=backend, verbose=verbose,
                                         compensate=compensate, precision=precision)
        return (install(model, session),)


class RadialMask:
    """Settings of Radial attention: a static mask whose density decays with the distance between frames."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "decay_factor": ("FLOAT", {
                    "default": 0.2, "min": 0.01, "max": 4.0, "step": 0.01,
                    "tooltip": "Width of the spatial window between distant frames. Lower is faster, higher "
                               "is closer to dense. Reference: 0.2 for Wan, 0.95 for HunyuanVideo."}),
                "block_size": ([128, 64], {
                    "default": 128,
                    "tooltip": "Tile size of the sparse layout. 128 is fastest; 64 follows the mask more finely."}),
                "attention_sink": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Every frame attends fully to the first frame (Wan). Off for HunyuanVideo."}),
                "text_dense": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "Video tokens attend to all text tokens (HunyuanVideo, which mixes text into "
                               "self-attention), to LTX-2's guide frames (LTXVAddGuide) and to the tokens Wan S2V, "
                               "SCAIL and in-context latents put behind the video (motion, pose, references)."}),
            }
        }

    RETURN_TYPES = (METHOD_TYPE,)
    RETURN_NAMES = ("method",)
    FUNCTION = "settings"
    CATEGORY = CATEGORY
    DESCRIPTION = "Radial attention: O(n log n) static mask, density halves with each doubling of frame distance."

    def settings(self, decay_factor, block_size, attention_sink, text_dense):
        return (RadialSettings(decay_factor=decay_factor, block_size=int(block_size), attention_sink=attention_sink,
                               text_dense=text_dense),)
