"""Stand-ins for ComfyUI core nodes newer than the ComfyUI trees the tests run against, installed the way those
nodes install themselves (their public source is the reference; this is our own code)."""
