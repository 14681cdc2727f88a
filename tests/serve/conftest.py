"""One Serve instance for every test under tests/serve: a tiny random GPT-2, on a free port."""

import socket
import time

import httpx
import pytest
import torch

from gpt2core import GPT2, GPT2Config, Tokenizer

TEXTS = ["ROMEO: What light through yonder window breaks?",
         "JULIET: O Romeo, Romeo, wherefore art thou Romeo?",
         "The quick brown fox jumps over the lazy dog.",
         "naïve café 你好 🙂 and a little more plain text for the merges"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="package")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)  # the same random model every run
    tok = Tokenizer.train(TEXTS, vocab_size=300)
    d = tmp_path_factory.mktemp("serve") / "tiny-gpt2"
    config = GPT2Config(vocab_size=tok.vocab_size, n_positions=128, n_embd=32, n_layer=2,
                        n_head=2)
    GPT2(config).save_pretrained(d, tokenizer=tok)
    return d


@pytest.fixture(scope="package")
def server(ray_local, model_dir):
    """Base URL of the app (route /), and of a tight one at /tight that is easily over capacity
    (and decodes with int8 weights: --dtype int8)."""
    from ray import serve

    from serve.app import AppArgs, app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # half a CPU each: both apps fit the 2-CPU test cluster beside Serve's own actors
    serve.run(app(AppArgs(model_dir=str(model_dir), num_cpus=0.5)), name="default",
              route_prefix="/", blocking=False)
    serve.run(app(AppArgs(model_dir=str(model_dir), num_cpus=0.5, max_batch_size=1,
                          max_ongoing_requests=1, max_queued_requests=1, dtype="int8")),
              name="tight", route_prefix="/tight", blocking=False)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if all(httpx.get(f"{url}{p}/healthz", timeout=5).status_code == 200
                   for p in ("", "/tight")):
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    else:
        pytest.fail("Serve did not answer /healthz within 60 s")
    yield url
    serve.shutdown()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c
