"""Trigger names (fms-hf-tuning's) and the control decisions operations may return."""

from __future__ import annotations

from fmtune.hookspecs import CONTROL_FLAGS

__all__ = ["CONTROL_FLAGS", "TRIGGERS", "TRIGGER_ALIASES", "UNSUPPORTED_TRIGGERS"]

# trigger name in the YAML -> the fmtune hook that delivers it
TRIGGERS: dict[str, str] = {
    "on_train_begin": "on_train_begin",
    "on_epoch_begin": "on_epoch_begin",
    "on_step_end": "on_step",
    "on_log": "on_log",
    "on_evaluate": "on_evaluate",
    "on_save": "on_save",
    "on_epoch_end": "on_epoch_end",
    "on_train_end": "on_train_end",
}
# fmtune's own hook name, accepted as a spelling of the trigger
TRIGGER_ALIASES: dict[str, str] = {"on_step": "on_step_end"}
# transformers events fms-hf-tuning knows that fmtune has no hook for
UNSUPPORTED_TRIGGERS: dict[str, str] = {
    "on_init_end": "use on_train_begin",
    "on_step_begin": "use on_step_end of the previous step",
    "on_substep_end": "use on_step_end",
    "on_pre_optimizer_step": "use on_step_end",
    "on_optimizer_step": "use on_step_end",
    "on_prediction_step": "use on_evaluate",
    "on_predict": "use on_evaluate",
}
