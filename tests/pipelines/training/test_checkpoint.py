"""pipelines/training/checkpoint.py: which checkpoint a run resumes from or exports. Only a
complete one, ever: its train state, config and weights, the weights as long as their header
says; locally and on object storage (moto's S3 server)."""

import pytest

from pipelines.training import checkpoint


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    return str(tmp_path) if request.param == "local" else request.getfixturevalue("bucket") + "/r"


def test_find_takes_a_checkpoint_or_the_latest_complete_one(root, make_checkpoint):
    for step in (10, 20):
        make_checkpoint(root, step)
    make_checkpoint(root, 30, weights="none")  # cut off mid-upload: never chosen
    assert checkpoint.find(root).endswith("checkpoint_0000020")
    assert checkpoint.find(f"{root}/checkpoint_0000010").endswith("checkpoint_0000010")
    with pytest.raises(ValueError, match="does not exist"):
        checkpoint.find(f"{root}/nope")
    with pytest.raises(ValueError, match="holds no complete checkpoint_"):
        checkpoint.find(f"{root}/checkpoint_0000010/model")
    with pytest.raises(ValueError, match="is incomplete"):
        checkpoint.find(f"{root}/checkpoint_0000030")


def test_newest_weights_cut_short_fall_back_to_the_one_before(root, make_checkpoint, capsys):
    make_checkpoint(root, 10)
    make_checkpoint(root, 20, weights="short")  # every file there, the weights truncated
    assert checkpoint.find(root).endswith("checkpoint_0000010")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "checkpoint_0000020" in err[0]
    assert "model.safetensors holds" in err[0]
    assert "holds" in checkpoint.truncated(f"{root}/checkpoint_0000020")
    assert checkpoint.truncated(f"{root}/checkpoint_0000010") == ""
    with pytest.raises(ValueError, match="is incomplete"):
        checkpoint.find(f"{root}/checkpoint_0000020")


def test_a_sharded_checkpoint_is_complete_with_every_ranks_shard(root, make_checkpoint):
    make_checkpoint(root, 10, shards=(2, 2))
    make_checkpoint(root, 20, shards=(1, 2))  # rank 1's upload never came
    assert checkpoint.find(root).endswith("checkpoint_0000010")
    with pytest.raises(ValueError, match="is incomplete"):
        checkpoint.find(f"{root}/checkpoint_0000020")


def test_only_ddp_resumes_a_whole_optimizer_state(root, make_checkpoint):
    whole, sharded = make_checkpoint(root, 10), make_checkpoint(root, 20, shards=(2, 2))
    for strategy in ("ddp", "fsdp"):
        checkpoint.check_strategy(sharded, strategy)  # shards: read by either
    checkpoint.check_strategy(whole, "ddp")
    with pytest.raises(ValueError, match="saved by --strategy ddp .*resume it with "
                                         "--strategy ddp"):
        checkpoint.check_strategy(whole, "fsdp")


def test_a_train_state_cut_short_falls_back_to_the_one_before(root, make_checkpoint):
    make_checkpoint(root, 10)
    make_checkpoint(root, 20, state_file="short")  # a killed driver's upload: weights whole
    assert checkpoint.find(root).endswith("checkpoint_0000010")
    assert checkpoint.truncated(f"{root}/checkpoint_0000020") == "train_state.pt is cut short"


def test_best_is_the_lowest_metric_at_a_checkpoints_own_step(root, make_checkpoint):
    make_checkpoint(root, 10, eval_loss=4.0)
    make_checkpoint(root, 20, eval_loss=3.0)
    make_checkpoint(root, 30, eval_loss=3.5)
    make_checkpoint(root, 40, eval_loss=1.0, weights="short")  # best, but never complete
    assert checkpoint.best(root, "eval/loss").endswith("checkpoint_0000020")
    assert checkpoint.best(root, "eval/bpb").endswith("checkpoint_0000030")  # none: the latest


def test_the_position_round_trips_through_the_train_state(tmp_path, make_checkpoint):
    d = make_checkpoint(tmp_path, 20, run_id="abc")
    assert checkpoint.Position.of(checkpoint.load_state(d)) == checkpoint.Position(step=20)
    assert checkpoint.run_id(d) == "abc"
    assert checkpoint.resumed(str(tmp_path), None) == d  # a reused --name: its latest
    assert checkpoint.resumed(str(tmp_path / "other"), d) == d  # --from_checkpoint
    assert checkpoint.resumed(str(tmp_path / "other"), None) is None  # a new run


def test_a_position_moves_to_another_worker_count_keeping_the_share_consumed():
    saved = checkpoint.Position(step=30, tokens=999, epoch=2, batch=12, world=2)
    assert saved.on(2) == saved
    assert saved.on(1) == checkpoint.Position(30, 999, 2, 24, 1)  # 12 micro-batches each x 2
    assert saved.on(4) == checkpoint.Position(30, 999, 2, 6, 4)
    old = checkpoint.Position.of({"step": 5, "tokens": 1, "epoch": 0, "batch": 5})
    assert old.world == 0 and old.on(3) == checkpoint.Position(5, 1, 0, 5, 3)
