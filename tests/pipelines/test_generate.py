"""pipelines/generate.py: an interactive session driven through a pseudo-terminal, --prompt output
that is only the continuation and repeatable under --seed, whole characters, bad input."""

import signal
import sys
from pathlib import Path

import pexpect
import pytest
import torch

from gpt2core import GPT2, GPT2Config, Tokenizer, generate
from pipelines import generate as gen
from pipelines.text.encoding import byte_decoder

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["ROMEO: What light through yonder window breaks?",
         "JULIET: O Romeo, Romeo, wherefore art thou Romeo?",
         "naïve café 你好 🙂 and a little more plain text for the merges"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok) -> Path:
    """A tiny model with a long context that never ends a text: every position gives the same
    distribution (ln_f's gain is 0, so its output is its bias u) and eos scores -50 against u.
    Generations then run to --seq_len, long enough to interrupt."""
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=tok.vocab_size, n_positions=4096, n_embd=16, n_layer=1,
                            n_head=2))
    with torch.no_grad():
        u = torch.randn(16)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(u)
        model.lm_head.weight.mul_(3.0)  # a peakier distribution: fewer, likelier tokens
        model.lm_head.weight[tok.eos_id] = -50 * u / u.dot(u)
    d = tmp_path_factory.mktemp("generate") / "model"
    model.save_pretrained(d, tok)
    return d


