"""sas.trainer.SaSTrainer: a SaS-adapted model trains with transformers' Trainer, its checkpoints hold the adapter
only, and resume_from_checkpoint continues the run exactly (tiny random LLaMA, a few steps on CPU)."""
import pytest
import torch

import sas

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


def test_resuming_from_another_adapter_is_refused(tmp_path):
    other = sas.inject(tiny_llama(VOCAB), sas.SaSConfig(rank=2, targets=sas.LLAMA_TARGETS))
    sas.save_adapter(other, tmp_path / "other")
    with pytest.raises(ValueError, match="not this model's adapter"):
        sas.io.load_adapter_weights(_adapted(), tmp_path / "other")
