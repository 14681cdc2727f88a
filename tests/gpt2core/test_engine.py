"""The decode engine: counter-based uniforms, a static cache with explicit positions, the same
tokens as a full forward pass, seeded rows independent of their batch, a step whose dispatched
ops do not grow with the batch and read nothing on the host, and a compiled step that gives
the eager step's tokens."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gpt2core import GPT2, GPT2Config, generate
from gpt2core.engine import Engine, Sampling, uniform

MASK64 = (1 << 64) - 1


def splitmix64(z: int) -> int:
    """The reference finalizer, on Python's unbounded ints."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & MASK64
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & MASK64
    return z ^ (z >> 31)


def reference_uniform(seed: int, counter: int) -> float:
    key = splitmix64(seed * 0x9E3779B97F4A7C15 & MASK64)
    return (splitmix64((key + (counter + 1) * 0x9E3779B97F4A7C15) & MASK64) >> 40) / 2**24


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT2(GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=300,
                           n_positions=64)).eval()


def test_uniform_is_splitmix64_of_seed_and_counter_exactly():
    seeds = [0, 1, 7, 2**40 + 3, 2**62 - 1]
    counters = [0, 1, 2, 1000, 2**31]
    got = uniform(torch.tensor(seeds).repeat_interleave(5), torch.tensor(counters * 5))
    want = [reference_uniform(s, c) for s in seeds for c in counters]
    assert got.tolist() == want  # exact: integer arithmetic, 24-bit floats
    assert all(0 <= u < 1 for u in want) and len(set(want)) == len(want)
    # a row's draw does not depend on its neighbours, nor seeds s and s + 1 on each other
    assert uniform(torch.tensor([7]), torch.tensor([2])).item() == want[2 * 5 + 2]
    assert reference_uniform(1, 0) != reference_uniform(0, 1)


def full_forward_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding without any cache: the whole sequence through the model each token."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_prompts_of_mixed_lengths_equal_a_full_forward_pass(model):
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [1]]
    engine = Engine(model, 3, 20)
    steps = [engine.admit(range(3), prompts, Sampling.of(3, "cpu", temperature=0.0))[0]]
    for _ in range(9):
        steps.append(engine.step(3)[0])
    rows = torch.stack(steps, dim=1).tolist()
    assert rows == [full_forward_greedy(model, p, 10) for p in prompts]


def test_slots_joining_late_and_reused_give_a_full_forward_passs_logits(model):
    """Rows admitted between steps, a slot reused by a shorter prompt over a longer one's
    stale keys: every step's raw logits equal a plain forward pass of the row's sequence."""
    engine = Engine(model, 2, 24)
    greedy = Sampling.of(1, "cpu", temperature=0.0)
    a, b, c = [5, 6, 7, 8, 9, 10], [11, 12], [13]

    def check(rows: dict[int, list[int]], ids, logits) -> None:
        for slot, seq in rows.items():
            seq.append(int(ids[slot]))
            full = model(torch.tensor([seq[:-1]]))[0, -1]
            assert torch.allclose(logits[slot], full, atol=1e-4), slot

    ids, logits, _ = engine.admit([0], [a], greedy)
    check({0: a}, torch.stack([ids[0]]), logits)
    for _ in range(2):
        check({0: a}, *engine.step(1))
    ids, logits, _ = engine.admit([1], [b], greedy)
    check({0: b}, ids, logits)
    for _ in range(3):
        check({0: a, 1: b}, *engine.step(2))
    ids, logits, _ = engine.admit([0], [c], greedy)  # over a's 11 cached positions
    check({0: c}, ids, logits)
    for _ in range(3):
        check({0: c, 1: b}, *engine.step(2))


def test_eager_steps_attend_to_the_longest_live_slot_only(model):
    engine = Engine(model, 2, 40)
    greedy = Sampling.of(2, "cpu", temperature=0.0)
    engine.admit([0, 1], [list(range(1, 21)), [1, 2]], greedy)
    engine.step(2)
    assert engine.cache.span == 21  # slot 0: 20 cached, its 21st written now
    engine.release(0)  # slot 0's row finished; slot 1 goes on inside [0, 2)
    engine.step(2)
    assert engine.cache.span == 4  # slot 1 alone: 2 + 1 cached, its 4th written now


def test_penalties_and_bias_follow_openais_formula_on_the_device(model):
    engine = Engine(model, 1, 24)
    params = Sampling.of(1, "cpu", temperature=0.0, presence=0.5, frequency=2.0)
    ids, raw, _ = engine.admit([0], [[1, 2]], params, bias=[[(7, 3.0)]])
    first = raw[0].clone()
    first[7] += 3.0
    assert int(ids[0]) == int(first.argmax())  # the bias, before any token was sampled
    ids2, raw2 = engine.step(1)
    counts = torch.zeros_like(raw2[0])
    counts[int(ids[0])] = 1
    want = raw2[0] - 2.0 * counts - 0.5 * (counts > 0)
    want[7] += 3.0
    assert int(ids2[0]) == int(want.argmax())


