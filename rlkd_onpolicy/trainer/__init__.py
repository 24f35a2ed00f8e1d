"""The TRL-style trainer: `RLKDConfig` (fields with help and range checks) and `RLKDTrainer`."""

from rlkd_onpolicy.trainer.config import SAMPLING_MODES, RLKDConfig
from rlkd_onpolicy.trainer.trainer import RLKDTrainer
from rlkd_onpolicy.vocab import vocabulary_size as check_vocabularies

__all__ = ["SAMPLING_MODES", "RLKDConfig", "RLKDTrainer", "check_vocabularies"]
