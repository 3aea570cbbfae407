"""Image classification on a frozen InternViT: heads, metrics, and the run_* entry points of the paper protocol."""
