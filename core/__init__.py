"""Pure-torch core of the pack: token grid, planners, schedule, per-run session, attention dispatcher.

Never imports ComfyUI: nodes/ adapts ComfyUI's objects to this package.
"""

from .adaspa import AdaSpaPlanner, AdaSpaSettings, parse_search_steps
from .check import CHECK_KEY, CheckResults, CheckSettings, parse_steps, psnr
from .dispatcher import CONTEXT_KEY, attention_override
from .grid import VideoGrid, latent_grid
from .method import AttentionCall, run_block_plan
from .plan import BlockPlan
from .radial import RadialPlanner, RadialSettings, radial_block_mask
from .schedule import SparseSchedule, step_index
from .session import BlockLayers, ForwardContext, RunStats, SparseAttentionSession
from .summary import run_summary
from .svg2 import PRESETS as SVG2_PRESETS, SVG2Planner, SVG2Settings
from .svg import SVG_PRESETS, SVGPlanner, SVGSettings
from .timing import CallTimer, timed_override

__all__ = [
    "CONTEXT_KEY", "attention_override", "VideoGrid", "latent_grid", "AttentionCall", "run_block_plan", "BlockPlan",
    "RadialPlanner",
    "RadialSettings", "radial_block_mask", "SparseSchedule", "step_index", "BlockLayers", "ForwardContext", "RunStats",
    "SparseAttentionSession", "run_summary", "CallTimer", "timed_override",
    "SVG2_PRESETS", "SVG2Planner", "SVG2Settings",
    "SVG_PRESETS", "SVGPlanner", "SVGSettings",
    "AdaSpaPlanner", "AdaSpaSettings", "parse_search_steps",
    "CHECK_KEY", "CheckResults", "CheckSettings", "parse_steps", "psnr",
]
