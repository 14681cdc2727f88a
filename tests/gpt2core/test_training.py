"""gpt2core.training: rows to batches, the LR schedule, one optimizer step, evaluation.

TrainState.step returns 0-d tensors (no host sync per step); these tests read them with
float(), as the training loop does on its logging steps."""

import io
import math

import pytest
import torch

from gpt2core import GPT2, GPT2Config
from gpt2core.training import IGNORE, TrainState, bits_per_byte, evaluate, lr_factor, rows_to_batch


def tiny(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return GPT2(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2,
                           dropout=dropout))


def state_for(model, **kw):
    args = dict(lr=1e-2, weight_decay=0.01, warmup_steps=2, total_steps=20, min_lr=1e-3,
                device="cpu", use_amp=False)
    return TrainState.create(model, **{**args, **kw})


def test_rows_to_batch_shifts_and_masks_padding():
    rows = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]])
    inputs, targets = rows_to_batch(rows, torch.tensor([5, 3]), seq_len=4)
    assert inputs.tolist() == [[1, 2, 3, 4], [6, 7, 8, 0]]
    # the short row holds 3 tokens: 2 targets, the rest is padding
    assert targets.tolist() == [[2, 3, 4, 5], [7, 8, IGNORE, IGNORE]]
    assert inputs.dtype == targets.dtype == torch.int64


def test_rows_to_batch_cuts_rows_for_a_shorter_context():
    rows = torch.arange(9).unsqueeze(0)  # L = 8
    inputs, targets = rows_to_batch(rows, None, seq_len=4)
    assert inputs.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert targets.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    with pytest.raises(ValueError, match="does not divide"):
        rows_to_batch(rows, None, seq_len=3)


def test_lr_warms_up_linearly_then_decays_to_min():
    f = lr_factor(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    values = [f(s) for s in range(4, 15)]
    assert values == sorted(values, reverse=True)


def test_steps_reduce_the_loss_and_follow_the_schedule():
    model = tiny()
    state = state_for(model)
    data = torch.randint(0, 64, (8, 17))
    batch = rows_to_batch(data, None, 16)
    first, _ = map(float, state.step([batch], grad_clip=1.0))
    assert state.lr == pytest.approx(1e-2)  # after step 1 of 2 warm-up steps: factor(1) = 1
    for _ in range(15):
        loss, norm = map(float, state.step([batch], grad_clip=1.0))
    assert loss < first - 1.0 and math.isfinite(norm) and state.step_count == 16


def test_grad_accumulation_equals_one_big_batch():
    data = torch.randint(0, 64, (8, 17))
    big, small = state_for(tiny()), state_for(tiny())
    loss_big, norm_big = map(float, big.step([rows_to_batch(data, None, 16)], grad_clip=0))
    halves = [rows_to_batch(data[:4], None, 16), rows_to_batch(data[4:], None, 16)]
    loss_small, norm_small = map(float, small.step(halves, grad_clip=0))
    assert loss_small == pytest.approx(loss_big, rel=1e-5)
    assert norm_small == pytest.approx(norm_big, rel=1e-4)
    for a, b in zip(big.raw.parameters(), small.raw.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # Adam amplifies ~0 grads


def test_clipping_bounds_the_update_norm():
    state = state_for(tiny(), lr=1.0)
    data = torch.randint(0, 64, (4, 17))
    _, norm = state.step([rows_to_batch(data, None, 16)], grad_clip=1e-3)
    assert float(norm) > 1e-3  # the reported norm is the one before clipping


def test_state_round_trips_through_weights_only_load():
    model = tiny()
    state = state_for(model)
    data = torch.randint(0, 64, (4, 17))
    for _ in range(3):
        state.step([rows_to_batch(data, None, 16)], grad_clip=1.0)
    buf = io.BytesIO()
    torch.save({**state.state_dict(), "run_id": "abc", "epoch": 1}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    copy = tiny()
    copy.load_state_dict(model.state_dict())
    other = state_for(copy)
    other.load_state_dict(loaded)
    assert other.step_count == 3 and other.lr == pytest.approx(state.lr)
    a, _ = state.step([rows_to_batch(data, None, 16)], grad_clip=1.0)
    b, _ = other.step([rows_to_batch(data, None, 16)], grad_clip=1.0)
    assert float(a) == pytest.approx(float(b), rel=1e-5)  # float32: the dtype's bound
    for p, q in zip(state.raw.parameters(), other.raw.parameters()):
        torch.testing.assert_close(p, q)


def test_amp_on_cpu_uses_bf16_without_a_scaler():
    state = state_for(tiny(), use_amp=True)
    assert state.dtype == torch.bfloat16 and not state.scaler.is_enabled()
    loss, _ = state.step([rows_to_batch(torch.randint(0, 64, (2, 17)), None, 16)], 1.0)
    assert math.isfinite(loss) and loss.dtype == torch.float32 and loss.dim() == 0


def test_evaluate_sums_nats_over_real_targets_only():
    model = tiny().eval()
    rows = torch.randint(0, 64, (3, 17))
    lengths = torch.tensor([17, 17, 9])
    inputs, targets = rows_to_batch(rows, lengths, 16)
    nats, count = evaluate(model, [(inputs, targets)], torch.device("cpu"))
    assert count == 16 + 16 + 8
    logits = model(inputs)
    direct = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), targets.reshape(-1),
                                               ignore_index=IGNORE, reduction="sum")
    assert nats == pytest.approx(direct.item(), rel=1e-5)


def test_bits_per_byte():
    # ln 2 nats per token, one token per byte -> exactly 1 bit per byte
    assert bits_per_byte(math.log(2), tokens=100, nbytes=100) == pytest.approx(1.0)
    assert bits_per_byte(math.log(2), tokens=100, nbytes=400) == pytest.approx(0.25)


def test_min_lr_defaults_to_a_tenth_of_the_peak_at_the_schedule():
    lrs = {}
    for min_lr in (None, 1e-3):
        state = state_for(tiny(), min_lr=min_lr, warmup_steps=0, total_steps=4)
        for _ in range(4):
            state.scheduler.step()
        lrs[min_lr] = state.lr
    assert lrs[None] == pytest.approx(1e-3) == lrs[1e-3]  # lr 1e-2 / 10


def test_a_compile_that_fails_falls_back_to_eager_with_one_warning(capsys):
    """A backend that cannot compile (as inductor without a C compiler, or a graph break it
    cannot take) costs one warning line, never the run: the same loss as eager, step after
    step. The first step is timed and picks the loss."""
    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here")

    data = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    eager = state_for(tiny())
    failing = state_for(tiny(), wrap=lambda m: torch.compile(m, backend=broken))
    for _ in range(2):
        a, _ = eager.step([rows_to_batch(data, None, 16)], grad_clip=1.0)
        b, _ = failing.step([rows_to_batch(data, None, 16)], grad_clip=1.0)
        assert float(b) == float(a)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "warning: torch.compile failed at the first step (BackendCompilerFailed") \
        and "no compiler here" in err and err.endswith("training eagerly instead.\n")
    assert type(failing.model) is GPT2 and failing.compile_error.startswith("BackendCompiler")
    assert failing.first_step_s > 0 and failing.raw.loss_impl == eager.raw.loss_impl == "torch"


def test_an_error_outside_compilation_is_raised():
    state = state_for(tiny())
    with pytest.raises(IndexError):  # token 99 is not in a 64-token vocabulary
        state.step([rows_to_batch(torch.full((2, 17), 99), None, 16)], grad_clip=1.0)
