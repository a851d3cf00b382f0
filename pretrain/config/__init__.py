"""Run configuration: schema (`schema.py`), YAML + overrides (`load.py`), cross-field
validation and the resolved layout (`validate.py`), the generated DeepSpeed config
(`deepspeed.py`) and the generated reference docs/CONFIG.md (`docs.py`)."""
from pretrain.config.deepspeed import deepspeed_config
from pretrain.config.load import config_from_dict, config_to_yaml, load_config
from pretrain.config.schema import (
    CheckpointConfig, Config, DataConfig, LoggingConfig, ModelConfig, OptimConfig, ParallelConfig,
    ScheduleConfig, TrainConfig, to_dict,
)
from pretrain.config.validate import Layout, resolve

__all__ = [
    "Config", "ModelConfig", "DataConfig", "ParallelConfig", "OptimConfig", "ScheduleConfig",
    "TrainConfig", "CheckpointConfig", "LoggingConfig", "to_dict",
    "load_config", "config_from_dict", "config_to_yaml", "resolve", "Layout", "deepspeed_config",
]
