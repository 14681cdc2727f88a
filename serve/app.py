"""The Ray Serve application: GPT-2 over an OpenAI-compatible HTTP API.

    serve run serve.app:app model_dir=PATH                 # foreground, http://127.0.0.1:8000
    serve deploy serve/config.yaml                         # onto a running Ray cluster
    gpt2 serve --model_path PATH [--host --port --num_replicas]

Endpoints: POST /v1/completions (OpenAI's completions: logprobs, echo, best_of, penalties,
logit_bias; `stream: true` for Server-Sent Events), GET /v1/models[/{model}], POST /generate
(plain JSON), GET /healthz, GET / (playground page), GET /docs (Swagger UI, served from the
swagger-ui-bundle package, so it works offline) and /openapi.json, which declares every body.

One deployment, `GPT2Server`, loads the model dir in its constructor. Requests are validated
by FastAPI against serve/openai.py's models and become `Generation`s (one per prompt x
best_of); a replica decodes them together with continuous batching (serve/scheduler.py,
serve/batching.py). Over capacity Serve answers 503 with Retry-After. Every error is OpenAI's
error JSON, {"error": {"message", "type", "param", "code"}}; one after a stream has started is
an SSE `data: {"error": ...}` event followed by `data: [DONE]`.
"""

import asyncio
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import Request
from fastapi.responses import FileResponse, StreamingResponse
from ray import serve
from ray.serve import Application

from gpt2core import storage
from gpt2core.errors import UserError
from gpt2core.quant import inference_dtype
from serve import completions as cmpl
from serve.args import AppArgs
from serve.batching import Generation
from serve.http import BodyLimit, api, sse_events
from serve.metrics import logger, metrics
from serve.openai import (
    ERRORS,
    SEED_MAX,
    APIError,
    CompletionRequest,
    CompletionResponse,
    GenerateRequest,
    GenerateResponse,
    ModelCard,
    ModelList,
)
from serve.scheduler import Scheduler

__all__ = ["AppArgs", "app"]
STATIC = Path(__file__).resolve().parent / "static"
MAX_JOBS = 128  # prompts x best_of in one request: beyond it, a 400 rather than a long queue


# --- Deployment ----------------------------------------------------------------------------------

