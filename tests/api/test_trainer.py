"""sas.trainer.SaSTrainer: a SaS-adapted model trains with transformers' Trainer, its checkpoints hold the adapter
only, and resume_from_checkpoint continues the run exactly (tiny random LLaMA, a few steps on CPU)."""
import pytest
import torch

import sas
import sas.testing

pytest.importorskip("transformers")
from transformers import TrainingArguments  # noqa: E402

from sas.recipes.causal_lm.model import tiny_llama  # noqa: E402
from sas.trainer import SaSTrainer  # noqa: E402

VOCAB = 96
STEPS = 4


class Tokens(torch.utils.data.Dataset):
    """16 random sequences of 12 tokens, each its own labels (the model shifts them)."""

    def __init__(self):
        self.ids = torch.randint(0, VOCAB, (16, 12), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def _adapted():
    return sas.inject(tiny_llama(VOCAB), sas.SaSConfig(rank=4, targets=sas.LLAMA_TARGETS))


def _trainer(model, out):
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=STEPS, save_steps=2,
                             learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                             dataloader_num_workers=0, disable_tqdm=True)
    return SaSTrainer(model=model, args=args, train_dataset=Tokens())


def _adapter(model):
    return {k: v.clone() for k, v in sas.io.adapter_state_dict(model).items()}


def test_trainer_trains_saves_the_adapter_only_and_resumes_exactly(tmp_path):
    model = _adapted()
    before = _adapter(model)
    _trainer(model, tmp_path / "run").train()
    trained = _adapter(model)
    assert any(not torch.equal(trained[k], before[k]) for k in before)

    checkpoint = tmp_path / "run" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
            "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "config.json"}, files
    # The checkpoint is an adapter folder: it loads into the base model, every tensor whole.
    loaded = sas.load_adapter(tiny_llama(VOCAB), checkpoint)
    shapes = {k: v.shape for k, v in sas.io.adapter_state_dict(loaded).items()}
    assert shapes == {k: v.shape for k, v in trained.items()}

    # Resumed from step 2 in a fresh model: the same adapter after step 4, bit for bit.
    resumed_model = _adapted()
    _trainer(resumed_model, tmp_path / "resumed").train(resume_from_checkpoint=str(checkpoint))
    resumed = _adapter(resumed_model)
    for key, value in trained.items():
        assert torch.equal(resumed[key], value), key


def test_resuming_from_another_adapter_is_refused_naming_the_field(tmp_path):
    other = sas.inject(tiny_llama(VOCAB), sas.SaSConfig(rank=2, targets=sas.LLAMA_TARGETS))
    sas.save_adapter(other, tmp_path / "other")
    with pytest.raises(ValueError, match="field 'rank' is 2 in the saved adapter but 4 in this model"):
        sas.io.load_adapter_weights(_adapted(), tmp_path / "other")


def test_resuming_from_a_checkpoint_saved_with_other_compute_fields_loads_it(tmp_path):
    saved = sas.inject(tiny_llama(VOCAB), sas.SaSConfig(rank=4, targets=sas.LLAMA_TARGETS, saved_input="int8",
                                                         train_down=False))
    sas.testing.randomize_adapter(saved)
    sas.save_adapter(saved, tmp_path / "checkpoint")
    model = _adapted()
    _trainer(model, tmp_path / "run")._load_from_checkpoint(str(tmp_path / "checkpoint"))
    loaded = _adapter(model)
    for key, value in _adapter(saved).items():
        assert torch.equal(loaded[key], value), key


class TaskTokens(Tokens):
    """Tokens with a task_ids column: even examples task 0, odd ones task 1."""

    def __getitem__(self, index):
        return {**super().__getitem__(index), "task_ids": index % 2}


def test_a_task_ids_column_trains_a_multitask_adapter_without_a_compute_loss(tmp_path):
    model = sas.inject(tiny_llama(VOCAB), sas.SaSConfig(rank=4, targets=sas.LLAMA_TARGETS, num_tasks=2))
    before = _adapter(model)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, save_strategy="no",
                             learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
                             disable_tqdm=True)
    trainer = SaSTrainer(model=model, args=args, train_dataset=TaskTokens(), eval_dataset=TaskTokens())
    trainer.train()
    after = _adapter(model)
    for task in (0, 1):  # every batch mixes both tasks: each embedding got its samples' gradient
        key = f"sas_shared.task_embeddings.{task}"
        assert not torch.equal(after[key], before[key]), key
    assert "eval_loss" in trainer.evaluate()
