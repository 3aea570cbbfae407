"""Named pretrained tags: where each released checkpoint lives and how its images must be preprocessed."""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PretrainedTag:
    """A released checkpoint: `<preset>.<source>`, like timm's pretrained tags."""

    name: str
    preset: str
    hub_id: str
    filename: str | None  # one file in a repo (the original .pth), or None for a whole HF-format repo
    img_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    description: str = ""


def _hf(preset: str, hub_id: str, img_size: int, note: str, suffix: str = "hf") -> PretrainedTag:
    return PretrainedTag(f"{preset}.{suffix}", preset, hub_id, None, img_size, description=note)


TAGS: dict[str, PretrainedTag] = {
    tag.name: tag
    for tag in [
        PretrainedTag(
            "internvit-6b-224px.internvl",
            "internvit-6b-224px",
            "OpenGVLab/InternVL",
            "intern_vit_6b_224px.pth",
            224,
            description="original InternVL .pth used by the paper's probing and segmentation (with clip_projector)",
        ),
        _hf("internvit-6b-224px", "OpenGVLab/InternViT-6B-224px", 224, "HF-format release of the 224px model"),
        _hf("internvit-6b-448px-v1.0", "OpenGVLab/InternViT-6B-448px-V1-0", 448, "448px, InternVL-Chat-V1.1"),
        _hf("internvit-6b-448px-v1.2", "OpenGVLab/InternViT-6B-448px-V1-2", 448, "448px, InternVL-Chat-V1.2"),
        _hf("internvit-6b-448px-v1.5", "OpenGVLab/InternViT-6B-448px-V1-5", 448, "448px, InternVL-Chat-V1.5"),
        _hf("internvit-6b-448px-v2.5", "OpenGVLab/InternViT-6B-448px-V2_5", 448, "448px, InternVL2.5"),
        _hf("internvit-300m-448px", "OpenGVLab/InternViT-300M-448px", 448, "300M distilled, InternVL2"),
        _hf("internvit-300m-448px", "OpenGVLab/InternViT-300M-448px-V2_5", 448, "300M, InternVL2.5", "hf-v2.5"),
    ]
}

# A bare preset name resolves to its default tag (the 224px model: the original .pth of the paper's protocols).
DEFAULT_TAGS = {
    "internvit-6b-224px": "internvit-6b-224px.internvl",
    **{
        tag.preset: tag.name for tag in TAGS.values() if tag.preset != "internvit-6b-224px" and tag.name.endswith(".hf")
    },
}


def resolve_tag(name: str) -> PretrainedTag | None:
    """The tag called `name`, or the default tag of the preset `name`; None if it is neither."""
    return TAGS.get(name) or TAGS.get(DEFAULT_TAGS.get(name, ""))


# Released classification heads (docs/protocol.md §1.9): name -> (hub repo, file).
HEAD_TAGS = {"internvit-6b-224px.head": ("OpenGVLab/InternVL", "intern_vit_6b_224px_head.pth")}
