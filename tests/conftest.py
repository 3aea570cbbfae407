"""Shared fixtures: tiny configs, deterministic seeds, and no network at test time."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never download at test time
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from internvit.model import PRESETS, InternViTConfig, build_model, get_config  # noqa: E402

TINY_6B = get_config("debug")  # rms_norm, full-width QK-norm, no qkv bias
TINY_300M = InternViTConfig(
    embed_dim=48,
    depth=3,
    num_heads=3,
    mlp_hidden_dim=96,
    img_size=56,
    norm_type="layer_norm",
    qkv_bias=True,
    qk_norm=False,
    layer_scale_init=1.0,
)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (norm weights and LayerScale included) non-trivial values, so no part hides."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(("norm1.weight", "norm2.weight", "q_norm.weight", "k_norm.weight")):
                p.copy_(1.0 + 0.3 * noise)
            elif name.endswith(("gamma", "lambda_1", "lambda_2")):
                p.copy_(0.5 + 0.3 * noise)
            else:
                p.copy_(0.2 * noise)
    return model


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return randomize_(build_model(TINY_6B)).eval()


@pytest.fixture
def tiny_300m_preset(monkeypatch):
    """Register TINY_300M as a preset so that LayerNorm / qkv-bias checkpoints can be matched and loaded."""
    monkeypatch.setitem(PRESETS, "tiny-300m", TINY_300M)
    return "tiny-300m"


def fast_path_model() -> torch.nn.Module:
    """A debug-size model whose every part matters: randomised norms, LayerScale near 1, modest matmul weights."""
    torch.manual_seed(0)
    m = randomize_(build_model(TINY_6B), seed=3).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith(("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight")):
                p.mul_(0.25)
    return m


# The fault-injection suite (`pytest -m faults`): kills, signals, locks, divergence, tampered and malformed files,
# bad images and bad config values, each asserting the exact error line or a bit-identical resume. Tests by file and
# name prefix; the marker is added at collection so that the suite is listed here, in one place.
FAULT_SUITE = {
    "test_faults.py": ("test_",),
    "test_engine.py": (
        "test_checkpointer_round_trip_and_signature_check",
        "test_checkpoint_without_signature_or_unreadable_is_refused",
        "test_refused_resume_names_the_fields",
        "test_bad_data_and_images_fail_before_the_backbone_loads",
        "test_resumed_history_and_config_are_those_of_the_run",
        "test_one_training_per_folder_and_leftovers_removed",
        "test_a_diverging_run_stops",
        "test_first_signal_is_recorded",
        "test_resume_with_other_shapes_is_a_clear_error",
    ),
    "test_cls_e2e.py": (
        "test_killed_training_resumes_to_the_same_head",
        "test_sigterm_saves_mid_epoch_and_resumes_bit_identically",
        "test_corrupt_image_names_the_file_or_is_skipped_and_counted",
        "test_config_mistakes_are_named",
        "test_classify_folders_exif_and_unreadable_inputs",
        "test_custom_tree_mistakes_are_clear_errors",
    ),
    # (the FSDP variant of the seg kill test, and the extraction kill test, run in the full suite only: 80 s)
    "test_seg_e2e.py": (
        "test_killed_training_resumes_to_the_same_weights[ddp]",
        "test_bad_dataset_gives_a_clear_error",
    ),
    "test_seg_generic.py": ("test_segment_names_exif_and_unreadable_inputs",),
    "test_weights.py": (
        "test_unreadable_files",
        "test_wrong_shape_under_strict",
        "test_checkpoint_does_not_fit_preset",
        "test_sharded_folder_with_a_missing_shard",
        "test_hub_sources_offline_fail_clearly",
        "test_index_entries_outside_the_folder_are_refused",
        "test_malformed_index_is_a_clear_error",
        "test_index_naming_a_missing_shard",
        "test_header_claiming_the_6b_preset",
        "test_non_finite_",
        "test_hub_cache_is_used_and_an_unreachable_hub_fails_at_once",
    ),
    "test_convert.py": (
        "test_modified_file_is_refused_unless_the_check_is_skipped",
        "test_flipped_byte_on_disk_is_refused",
        "test_info_reports_non_finite_tensors",
        "test_info_reports_a_header_preset_that_does_not_fit",
    ),
    "test_cls_heads.py": ("test_unreadable_head_files", "test_wrong_shape_strict_and_lenient"),
    "test_seg_checkpoints.py": ("test_non_finite_segmentor_weights_are_refused",),
    "test_data_imagenet.py": (
        "test_corrupt_image_error_names_the_file",
        "test_skip_corrupt_loader_yields_the_rest_and_reports",
        "test_deep_images_bombs_and_symlink_loops",
        "test_missing_val_classes_are_named",
        "test_custom_val_missing_a_class_is_scored_with_a_warning",
    ),
    "test_probing.py": ("test_extraction_names_a_corrupt_image_or_skips_and_counts_it",),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        prefixes = FAULT_SUITE.get(item.path.name, ())
        if item.name.startswith(prefixes):
            item.add_marker(pytest.mark.faults)
