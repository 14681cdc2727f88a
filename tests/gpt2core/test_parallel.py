"""gpt2core.parallel: the wrap order (DDP/FSDP, then compile), fsdp on one rank left whole (its
optimizer state still in shards), FSDP2 on a one-rank gloo group (torch 2.13 runs FSDP2 on CPUs
over gloo), the last block kept gathered after forward, gathering a sharded model to save; the
optimizer state saved in shards by 2 ranks (spawned processes) and read back by 1, 2 or 3 ranks,
sharded or not. Through Ray Train: tests/pipelines/training/test_worker.py."""

import gc
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from gpt2core import GPT2, GPT2Config, parallel
from gpt2core.training import TrainState, rows_to_batch

CPU = torch.device("cpu")


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT2(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2))


@pytest.fixture
def group(tmp_path):
    """A one-rank gloo process group, as Ray Train's worker has (world size 1)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def state_for(model, wrap=None):
    return TrainState.create(model, lr=1e-2, weight_decay=0.01, warmup_steps=2, total_steps=20,
                             min_lr=1e-3, device="cpu", precision="fp32", wrap=wrap)


def test_without_a_process_group_the_model_stays_and_compile_comes_last():
    model = tiny()
    assert parallel.wrap(model, "ddp", device=CPU, dtype=None) is model
    compiled = parallel.wrap(model, "fsdp", device=CPU, dtype=None, compile=True)
    assert compiled._orig_mod is model and not parallel.is_sharded(model)
    with pytest.raises(ValueError, match="--strategy is one of ddp, fsdp"):
        parallel.wrap(model, "zero", device=CPU, dtype=None)


def test_fsdp_with_one_rank_leaves_the_model_whole_as_ddp_does(group):
    """Nothing to shard: FSDP2 on one GPU only adds its casts and gathers (issue 27)."""
    model = tiny()
    wrapped = parallel.wrap(model, "fsdp", device=CPU, dtype=None, compile=True)
    assert not parallel.is_sharded(model) and wrapped._orig_mod is model


def test_shard_makes_every_block_a_unit_the_last_kept_gathered_after_forward(group):
    from torch.distributed.fsdp import FSDPModule

    model = parallel.shard(tiny())
    assert parallel.is_sharded(model) and isinstance(model, FSDPModule)
    assert all(isinstance(b, FSDPModule) for b in model.transformer.h)
    x = torch.randint(0, 64, (2, 16))
    model(x)  # after forward: every block's weights freed (sharded) but the last one's
    from torch.distributed.tensor import DTensor

    kept = [not isinstance(b.attn.c_attn.weight, DTensor) for b in model.transformer.h]
    assert kept == [False, True]


def test_fsdp_trains_like_the_plain_model_gathers_and_resumes_from_shards(group, tmp_path):
    data = torch.randint(0, 64, (8, 17))
    plain = state_for(tiny())
    sharded = state_for(tiny(), wrap=parallel.shard)  # FSDP2's numerics, on one rank
    assert sharded.sharded and not plain.sharded
    for _ in range(3):
        a, na = plain.step([rows_to_batch(data, None, 16)], grad_clip=1.0)
        b, nb = sharded.step([rows_to_batch(data, None, 16)], grad_clip=1.0)
        # one rank: the same float32 sums, in an order FSDP may change
        assert float(b) == pytest.approx(float(a), rel=1e-5)
        assert float(nb) == pytest.approx(float(na), rel=1e-4)
    copy = parallel.unsharded_copy(sharded.raw)
    assert type(copy) is GPT2
    for (name, p), q in zip(plain.raw.state_dict().items(), copy.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)  # Adam on ~0 grads
    saved = sharded.state_dict()
    assert saved["step"] == 3 and "optimizer" not in saved  # the tensors go to shards
    sharded.save_shards(tmp_path / "shards")
    assert [p.name for p in (tmp_path / "shards").iterdir()] == ["rank-00000-of-00001.safetensors"]
    fresh = tiny(1)
    fresh.load_state_dict(copy.state_dict())  # as a resumed worker: weights first, then shard
    again = state_for(fresh, wrap=parallel.shard)
    again.load_state_dict(saved, shards=tmp_path / "shards")
    c, _ = again.step([rows_to_batch(data, None, 16)], grad_clip=1.0)
    d, _ = sharded.step([rows_to_batch(data, None, 16)], grad_clip=1.0)
    assert float(c) == pytest.approx(float(d), rel=1e-5)  # resumed: the same next step
    with pytest.raises(ValueError, match="resume it with --strategy ddp"):
        again.load_state_dict(plain.state_dict())  # a whole state, keyed by parameter order


def test_fsdp_on_one_rank_still_saves_shards_that_resume_it(group, tmp_path):
    """--strategy fsdp with one worker trains the whole model but keeps the optimizer state in
    shards, so a run on more workers resumes it sharded (and a ddp checkpoint is refused)."""
    data = torch.randint(0, 64, (8, 17))

    def fsdp(seed):
        return TrainState.create(tiny(seed), lr=1e-2, weight_decay=0.01, warmup_steps=2,
                                 total_steps=20, min_lr=1e-3, device="cpu", precision="fp32",
                                 wrap=lambda m: parallel.wrap(m, "fsdp", device=CPU, dtype=None),
                                 sharded_state=True)
    one = fsdp(0)
    assert one.sharded and not parallel.is_sharded(one.raw)
    for _ in range(2):
        one.step([rows_to_batch(data, None, 16)], grad_clip=1.0)
    saved = one.state_dict()
    assert "optimizer" not in saved
    one.save_shards(tmp_path / "shards")
    assert [p.name for p in (tmp_path / "shards").iterdir()] == ["rank-00000-of-00001.safetensors"]
    again = fsdp(3)
    again.raw.load_state_dict(one.raw.state_dict())
    again.load_state_dict(saved, shards=tmp_path / "shards")
    c, _ = again.step([rows_to_batch(data, None, 16)], grad_clip=1.0)
    d, _ = one.step([rows_to_batch(data, None, 16)], grad_clip=1.0)
    assert float(c) == pytest.approx(float(d), rel=1e-5)
    with pytest.raises(ValueError, match="resume it with --strategy ddp"):
        again.load_state_dict(state_for(tiny()).state_dict())


def full_state(model, optimizer):
    """The optimizer's whole state by parameter name (PyTorch's own gather), on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
        full_state_dict=True, flatten_optimizer_state_dict=True, cpu_offload=True))