def test_a_seeded_row_is_the_same_alone_or_in_any_batch(model):
    alone = generate(model, [3, 4, 5], 12, temperature=0.9, top_p=0.8, seed=[11])
    batch = generate(model, torch.tensor([[0, 0, 3, 4, 5], [9, 8, 7, 6, 5], [0, 0, 0, 0, 2]]),
                     12, temperature=[0.9, 1.3, 0.0], top_p=[0.8, 1.0, 1.0], seed=[11, 5, 1],
                     attention_mask=torch.tensor([[0, 0, 1, 1, 1], [1] * 5, [0, 0, 0, 0, 1]]))
    assert batch[0] == alone
    assert generate(model, [3, 4, 5], 12, temperature=0.9, top_p=0.8, seed=[12]) != alone


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched, and the host reads among them."""

    SYNCS = ("_local_scalar_dense", "item", "is_nonzero", "equal")
    VIEWS = {"view", "_unsafe_view", "transpose", "unsqueeze", "squeeze", "select", "slice",
             "expand", "as_strided", "t", "alias", "permute", "detach", "split"}  # no kernel

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))

    @property
    def kernels(self) -> Counter:
        return Counter({k: n for k, n in self.ops.items() if k not in self.VIEWS})

    @property
    def syncs(self) -> int:
        return sum(self.ops[name] for name in self.SYNCS)


def step_ops(model, rows: int) -> OpCounter:
    """The ops of one decoding step over `rows` rows with per-row sampling parameters, as on a
    GPU (no CPU shortcuts)."""
    engine = Engine(model, rows, 16, shortcut=False)
    params = Sampling.of(rows, "cpu", temperature=[0.0, 0.8] * (rows // 2) or 0.8,
                         top_p=0.9, top_k=[0, 5] * (rows // 2) or 5, seed=3)
    engine.admit(range(rows), [[1, 2, 3]] * rows, params)
    engine.step(rows)
    with OpCounter() as counter:
        engine.step(rows)
    return counter


def test_a_step_dispatches_the_same_ops_for_1_or_16_rows_and_reads_nothing_on_the_host(model):
    one, sixteen = step_ops(model, 1), step_ops(model, 16)
    # nothing per row: no loop over rows, no generator per row, no list made into a tensor
    assert one.kernels == sixteen.kernels
    assert one.syncs == 0, one.ops  # the caller's .tolist() of the ids is the step's one sync
    assert sum(one.kernels.values()) < 30 * model.config.n_layer + 80  # a handful per layer


@pytest.mark.slow
def test_the_compiled_step_gives_the_eager_steps_tokens(model):
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    params = Sampling.of(2, "cpu", temperature=[0.0, 1.0], top_p=0.9, seed=5,
                         frequency=[0.0, 1.5])  # and a penalty and a bias on the device
    runs = []
    for compile in (False, True):
        engine = Engine(model, 2, 16, compile=compile, shortcut=False)
        ids = [engine.admit(range(2), prompts, params, bias=[[(3, 2.0)], []])[0]]
        for _ in range(8):
            ids.append(engine.step(2)[0])
        runs.append(torch.stack(ids, dim=1).tolist())
    assert runs[0] == runs[1]


def test_a_compiled_step_refuses_to_step_a_live_row_past_n(model):
    engine = Engine(model, 4, 16, compile=True)  # sizes 1, 2, 4: a step of 3 runs 4
    assert engine.sizes == [1, 2, 4] and Engine(model, 10, 16).sizes == [1, 2, 4, 8, 10]
    engine.admit([0, 3], [[1], [2]], Sampling.of(2, "cpu", temperature=0.0))
    with pytest.raises(ValueError, match=r"slots \[3, 4\) hold rows"):
        engine.step(3)


@pytest.mark.slow
def test_a_compiled_engine_compiles_before_its_first_row_and_never_again(model):
    """warm_up compiles every size, in two graphs (one row; the batch dynamic beyond); rows
    then join and leave at every count, a penalty and a bias among them, with the eager
    engine's tokens and no compile more; an engine of other shapes in the same process too."""
    from torch._dynamo.utils import counters

    engines = [Engine(model, 10, 24, compile=compile, shortcut=False) for compile in (0, 1)]
    before = counters["stats"]["unique_graphs"]
    assert engines[1].warm_up() > 0 and engines[0].warm_up() == 0
    graphs = counters["stats"]["unique_graphs"]
    assert graphs - before <= 2  # for sizes 1, 2, 4, 8 and 10
    runs = []
    for engine in engines:
        tokens = {}
        for slot in range(10):  # one row more each step: the step runs at 1, 2, ..., 10 rows
            params = Sampling.of(1, "cpu", temperature=0.0 if slot % 3 else 0.9, seed=slot,
                                 frequency=1.5 if slot == 4 else 0.0)
            ids, _, _ = engine.admit([slot], [[slot + 1, 7]], params,
                                     bias=[[(5, 4.0)] if slot == 6 else []])
            tokens[slot] = [int(ids[0])]
            for i, t in enumerate(engine.step(slot + 1)[0].tolist()):
                tokens[i].append(t)
        for slot in range(9, 0, -1):  # and one row fewer
            engine.release(slot)
            for i, t in enumerate(engine.step(slot)[0].tolist()):
                tokens[i].append(t)
        runs.append(tokens)
    assert runs[0] == runs[1]
    assert counters["stats"]["unique_graphs"] == graphs
    other = Engine(model, 6, 40, compile=True)
    other.warm_up()
    other.admit([0], [[3, 4]], Sampling.of(1, "cpu", temperature=0.0))
    assert other.step(5)[0].shape == (5,)
