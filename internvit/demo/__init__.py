"""Demo scaffolding: synthetic mini ImageNet / ADE20K generators and the `internvit demo` main job, no downloads."""

from internvit.demo.run import (
    classification_overrides,
    make_demo_checkpoint,
    make_demo_image,
    run_demo,
    segmentation_overrides,
)

__all__ = [
    "classification_overrides",
    "make_demo_checkpoint",
    "make_demo_image",
    "run_demo",
    "segmentation_overrides",
]
