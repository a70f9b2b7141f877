"""Run a test's worker in several processes joined in one process group (imported as ``distributed_run``:
pytest puts each test file's folder on ``sys.path``). Used by the DDP and FSDP tests beside it."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world_size, rendezvous, backend, worker, args):
    torch.set_num_threads(1)  # 2 cores shared by the processes (and other jobs): one thread each
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


def run_processes(worker, tmp_path, *args, world_size=2, backend="gloo"):
    """``worker(rank, *args)`` in ``world_size`` spawned processes; raises if any of them raised.
    ``worker`` must be a module-level function (it is pickled into the new processes)."""
    mp.spawn(_entry, args=(world_size, str(tmp_path / "rendezvous"), backend, worker, args), nprocs=world_size,
             join=True)
