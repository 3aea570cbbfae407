"""Semantic segmentation on ADE20K with a frozen or fine-tuned InternViT: heads, segmentor, metrics, entry points."""
