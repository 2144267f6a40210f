"""Configuration: structured schemas, the `conf/` directory, composition and validation."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from trntrain.config.schema import register_configs
from trntrain.config.validate import (
    ConfigError,
    context_attention,
    data_parallel_size,
    micro_batch_size,
    microbatches,
    validate,
)


def config_dir() -> Path:
    """`conf/` of the source tree, or the copy a wheel installs inside the package."""
    packaged = Path(__file__).resolve().parent.parent / "conf"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "conf"


def compose(overrides: list[str] | None = None) -> DictConfig:
    """Compose `conf/config.yaml` with Hydra overrides, outside of a Hydra app (tests, tools)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []))


__all__ = [
    "ConfigError",
    "compose",
    "config_dir",
    "context_attention",
    "data_parallel_size",
    "micro_batch_size",
    "microbatches",
    "register_configs",
    "validate",
]
