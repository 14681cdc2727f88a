"""The Ray Serve application: GPT-2 nucleus sampling over an OpenAI-compatible HTTP API.

    serve run serve.app:app model_dir=PATH                 # foreground, http://127.0.0.1:8000
    serve deploy serve/config.yaml                         # onto a running Ray cluster
    gpt2 serve --model_path PATH [--host --port --num_replicas]

Endpoints: POST /v1/completions (OpenAI completions schema, `stream: true` for Server-Sent
Events), GET /v1/models, POST /generate (plain JSON), GET /healthz, GET / (playground page).

One deployment, `GPT2Server`, loads the model dir in its constructor. Requests are validated
here and become `Job`s (one per prompt x n); a replica decodes its jobs together with continuous
batching (serve/scheduler.py, serve/batching.py): a job joins the running batch at its next step
and leaves it when done, streaming included. Over capacity (`max_queued_requests`)
Serve answers 503 with Retry-After. Errors a client causes get a 4xx with OpenAI's error JSON:
{"error": {"message", "type", "param", "code"}}.
"""


import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve import Application

from gpt2core import storage
from serve.batching import Decoder, Delta, Job
from serve.scheduler import Scheduler

STATIC = Path(__file__).resolve().parent / "static"
MAX_BATCH_SIZE = 16  # rows decoded together at most
BATCH_WAIT_S = 0.02  # how long a request to an idle replica waits for company: ~1 decode step


# --- Request and response models ---------------------------------------------------------------

class _Strict(BaseModel):
    # strict: "5" is not an int, 1 is not a bool; unknown OpenAI fields (user, logprobs...) ignored
    model_config = ConfigDict(strict=True, extra="ignore")


class CompletionRequest(_Strict):
    """OpenAI's /v1/completions body (the fields this server acts on)."""

    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None


class GenerateRequest(_Strict):
    """/generate: one prompt, plain JSON; nucleus_prob is top_p by the original project's name."""

    prompt: str
    max_tokens: int = Field(64, ge=1)
    top_p: float = Field(0.9, gt=0, le=1, validation_alias=AliasChoices("nucleus_prob", "top_p"))
    temperature: float = Field(1.0, ge=0)
    seed: int | None = None


class GenerateResponse(BaseModel):
    text: str
    tokens: int  # completion tokens
    finish_reason: Literal["stop", "length"]


class APIError(Exception):
    """An error the client caused: becomes OpenAI's error JSON with this status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type)

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type,
                                       "param": self.param, "code": self.code}},
                            status_code=self.status)


app = FastAPI(title="gpt2-ray", description="GPT-2 nucleus sampling on Ray Serve")


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def read_json(request: Request, model: type[BaseModel], limit: int) -> BaseModel:
    """The body as `model`: 413 over `limit` bytes, 400 for bad JSON or wrong fields."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {declared} bytes, over this server's limit of "
                       f"{limit} bytes; send a shorter prompt", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body is over this server's limit of {limit} bytes; "
                           "send a shorter prompt", code="request_too_large")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON ({e}); send a JSON object",
                       code="invalid_json") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = str(err["loc"][0]) if err["loc"] else ""  # the top-level field
        got = "" if not param or isinstance(err["input"], dict) else f" (got {err['input']!r:.60})"
        message = f"{param or 'body'}: {err['msg']}{got}"
        raise APIError(400, message, param=param or None, code="invalid_value") from None