def spawn(model_dir: Path, *args: str) -> pexpect.spawn:
    """The CLI on a pseudo-terminal, as a shell runs a foreground job: SIGINT at its default,
    even when these tests run in a background job (which ignores it, and the child inherits)."""
    return pexpect.spawn(sys.executable, ["pipelines/generate.py", "--model_path",
                                          str(model_dir), "--seed", "0", *args],
                         cwd=str(ROOT), encoding="utf-8", timeout=90, dimensions=(24, 200),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_interactive_session_answers_and_exits(model_dir):
    child = spawn(model_dir, "--seq_len", "24")
    child.expect_exact(gen.PROMPT)
    child.sendline("ROMEO:")
    child.expect_exact("ROMEO:\r\n")  # the terminal's echo of the line typed
    child.expect_exact("ROMEO:")  # the prompt again, then its continuation
    child.expect_exact(gen.PROMPT)  # 24 tokens later: done, and a new prompt
    assert len(child.before.strip()) > 0
    child.sendline("exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_a_generation_and_ctrl_d_leaves(model_dir):
    child = spawn(model_dir, "--max_tokens", "4000")  # seconds of output
    child.expect_exact(gen.PROMPT)
    child.sendline("JULIET:")
    child.expect_exact("JULIET:\r\n")
    child.expect_exact("JULIET:")
    child.expect(r"\S{5}")  # tokens are coming
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(gen.PROMPT)
    child.sendintr()  # at the prompt: just a fresh prompt
    child.expect_exact(gen.PROMPT)
    child.sendline("again")
    child.expect_exact("again\r\n")
    child.expect(r"\S{5}")
    child.sendintr()
    child.expect_exact(gen.PROMPT)
    child.sendeof()  # Ctrl-D
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and child.signalstatus is None


def test_prompt_prints_only_the_continuation_and_is_seeded(model_dir, tok, capsys):
    def run(seed: int) -> str:
        code = gen.main(["--model_path", str(model_dir), "--prompt", "ROMEO:", "--seed",
                         str(seed), "--seq_len", "40"])
        out = capsys.readouterr().out
        assert code == 0
        return out

    first = run(1)
    assert run(1) == first and run(2) != first
    model = GPT2.from_pretrained(model_dir)
    prompt = tok.encode("ROMEO:")
    ids = generate(model, prompt, 40 - len(prompt), top_p=0.85, eos_id=tok.eos_id, seed=1)
    assert first == tok.decode(ids) + "\n"


def test_without_a_length_it_stops_after_the_default_max_tokens(model_dir, tok, capsys):
    assert gen.GenerateConfig.max_tokens == 256  # what --help states
    assert gen.main(["--model_path", str(model_dir), "--prompt", "ROMEO:", "--seed", "3"]) == 0
    model = GPT2.from_pretrained(model_dir)  # n_positions 4096: the old default ran to 4096
    ids = generate(model, tok.encode("ROMEO:"), 256, top_p=0.85, eos_id=tok.eos_id, seed=3)
    assert capsys.readouterr().out == tok.decode(ids) + "\n" and len(ids) == 256


@pytest.mark.slow
def test_compile_gives_the_eager_text_and_is_off_by_default_on_a_cpu(model_dir, capsys,
                                                                      monkeypatch):
    import gpt2core.generation

    compiled = []
    real = gpt2core.generation.Engine

    def engine(*args, compile=False, **kwargs):
        compiled.append(compile)
        return real(*args, compile=compile, **kwargs)

    monkeypatch.setattr(gpt2core.generation, "Engine", engine)
    texts = []
    for flags in ([], ["--compile"]):
        assert gen.main(["--model_path", str(model_dir), "--prompt", "ROMEO:", "--seed", "1",
                         "--nucleus_prob", "1", "--max_tokens", "24", *flags]) == 0
        texts.append(capsys.readouterr().out)
    assert compiled == [False, True]
    assert texts[0] == texts[1] and len(texts[0]) > 10


def test_a_model_dir_on_s3_generates_what_the_local_one_does(model_dir, bucket, capsys):
    from gpt2core import storage

    storage.upload(model_dir, f"{bucket}/model")
    texts = []
    for path in (str(model_dir), f"{bucket}/model"):
        assert gen.main(["--model_path", path, "--prompt", "ROMEO:", "--seed", "3",
                         "--seq_len", "30"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()


def test_multibyte_characters_print_whole(tok, monkeypatch):
    """'你' is three bytes, one token each: nothing prints until all three have come."""
    import gpt2core

    to_id = {b: tok.backend.token_to_id(c) for c, b in byte_decoder().items()}
    tokens = [to_id[b] for b in "a你b".encode()]
    monkeypatch.setattr(gpt2core, "stream", lambda *a, **k: iter(tokens))

    class Out:
        parts: list[str] = []

        def write(self, s: str) -> None:
            self.parts.append(s)

        def flush(self) -> None:
            pass

    out = Out()
    cfg = gen.GenerateConfig(model_path="unused")
    text = gen.generate_text(None, tok, "x", cfg, limit=100, seed=0, out=out)
    assert text == "a你b" and "".join(out.parts) == "a你b"
    assert "\ufffd" not in "".join(out.parts) and "你" in out.parts


def test_a_long_continuation_decodes_a_few_tokens_per_token(tok, monkeypatch, capsys, tools):
    """Printing token by token does not decode the whole continuation each time (the host work
    per token on a GPU would grow with its length)."""
    import gpt2core

    tokens = tok.encode("ROMEO: What light through yonder window breaks? 你好 " * 30)
    monkeypatch.setattr(gpt2core, "stream", lambda *a, **k: iter(tokens))
    counting = tools.CountingTokenizer(tok)
    cfg = gen.GenerateConfig(model_path="unused")
    text = gen.generate_text(None, counting, "x", cfg, limit=10_000, seed=0, out=sys.stdout)
    assert len(tokens) > 300 and text == tok.decode(tokens) == capsys.readouterr().out
    assert max(counting.lengths) <= 6


def test_dtype_int8_generates_what_an_int8_gpt2core_model_does(model_dir, tok, capsys):
    assert gen.main(["--model_path", str(model_dir), "--prompt", "ROMEO:", "--seed", "4",
                     "--seq_len", "30", "--dtype", "int8"]) == 0
    out = capsys.readouterr().out
    model = GPT2.from_pretrained(model_dir, dtype="int8")
    prompt = tok.encode("ROMEO:")
    ids = generate(model, prompt, 30 - len(prompt), top_p=0.85, eos_id=tok.eos_id, seed=4)
    assert out == tok.decode(ids, partial=True) + "\n"


def test_bad_inputs_end_in_one_sentence(model_dir, tmp_path, refused):
    assert "does not exist" in refused(gen.main, "--model_path", tmp_path / "nope", "--prompt", "x")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("[1, 2")
    assert "corrupt" in refused(gen.main, "--model_path", corrupt, "--prompt", "x")
    other = Tokenizer.train(["something else entirely " * 20], vocab_size=290)
    other.save(tmp_path / "other_vocab")
    assert "is not the vocabulary of the model" in refused(
        gen.main, "--model_path", model_dir, "--vocab_path", tmp_path / "other_vocab")
    assert "exceeds the model's context" in refused(gen.main, "--model_path", model_dir,
                                                    "--seq_len", 5000)
    assert "leaves no room" in refused(gen.main, "--model_path", model_dir, "--seq_len", 3,
                                       "--prompt", "ROMEO: What light")
    assert "--nucleus_prob" in refused(gen.main, "--model_path", model_dir, "--nucleus_prob", 0)
    assert "--dtype is one of" in refused(gen.main, "--model_path", model_dir, "--dtype", "fp8")
    if not torch.cuda.is_available():
        assert "no CUDA device" in refused(gen.main, "--model_path", model_dir, "--use_gpu")


@pytest.mark.gpu
def test_use_gpu_gives_the_cpu_greedy_text(model_dir, capsys):
    def run(*flags: str) -> str:
        assert gen.main(["--model_path", str(model_dir), "--prompt", "ROMEO:", "--seq_len", "40",
                         "--temperature", "0", *flags]) == 0
        return capsys.readouterr().out

    assert run("--use_gpu") == run()