@serve.deployment(
    backpressure_config={"status_code": 503, "retry_after_s": 1},
)
@serve.ingress(api)
class GPT2Server:
    """One replica: the model, its tokenizer, and the batched decoder."""

    def __init__(self, args: AppArgs, model_dir: str, model_name: str):
        import ray
        import torch

        from gpt2core import GPT2, Tokenizer
        from gpt2core.precision import for_inference
        from serve.batching import Decoder

        # Ray sets OMP_NUM_THREADS to the replica's num_cpus (1 when fractional); torch's own
        # pool is set to the same share on purpose, so replicas on one node do not oversubscribe.
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        self.threads = max(1, int(cpus))
        torch.set_num_threads(self.threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.dtype:  # asked for: gpt2core/quant.py's float32, bfloat16, int8 or auto
            self.model = GPT2.from_pretrained(model_dir, device=device, dtype=args.dtype).eval()
        else:  # bf16 weights and KV cache on GPUs (fp16 before Ampere): gpt2core/precision.py
            self.model = for_inference(GPT2.from_pretrained(model_dir, device=device).eval())
        self.tokenizer = Tokenizer.from_pretrained(model_dir)
        self.args, self.model_name = args, model_name
        self.n_positions = self.model.config.n_positions
        self.max_tokens_cap = min(args.max_tokens_cap, self.n_positions - 1)
        BodyLimit.limit = args.body_limit
        self.metrics = metrics()
        compile = device == "cuda" if args.compile == "auto" else args.compile == "on"
        decoder = Decoder(self.model, self.tokenizer, args.max_batch_size, compile=compile)
        self.scheduler = Scheduler(decoder, args.batch_wait_timeout_s, self.metrics.on_step)
        if compile:  # every batch size's graph now, not while the first requests wait
            seconds = self.scheduler.warm_up()
            logger.info("compiled the decode step for batch sizes %s in %.1f s",
                        decoder.engine.sizes, seconds)
        self.created = int(time.time())

    def __del__(self) -> None:
        """Serve deletes the replica: its decode thread stops after the step it is in."""
        if hasattr(self, "scheduler"):
            self.scheduler.close()

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy (replaced)."""
        self.scheduler.check(self.args.stuck_after_s)

    # --- decoding ---

    def _jobs(self, prompts: list[list[int]], max_tokens: int, n: int = 1,
              seed: int | None = None, **sampling) -> list[Generation]:
        """n Generations per prompt, checked against the context and the cap; the i-th gets
        seed + i."""
        if max_tokens > self.max_tokens_cap:
            raise APIError(400, f"max_tokens is {max_tokens}, over this server's cap of "
                           f"{self.max_tokens_cap}; ask for fewer", param="max_tokens")
        if len(prompts) * n > MAX_JOBS:
            raise APIError(400, f"{len(prompts)} prompts x {n} choices is over this server's "
                           f"limit of {MAX_JOBS} per request; split the request", param="prompt")
        base = secrets.randbits(62) if seed is None else seed
        jobs = []
        for i, ids in enumerate(prompts):
            if len(ids) + max_tokens > self.n_positions:
                where = "the prompt" if len(prompts) == 1 else f"prompt {i}"
                raise APIError(400, f"{where} is {len(ids)} tokens and max_tokens is "
                               f"{max_tokens}: {len(ids) + max_tokens} in all, over the model's "
                               f"context of {self.n_positions} tokens; shorten the prompt or "
                               "lower max_tokens", param="prompt", code="context_length_exceeded")
            jobs += [Generation(ids, max_tokens, seed=(base + len(jobs) + j) & SEED_MAX,
                                **sampling) for j in range(n)]
        return jobs

    async def _run(self, job: Generation, arrived: float) -> cmpl.Finished:
        """All of one job."""
        out = cmpl.Finished()
        text = []
        async for out.last in self.scheduler.run(job):
            if out.first_s is None:
                out.first_s = time.monotonic() - arrived
            text.append(out.last.text)
            out.logprobs += out.last.logprobs
        out.text = "".join(text)
        return out

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"model {model!r:.60} is not served here; this server has "
                           f"{self.model_name!r} (GET /v1/models)", param="model",
                           code="model_not_found")

    # --- endpoints ---

    @api.get("/", include_in_schema=False)
    async def playground(self) -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """Liveness; rows decoding and jobs waiting; rows per recent decode step; the steps
        and their rows in all, seconds in all steps and in the gaps between them while rows
        decode (a client takes the differences over its own window: bench/bench_serve.py's
        `steps`)."""
        self.check_health()
        s = self.scheduler
        sizes = list(s.batch_sizes)
        return {"status": "ok", "model": self.model_name, "pid": os.getpid(),
                "dtype": inference_dtype(self.model),
                "n_positions": self.n_positions,
                "max_tokens_cap": self.max_tokens_cap, "torch_threads": self.threads,
                "running": len(s.decoder.rows),
                "waiting": len(s.waiting),
                "batches": {"count": s.steps, "max_size": max(sizes, default=0),
                            "recent": sizes[-32:], "rows": s.stepped_rows,
                            "step_seconds": s.step_seconds,
                            "gaps": s.gaps, "gap_seconds": s.gap_seconds}}

    @api.get("/v1/models", response_model=ModelList)
    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, created=self.created)])

    @api.get("/v1/models/{model}", response_model=ModelCard, responses=ERRORS)
    async def model(self, model: str) -> ModelCard:
        self._check_model(model)
        return ModelCard(id=self.model_name, created=self.created)

    @api.post("/generate", response_model=GenerateResponse, responses=ERRORS)
    async def generate(self, body: GenerateRequest, request: Request) -> GenerateResponse:
        arrived = time.monotonic()
        ids = self.tokenizer.encode(body.prompt) or [self.tokenizer.eos_id]
        (job,) = self._jobs([ids], body.max_tokens, seed=body.seed,
                            temperature=body.temperature, top_p=body.top_p)
        done = await self._run(job, arrived)
        self._finished(request, uuid.uuid4().hex, arrived, len(ids), [done])
        return GenerateResponse(text=done.text, tokens=done.last.tokens,
                                finish_reason=done.last.finish_reason)

    @api.post("/v1/completions", response_model=CompletionResponse,
              responses={**ERRORS, 200: {"content": {"text/event-stream": {}},
                                         "description": "JSON, or SSE chunks when streaming"}})
    async def completions(self, body: CompletionRequest, request: Request):
        arrived = time.monotonic()
        self._check_model(body.model)
        if body.suffix is not None:
            raise APIError(400, "suffix is not supported: GPT-2 has no fill-in-the-middle; "
                           "leave suffix out", param="suffix")
        best_of = body.best_of or body.n
        if best_of < body.n:
            raise APIError(400, f"best_of ({best_of}) must be at least n ({body.n})",
                           param="best_of")
        if body.stream and best_of > body.n:
            raise APIError(400, "best_of > n cannot stream (the best are known only at the "
                           "end); leave out stream or best_of", param="best_of")
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens is 0; ask for at least 1 token, or set echo to "
                           "score the prompt alone", param="max_tokens")
        prompts = cmpl.prompts(self.tokenizer, body.prompt)
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        logprobs = body.logprobs if body.logprobs is not None else (
            0 if best_of > body.n else None)  # best_of ranks by the tokens' logprobs
        jobs = self._jobs(
            [p.ids for p in prompts], body.max_tokens, best_of, body.seed,
            temperature=body.temperature, top_p=body.top_p, stop=stop, logprobs=logprobs,
            prompt_logprobs=body.echo and body.logprobs is not None,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            logit_bias=cmpl.logit_bias(body.logit_bias, self.tokenizer.vocab_size))
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": self.model_name}
        prompt_tokens = sum(len(p.ids) for p in prompts)
        if body.stream:
            return StreamingResponse(
                sse_events(self._chunks(body, jobs, prompts, head, request, arrived)),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        results = await asyncio.gather(*(self._run(j, arrived) for j in jobs))
        choices = []
        for p, prompt in enumerate(prompts):
            group = results[p * best_of:(p + 1) * best_of]
            skip = len(prompt.ids) if jobs[0].prompt_logprobs else 0
            if best_of > body.n:  # the n likeliest, in the order they were sampled
                best = sorted(range(best_of), key=lambda i: -group[i].cumulative(skip))
                group = [group[i] for i in sorted(best[:body.n])]
            for done in group:
                choices.append(self._choice(len(choices), done, prompt, body))
        usage = self._finished(request, head["id"], arrived, prompt_tokens, results)
        return {**head, "choices": choices, "usage": usage}

    def _choice(self, index: int, done: cmpl.Finished, prompt: cmpl.PromptIds,
                body: CompletionRequest) -> dict:
        text = prompt.text + done.text if body.echo else done.text
        lp = None
        if body.logprobs is not None:
            offset = 0 if body.echo else len(prompt.text)
            lp = cmpl.LogprobsText(self.tokenizer, offset).render(done.logprobs)
        return {"text": text, "index": index, "logprobs": lp,
                "finish_reason": done.last.finish_reason}

    def _finished(self, request: Request, request_id: str, arrived: float, prompt_tokens: int,
                  results: list[cmpl.Finished]) -> dict:
        """Metrics and the log line's fields for a finished request; its usage."""
        generated = sum(r.last.tokens for r in results if r.last)
        first = min((r.first_s for r in results if r.first_s is not None), default=None)
        self.metrics.tokens(first, time.monotonic() - arrived, prompt_tokens, generated)
        request.state.request_id, request.state.tokens = request_id, (prompt_tokens, generated)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                "total_tokens": prompt_tokens + generated}

    async def _chunks(self, body: CompletionRequest, jobs: list[Generation], prompts: list,
                      head: dict, request: Request, arrived: float) -> AsyncIterator[dict]:
        """Chunks of every choice as they come, interleaved; then a usage chunk if asked."""
        queue: asyncio.Queue = asyncio.Queue()
        per_prompt = len(jobs) // len(prompts)
        results = [cmpl.Finished() for _ in jobs]
        texts = [None] * len(jobs)  # each choice's LogprobsText, made on its first delta

        async def pump(index: int, job: Generation) -> None:
            try:
                async for delta in self.scheduler.run(job):
                    await queue.put((index, delta))
            finally:
                await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i, j)) for i, j in enumerate(jobs)]
        open_jobs = len(jobs)
        try:
            while open_jobs:
                index, delta = await queue.get()
                if delta is None:
                    open_jobs -= 1
                    continue
                done, prompt = results[index], prompts[index // per_prompt]
                text = delta.text
                if done.last is None:  # the first delta of this choice
                    done.first_s = time.monotonic() - arrived
                    text = prompt.text + text if body.echo else text
                    texts[index] = cmpl.LogprobsText(
                        self.tokenizer, 0 if body.echo else len(prompt.text))
                done.last = delta
                if text or delta.finish_reason or (delta.logprobs and body.logprobs is not None):
                    lp = texts[index].render(delta.logprobs) if body.logprobs is not None \
                        else None
                    yield {**head, "choices": [{"text": text, "index": index, "logprobs": lp,
                                                "finish_reason": delta.finish_reason}]}
            for t in tasks:
                t.result()  # a decoding error surfaces here rather than passing silently
            usage = self._finished(request, head["id"], arrived,
                                   sum(len(p.ids) for p in prompts), results)
            if body.stream_options and body.stream_options.include_usage:
                yield {**head, "choices": [], "usage": usage}
        finally:
            for t in tasks:
                t.cancel()


# --- Application builder -------------------------------------------------------------------------

def served_name(model_dir: str) -> str:
    """The model's id: the dir's name, or its run's for a run's generic `model` dir."""
    parts = model_dir.rstrip("/").rsplit("/", 2)
    if parts[-1] in ("model", "best_model") and len(parts) > 1 and parts[-2]:
        return parts[-2]
    return parts[-1]


def app(args: AppArgs) -> Application:
    """Build the application; Serve validates `args` into AppArgs (typed builder)."""
    model_dir = storage.resolve(args.model_dir)  # a local dir or a URI each replica reads
    if not storage.is_file(storage.join(model_dir, "config.json")):
        raise UserError(f"model_dir {args.model_dir!r} has no config.json; point model_dir at a "
                        "model dir written by `gpt2 train` or save_pretrained")
    options: dict = {"max_ongoing_requests": args.ongoing_requests,
                     "max_queued_requests": args.max_queued_requests,
                     "ray_actor_options": {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus}}
    if args.num_replicas is not None:
        options["num_replicas"] = args.num_replicas
    return GPT2Server.options(**options).bind(args, model_dir,
                                              args.model_name or served_name(model_dir))
