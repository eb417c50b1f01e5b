"""Tune-side helpers of the sweep: early stopping that compares like with like, and a record of each
trial's latest report.

One Tune experiment holds every category and every model, but a validation AUROC of 0.80 is weak on one
category and strong on another, and a flow model at epoch 2 is not a distillation model at epoch 2. So
ASHA runs separately inside each (category, model) group of gradient-trained trials; memory-bank trials
report once, at the end, and are never stopped (there is nothing left to save by stopping them).
"""

from __future__ import annotations

import json
from typing import Any

from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from raylib_ad.tuning.trial import LAST_RESULT_FILE, trial_dir


class GroupedASHA(FIFOScheduler):
    """ASHA (Li et al., MLSys 2020) per (category, model) group, keyed from the trial's config."""

    def __init__(self, *, metric: str, mode: str, max_t: int, grace_period: int, reduction_factor: float = 2,
                 gradient_models: tuple[str, ...] = ()):
        super().__init__()
        self._metric, self._mode = metric, mode
        self._asha_args = dict(time_attr="training_iteration", metric=metric, mode=mode, max_t=max_t,
                               grace_period=grace_period, reduction_factor=reduction_factor, brackets=1)
        self._gradient_models = tuple(gradient_models)
        self._groups: dict[tuple[str, str], AsyncHyperBandScheduler] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return not (metric or mode)  # fixed at construction; TuneConfig must not override them

    def _group(self, trial) -> AsyncHyperBandScheduler | None:
        planned = trial.config["trial"]
        if planned["model"] not in self._gradient_models:
            return None
        key = (planned["category"], planned["model"])
        if key not in self._groups:
            self._groups[key] = AsyncHyperBandScheduler(**self._asha_args)
        return self._groups[key]

    def on_trial_add(self, tune_controller, trial) -> None:
        group = self._group(trial)
        if group is not None:
            group.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        group = self._group(trial)
        if group is None:
            return TrialScheduler.CONTINUE
        return group.on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        group = self._group(trial)
        if group is not None and trial.trial_id in group._trial_info:
            group.on_trial_complete(tune_controller, trial, result)

    def on_trial_error(self, tune_controller, trial) -> None:
        self.on_trial_remove(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial) -> None:
        group = self._group(trial)
        if group is not None and trial.trial_id in group._trial_info:
            group.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        stopped = sum(g._num_stopped for g in self._groups.values())
        return f"GroupedASHA: {len(self._groups)} (category, model) groups, {stopped} trials stopped early"


class LastResultCallback(tune.Callback):
    """Keeps each trial's latest report in DIR/trials/<key>/last_result.json (in the driver), so a trial
    stopped early by ASHA still shows the epoch and validation AUROC it reached, whatever loggers Tune
    has switched on."""

    def __init__(self, out: str, total: int | None = None, progress: bool = False):
        self.out = out
        self._bar = None
        if progress:
            from raylib_ad.progress import ProgressCounter

            self._bar = ProgressCounter("sweep trials", total, unit="trial")

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self._bar is not None:
            self._bar.update(1)

    def on_trial_error(self, iteration, trials, trial, **info):
        if self._bar is not None:
            self._bar.update(1)

    def on_experiment_end(self, trials, **info):
        if self._bar is not None:
            self._bar.close()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        path = trial_dir(self.out, trial.config["trial"]["key"]) / LAST_RESULT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        keep = {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        path.write_text(json.dumps(keep))
