"""``SaSTrainer``: a ``transformers.Trainer`` whose checkpoints hold the SaS adapter, not the whole model.

Use it as the ``Trainer`` itself, on a model :func:`sas.inject` adapted::

    sas.inject(model, sas.SaSConfig(targets=sas.LLAMA_TARGETS))
    trainer = SaSTrainer(model=model, args=TrainingArguments(...), train_dataset=...)
    trainer.train()                                   # checkpoint-N/ holds adapter_config.json +
    trainer.train(resume_from_checkpoint=True)        # adapter_model.safetensors, optimizer, scheduler, RNG

Every checkpoint folder, and ``trainer.save_model()``, is a folder :func:`sas.load_adapter` loads into the base
model (as PEFT's ``Trainer`` support saves a LoRA adapter). Resuming loads the saved adapter into the adapted
model in place, then the ``Trainer`` restores the optimizer, scheduler and RNG states as usual. It overrides
the ``Trainer``'s ``_save``, ``_load_from_checkpoint`` and ``_load_best_model``, the methods through which
the ``Trainer`` treats PEFT models alike (tested with transformers 5.23).

Multi-task training (``SaSConfig(num_tasks=T)``) needs no ``compute_loss`` of its own: give the dataset a
``task_ids`` column (one int per example). The trainer keeps that column although the model's ``forward``
does not take it, and runs each training and evaluation step inside ``sas.tasks(model, batch["task_ids"])``.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from .io import adapter_state_dict, load_adapter_weights, save_adapter
from .multitask import tasks

#: The dataset column that names each example's task for a multi-task adapter.
TASK_IDS_COLUMN = "task_ids"

__all__ = ["SaSTrainer"]


class SaSTrainer(Trainer):
    """A ``transformers.Trainer`` that saves and resumes the SaS adapter of its model (see the module's text).

    Args:
        *args, **kwargs: those of ``transformers.Trainer``; ``model`` is a model :func:`sas.inject` adapted.

    Raises:
        ValueError: on saving or resuming, a model without a SaS adapter.

    Example:
        >>> import pathlib, tempfile, torch, sas
        >>> from transformers import TrainingArguments
        >>> from sas.recipes.causal_lm.model import tiny_llama
        >>> from sas.trainer import SaSTrainer
        >>> model = sas.inject(tiny_llama(96), sas.SaSConfig(rank=4, targets=sas.LLAMA_TARGETS))
        >>> data = [{"input_ids": row, "labels": row} for row in torch.randint(0, 96, (8, 12))]
        >>> args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=1, per_device_train_batch_size=4,
        ...                          report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no")
        >>> trainer = SaSTrainer(model=model, args=args, train_dataset=data)
        >>> _ = trainer.train()  # doctest: +ELLIPSIS
        {'train_runtime': ...}
        >>> trainer.save_model()
        >>> sorted(p.name for p in pathlib.Path(args.output_dir).glob("adapter*"))
        ['adapter_config.json', 'adapter_model.safetensors']
    """

    def _adapted_model(self) -> nn.Module:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        adapter_state_dict(model)  # raises, naming the fix, for a model without an adapter
        return model

    def _set_signature_columns_if_needed(self) -> None:
        # The model's forward does not take task_ids, so the Trainer would drop the column before batching.
        super()._set_signature_columns_if_needed()
        if TASK_IDS_COLUMN not in self._signature_columns:
            self._signature_columns.append(TASK_IDS_COLUMN)

    def _tasks_of(self, inputs: Dict[str, Any]):
        """``sas.tasks`` for the batch's ``task_ids`` (taken out of ``inputs``), or a no-op context without them."""
        task_ids = inputs.pop(TASK_IDS_COLUMN, None)
        return contextlib.nullcontext() if task_ids is None else tasks(self._adapted_model(), task_ids)

    def compute_loss(self, model: nn.Module, inputs: Dict[str, Any], *args, **kwargs):
        with self._tasks_of(inputs):
            return super().compute_loss(model, inputs, *args, **kwargs)

    def prediction_step(self, model: nn.Module, inputs: Dict[str, Any], *args, **kwargs):
        with self._tasks_of(inputs):
            return super().prediction_step(model, inputs, *args, **kwargs)

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        # state_dict is the whole model's, which the Trainer passes under DeepSpeed; the adapter is saved instead.
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        save_adapter(self._adapted_model(), output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: Union[str, Path],
                              model: Optional[nn.Module] = None) -> None:
        load_adapter_weights(self._adapted_model() if model is None else model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_adapter_weights(self._adapted_model(), self.state.best_model_checkpoint)
