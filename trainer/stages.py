"""The Trainer's evaluation and prediction entry points: ``validate``, ``test``, ``predict``
(mixed into :class:`~ember.trainer.Trainer`)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from ember._validation import check_bool
from ember.trainer.data import batch_limit, entry_arguments
from ember.trainer.loops import run_evaluation
from ember.trainer.predict_loop import run_predict

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from ember.data import PreparedDataLoader
    from ember.trainer.batch_size_finder import StageData
    from ember.trainer.config import TrainerConfig
    from ember.trainer.module import DataModule, TrainModule

__all__ = ["EvaluationStages"]


class EvaluationStages:
    """``validate``, ``test`` and ``predict``: attach the module, prepare the loaders, run the loop."""

    config: TrainerConfig
    _stage_data: StageData | None = None  # (what a BatchSizeFinder searches with)

    if TYPE_CHECKING:

        @property
        def is_global_zero(self) -> bool: ...

        def _entering(self, stage: str) -> AbstractContextManager[None]: ...
        def _run(self, loop: Any, stage: str) -> Any: ...
        def _reattach(
            self, module: TrainModule | None, stage: str, datamodule: DataModule | None, ckpt_path: Any
        ) -> TrainModule: ...
        def _prepare_loader(
            self,
            loader: DataLoader[Any],
            dataloader_idx: int = 0,
            evaluation: bool = False,
            predicting: bool = False,
        ) -> PreparedDataLoader: ...
        def _loaders(self, kind: str, given: Any, datamodule: DataModule | None) -> list[DataLoader[Any]]: ...

    def validate(self, module: TrainModule | None = None, dataloaders: Any = None, ckpt_path: Any = None,
                 datamodule: DataModule | None = None, *, model: TrainModule | None = None,
                 verbose: bool = True) -> list[dict[str, float]]:  # fmt: skip
        """One pass over the validation data; returns the logged metrics per dataloader (``verbose``:
        and prints them, on global rank 0)."""
        module, dataloaders, datamodule = entry_arguments("validate", module, model, dataloaders, datamodule)
        return self._evaluate("validate", "validation", module, dataloaders, ckpt_path, datamodule, verbose)

    def test(self, module: TrainModule | None = None, dataloaders: Any = None, ckpt_path: Any = None,
             datamodule: DataModule | None = None, *, model: TrainModule | None = None,
             verbose: bool = True) -> list[dict[str, float]]:  # fmt: skip
        """One pass over the test data; returns the logged metrics per dataloader (``verbose``: and
        prints them, on global rank 0)."""
        module, dataloaders, datamodule = entry_arguments("test", module, model, dataloaders, datamodule)
        return self._evaluate("test", "test", module, dataloaders, ckpt_path, datamodule, verbose)

    def predict(self, module: TrainModule | None = None, dataloaders: Any = None, ckpt_path: Any = None,
                datamodule: DataModule | None = None, *, model: TrainModule | None = None,
                return_predictions: bool | None = None) -> list[Any] | None:  # fmt: skip
        """``predict_step`` outputs, gathered across processes in dataset order (each sample once);
        ``return_predictions=False``: none are kept (a writer callback has them), None is returned."""
        check_bool("return_predictions", return_predictions, owner="predict", optional=True)
        module, dataloaders, datamodule = entry_arguments("predict", module, model, dataloaders, datamodule)
        with self._entering("predict"):
            return self._predict(module, dataloaders, datamodule, ckpt_path, return_predictions is not False)

    def _predict(self, module: TrainModule | None, dataloaders: Any, datamodule: DataModule | None,
                 ckpt_path: Any, keep: bool) -> list[Any] | None:  # fmt: skip
        module = self._reattach(module, "predict", datamodule, ckpt_path)
        loaders = [
            self._prepare_loader(d, i, predicting=True)
            for i, d in enumerate(self._loaders("predict", dataloaders, datamodule))
        ]
        if not loaders:
            raise ValueError(
                "predict() needs data: pass dataloaders, a datamodule, or define predict_dataloader()"
            )
        limits = [batch_limit("limit_predict_batches", self.config.limit_predict_batches, d) for d in loaders]
        from ember.trainer.batch_size_finder import StageData  # (a fit does not load the batch-size search)

        self._stage_data = StageData("predict", dataloaders, datamodule, loaders, limits)  # (BatchSizeFinder)
        self._predict_loaders, self.num_predict_batches = loaders, limits
        result: list[Any] = self._run(lambda trainer: run_predict(trainer, loaders, limits, keep), "predict")
        return result if keep else None

    # -- internals -------------------------------------------------------------------------------
    def _evaluate(self, stage: str, prefix: str, module: TrainModule | None, dataloaders: Any, ckpt_path: Any,
                  datamodule: DataModule | None, verbose: bool) -> list[dict[str, float]]:  # fmt: skip
        check_bool("verbose", verbose, owner=stage)
        with self._entering(stage):
            results = self._evaluation_stage(stage, prefix, module, dataloaders, ckpt_path, datamodule)
        if verbose and self.is_global_zero and results:
            from ember.callbacks.run_summary import print_results  # (rich loads when something is drawn)

            print_results(stage.capitalize(), results)
        return results

    def _evaluation_stage(self, stage: str, prefix: str, module: TrainModule | None, dataloaders: Any,
                          ckpt_path: Any, datamodule: DataModule | None) -> list[dict[str, float]]:  # fmt: skip
        module = self._reattach(module, stage, datamodule, ckpt_path)
        name = "val" if stage == "validate" else "test"
        loaders = [
            self._prepare_loader(d, i, evaluation=True)
            for i, d in enumerate(self._loaders(name, dataloaders, datamodule))
        ]
        if not loaders:
            raise ValueError(
                f"{stage}() needs data: pass dataloaders, a datamodule, or define {name}_dataloader()"
            )
        option = "limit_val_batches" if stage == "validate" else "limit_test_batches"
        limits = [batch_limit(option, getattr(self.config, option), d) for d in loaders]
        from ember.trainer.batch_size_finder import StageData

        self._stage_data = StageData(name, dataloaders, datamodule, loaders, limits)  # (a BatchSizeFinder's)
        if stage == "test":  # (validate's loaders are not fit's val_dataloaders)
            self._test_loaders, self.num_test_batches = loaders, limits
        else:  # (as Lightning's: the running validation's batch counts)
            self.num_val_batches = limits
        results: list[dict[str, float]] = self._run(  # (no batch to run: no hooks, [] as Lightning)
            lambda t: run_evaluation(t, prefix, loaders, limits) if any(limits) else [], stage
        )
        return results