def sse(data: dict | str) -> bytes:
    """One Server-Sent Event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


# --- Deployment ----------------------------------------------------------------------------------

@serve.deployment(
    max_ongoing_requests=32,  # > max_batch_size: the next requests wait in the replica's queue
    max_queued_requests=64,  # beyond that Serve answers 503 at once instead of queueing forever
    backpressure_config={"status_code": 503, "retry_after_s": 1},
    ray_actor_options={"num_cpus": 1},
)
@serve.ingress(app)
class GPT2Server:
    """One replica: the model, its tokenizer, and the batched decoder."""

    def __init__(self, model_dir: str, model_name: str, max_tokens_cap: int = 256,
                 max_batch_size: int = MAX_BATCH_SIZE, batch_wait_timeout_s: float = BATCH_WAIT_S,
                 body_limit: int = 64 * 1024):
        import ray
        import torch

        from gpt2core import GPT2, Tokenizer

        # Ray sets OMP_NUM_THREADS to the replica's num_cpus (1 when fractional); torch's own
        # pool is set to the same share on purpose, so replicas on one node do not oversubscribe.
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        self.threads = max(1, int(cpus))
        torch.set_num_threads(self.threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = GPT2.from_pretrained(model_dir, device=device).eval()
        self.tokenizer = Tokenizer.from_pretrained(model_dir)
        self.model_name = model_name
        self.n_positions = self.model.config.n_positions
        self.max_tokens_cap = min(max_tokens_cap, self.n_positions - 1)
        self.body_limit = body_limit
        self.scheduler = Scheduler(Decoder(self.model, self.tokenizer, max_batch_size),
                                   batch_wait_timeout_s)
        self.created = int(time.time())

    # --- decoding ---

    def _jobs(self, prompts: list[str], max_tokens: int, temperature: float, top_p: float,
              seed: int | None, n: int = 1, stop: tuple[str, ...] = ()) -> list[Job]:
        """One Job per prompt x n, checked against the context and the cap. Choice i gets seed+i."""
        if max_tokens > self.max_tokens_cap:
            raise APIError(400, f"max_tokens is {max_tokens}, over this server's cap of "
                           f"{self.max_tokens_cap}; ask for fewer", param="max_tokens")
        base = secrets.randbits(62) if seed is None else seed
        jobs = []
        for i, prompt in enumerate(prompts):
            # an empty prompt starts from <|endoftext|>, as GPT-2 was trained to
            ids = self.tokenizer.encode(prompt) or [self.tokenizer.eos_id]
            if len(ids) + max_tokens > self.n_positions:
                where = "the prompt" if len(prompts) == 1 else f"prompt {i}"
                raise APIError(400, f"{where} is {len(ids)} tokens and max_tokens is "
                               f"{max_tokens}: {len(ids) + max_tokens} in all, over the model's "
                               f"context of {self.n_positions} tokens; shorten the prompt or "
                               "lower max_tokens", param="prompt", code="context_length_exceeded")
            jobs += [Job(ids, max_tokens, temperature, top_p, base + len(jobs) + j, stop)
                     for j in range(n)]
        return jobs

    async def _run(self, job: Job) -> tuple[str, Delta]:
        """All of one job's text and its last delta."""
        text = []
        last = None
        async for last in self.scheduler.run(job):
            text.append(last.text)
        return "".join(text), last

    # --- endpoints ---

    @app.get("/", include_in_schema=False)
    async def playground(self) -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness; rows decoding and jobs waiting; rows per recent decode step."""
        sizes = list(self.scheduler.batch_sizes)
        return {"status": "ok", "model": self.model_name, "n_positions": self.n_positions,
                "max_tokens_cap": self.max_tokens_cap, "torch_threads": self.threads,
                "running": len(self.scheduler.decoder.rows),
                "waiting": len(self.scheduler.waiting),
                "batches": {"count": self.scheduler.steps, "max_size": max(sizes, default=0),
                            "recent": sizes[-32:]}}

    @app.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model",
                                            "created": self.created, "owned_by": "gpt2-ray"}]}

    @app.post("/generate", response_model=GenerateResponse)
    async def generate(self, request: Request) -> GenerateResponse:
        req = await read_json(request, GenerateRequest, self.body_limit)
        (job,) = self._jobs([req.prompt], req.max_tokens, req.temperature, req.top_p, req.seed)
        text, last = await self._run(job)
        return GenerateResponse(text=text, tokens=last.tokens, finish_reason=last.finish_reason)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        req = await read_json(request, CompletionRequest, self.body_limit)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise APIError(400, "prompt is an empty list; give a string or a list of strings",
                           param="prompt")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if len(stop) > 4:
            raise APIError(400, f"stop has {len(stop)} strings; give at most 4", param="stop")
        jobs = self._jobs(prompts, req.max_tokens, req.temperature, req.top_p, req.seed,
                          req.n, stop)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": self.model_name}
        prompt_tokens = sum(len(j.prompt_ids) for j in jobs[::req.n])
        if req.stream:
            return StreamingResponse(self._sse(jobs, head, prompt_tokens),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        results = await asyncio.gather(*(self._run(j) for j in jobs))
        completion_tokens = sum(last.tokens for _, last in results)
        return {**head, "choices": [
            {"text": text, "index": i, "logprobs": None, "finish_reason": last.finish_reason}
            for i, (text, last) in enumerate(results)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}

    async def _sse(self, jobs: list[Job], head: dict, prompt_tokens: int) -> AsyncIterator[bytes]:
        """Chunks of every choice as they come, interleaved, then a usage chunk and [DONE]."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, job: Job) -> None:
            try:
                async for delta in self.scheduler.run(job):
                    await queue.put((index, delta))
            finally:
                await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i, j)) for i, j in enumerate(jobs)]
        completion_tokens, open_jobs = 0, len(jobs)
        try:
            while open_jobs:
                index, delta = await queue.get()
                if delta is None:
                    open_jobs -= 1
                    continue
                if delta.text or delta.finish_reason:
                    yield sse({**head, "choices": [{"text": delta.text, "index": index,
                                                    "logprobs": None,
                                                    "finish_reason": delta.finish_reason}]})
                if delta.finish_reason:
                    completion_tokens += delta.tokens
            for t in tasks:
                t.result()  # a decoding error surfaces here rather than passing silently
            yield sse({**head, "choices": [], "usage": {
                "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}})
            yield sse("[DONE]")
        finally:
            for t in tasks:
                t.cancel()


# --- Application builder -------------------------------------------------------------------------

class AppArgs(BaseModel):
    """Arguments of `serve run serve.app:app key=value ...` and of config.yaml's `args:`."""

    model_config = ConfigDict(extra="forbid")

    model_dir: str
    """A model dir (Hugging Face GPT-2 format): a URI (s3://, gs://), which each replica
    downloads itself, or a local path readable on every node that runs a replica."""
    model_name: str | None = None
    """The id /v1/models reports; the model dir's name by default."""
    num_replicas: int | None = None
    """Replicas; None keeps the deployment's setting (1, or config.yaml's)."""
    max_tokens_cap: int = 256
    """Largest max_tokens a request may ask for (also bounded by the model's context)."""
    max_batch_size: int = MAX_BATCH_SIZE
    """Rows decoded together at most; 1 turns batching off (the benchmark's baseline)."""
    batch_wait_timeout_s: float = BATCH_WAIT_S
    """How long a request to an idle replica waits for others (later ones join at any step)."""
    body_limit: int = 64 * 1024
    """Largest request body in bytes; bigger ones get 413."""
    num_cpus: float = 1
    """CPUs per replica; torch uses that many threads (1 when fractional)."""
    num_gpus: float = 0
    """GPUs per replica; 1 on GPU nodes (the replica then decodes on CUDA)."""
    max_ongoing_requests: int | None = None
    """Requests a replica holds at once; default max(32, 2 x max_batch_size)."""
    max_queued_requests: int | None = None
    """Requests waiting for a replica before Serve answers 503; None keeps 64."""


def app(args: AppArgs) -> Application:
    """Build the application; Serve validates `args` into AppArgs (typed builder)."""
    model_dir = storage.resolve(args.model_dir)  # a local dir or a URI each replica reads
    if not storage.is_file(storage.join(model_dir, "config.json")):
        raise ValueError(f"model_dir {args.model_dir!r} has no config.json; point model_dir at a "
                         "model dir written by `gpt2 train` or save_pretrained")
    options: dict = {"max_ongoing_requests": args.max_ongoing_requests
                     or max(32, 2 * args.max_batch_size)}
    if args.num_replicas is not None:
        options["num_replicas"] = args.num_replicas
    if args.max_queued_requests is not None:
        options["max_queued_requests"] = args.max_queued_requests
    options["ray_actor_options"] = {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus}
    name = args.model_name or model_dir.rstrip("/").rsplit("/", 1)[-1]
    return GPT2Server.options(**options).bind(
        model_dir, name, args.max_tokens_cap, args.max_batch_size,
        args.batch_wait_timeout_s, args.body_limit)