def ranks(rank, world, base, job):
    """One spawned rank: `save` trains 3 steps sharded and writes its shards and the whole
    state; `load` reads the shards into a fresh sharded model and compares."""
    dist.init_process_group("gloo", init_method=f"file://{base}/store-{job}", rank=rank,
                            world_size=world)
    data = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(1))
    state = state_for(tiny(0 if job == "save" else 5), wrap=lambda m: parallel.wrap(
        m, "fsdp", device=CPU, dtype=None))
    if job == "save":
        for _ in range(3):  # every rank the same rows: the state any world size would reach
            state.step([rows_to_batch(data, None, 16)], grad_clip=1.0)
        state.save_shards(base / "shards")
        whole = full_state(state.raw, state.optimizer)
        if rank == 0:
            torch.save({"whole": whole, "saved": state.state_dict()}, base / "whole.pt")
    else:
        ref = torch.load(base / "whole.pt", weights_only=True)
        state.load_state_dict(ref["saved"], shards=base / "shards")
        whole = full_state(state.raw, state.optimizer)
        if rank == 0:
            for k, v in ref["whole"].items():
                assert torch.equal(whole[k], v) if isinstance(v, torch.Tensor) \
                    else whole[k] == v, k
    # every rank done before any leaves, and FSDP's hold on the gloo group (its mesh, its
    # async work) dropped first: a group that outlives destroy_process_group is torn down
    # during interpreter exit, where gloo's threads can abort the process (1 CI run in ~30)
    dist.barrier()
    del state, whole
    gc.collect()
    dist.destroy_process_group()


def test_optimizer_shards_of_two_ranks_load_on_any_number_of_ranks_sharded_or_not(
        tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    # a spawned rank imports `ranks` from this module (tests.gpt2core.test_parallel): spawn
    # gives it this process's sys.path, which under `pytest` lacks the repo root
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    mp.spawn(ranks, args=(2, tmp_path, "save"), nprocs=2)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"]
    mp.spawn(ranks, args=(3, tmp_path, "load"), nprocs=3)  # resharded: 3 parts of 2
    ref = torch.load(tmp_path / "whole.pt", weights_only=True)
    plain = state_for(tiny(5))  # no process group, no FSDP: a DDP worker reads them all
    plain.load_state_dict(ref["saved"], shards=tmp_path / "shards")
    whole = full_state(plain.raw, plain.optimizer)
    for k, v in ref["whole"].items():
        assert torch.equal(whole[k], v) if isinstance(v, torch.Tensor) else whole[k] == v, k
    assert plain.lr == ref["saved"]["optimizer_groups"][0]["lr"]
