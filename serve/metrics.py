"""The replica's metrics (Ray Serve custom metrics, on Ray's Prometheus endpoint) and its
per-request log line.

Ray exports them with a `ray_` prefix and the deployment, replica and application as tags, e.g.
`ray_gpt2_requests_total{status="200",route="/v1/completions",...}`. A replica is one process,
so one `Metrics` per process: `metrics()` makes it on first use, inside the replica (never at
import, where Ray may not be running).
"""

from __future__ import annotations

import logging
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("ray.serve")  # Serve's replica log (and the driver's console)

# seconds: from a fast tiny model on a GPU to a long prompt on a busy CPU
LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


class Metrics:
    """Counters, histograms and gauges of one replica."""

    def __init__(self):
        from ray.serve import metrics

        self.requests = metrics.Counter(
            "gpt2_requests", "HTTP requests answered, by route and status code",
            tag_keys=("route", "status"))
        self.prompt_tokens = metrics.Counter("gpt2_prompt_tokens", "prompt tokens read")
        self.generated_tokens = metrics.Counter("gpt2_generated_tokens", "tokens generated")
        self.ttft = metrics.Histogram(
            "gpt2_time_to_first_token_s", "seconds from a request's arrival to its first token",
            boundaries=LATENCY_S)
        self.tpot = metrics.Histogram(
            "gpt2_time_per_output_token_s",
            "seconds per generated token after the first, per request", boundaries=LATENCY_S)
        self.running = metrics.Gauge("gpt2_running_rows", "rows in the decode batch now")
        self.waiting = metrics.Gauge("gpt2_waiting_jobs", "jobs waiting for a free row")

    def on_step(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)

    def tokens(self, first_s: float | None, total_s: float, prompt: int, generated: int) -> None:
        """One finished request: its token counts and timings since arrival (seconds)."""
        self.prompt_tokens.inc(prompt)
        if generated:
            self.generated_tokens.inc(generated)
        if first_s is not None:
            self.ttft.observe(first_s)
            if generated > 1:
                self.tpot.observe((total_s - first_s) / (generated - 1))


_METRICS: Metrics | None = None


def metrics() -> Metrics:
    """This process's Metrics."""
    global _METRICS
    if _METRICS is None:
        _METRICS = Metrics()
    return _METRICS


class RequestLog:
    """ASGI middleware: counts every response by route and status (validation errors and
    413s included, which never reach a handler) and logs one line per request with its id,
    tokens and latency. Handlers leave the id and token counts in `request.state`."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), 500  # 500 if the app fails before it answers
        state = scope.setdefault("state", {})

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope["path"][len(scope.get("root_path", "")):] or "/"
            route = route if route in ROUTES else "other"  # bounded tag values
            metrics().requests.inc(tags={"route": route, "status": str(status)})
            if route.startswith(("/v1/completions", "/generate")):
                prompt, generated = state.get("tokens", (0, 0))
                logger.info("request %s %s %d prompt_tokens=%d completion_tokens=%d "
                            "latency=%.3fs", state.get("request_id", uuid.uuid4().hex[:12]),
                            route, status, prompt, generated, time.monotonic() - start)


ROUTES = {"/", "/v1/completions", "/v1/models", "/generate", "/healthz", "/docs",
          "/openapi.json"}
