"""The replica's custom metrics reach Ray's Prometheus endpoint (scraped here, as Prometheus
would), and each request leaves one log line."""

import re
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

EXPECTED = ["ray_gpt2_requests_total", "ray_gpt2_prompt_tokens_total",
            "ray_gpt2_generated_tokens_total", "ray_gpt2_time_to_first_token_s_bucket",
            "ray_gpt2_time_per_output_token_s_bucket", "ray_gpt2_running_rows",
            "ray_gpt2_waiting_jobs"]


def test_metrics_on_rays_prometheus_endpoint(client, ray_local):
    node = ray_local._private.worker.global_worker.node
    url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    ok = client.post("/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 5, "seed": 1})
    assert ok.status_code == 200
    assert client.post("/v1/completions", json={"prompt": "x", "top_p": 3}).status_code == 400
    text, deadline = "", time.time() + 90  # Ray exports every few seconds
    while time.time() < deadline:
        text = httpx.get(url, timeout=10).text
        if all(name in text for name in EXPECTED) and re.search(
                r'ray_gpt2_requests_total\{[^}]*route="/v1/completions"[^}]*status="400"', text):
            break
        time.sleep(2)
    missing = [name for name in EXPECTED if name not in text]
    assert not missing, f"not on {url}: {missing}"
    served = [float(v) for v in re.findall(
        r'ray_gpt2_requests_total\{[^}]*route="/v1/completions"[^}]*status="200"[^}]*\} (\S+)',
        text)]
    assert served and sum(served) >= 1
    # the replica's log (Serve's log files under the session dir) has the request's line
    logs = Path(node.get_logs_dir_path()) / "serve"
    line = next((ln for f in logs.glob("replica_*.log") for ln in f.read_text().splitlines()
                 if f"request {ok.json()['id']} " in ln), None)
    assert line and "prompt_tokens=" in line and "completion_tokens=" in line, line
    assert re.search(r"latency=\d+\.\d+s", line)
