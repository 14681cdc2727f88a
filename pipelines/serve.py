"""gpt2 serve: start the Ray Serve app (serve/app.py) on a model dir and keep it up until Ctrl-C.

    gpt2 serve --model_path runs/my-model                       # http://127.0.0.1:8000
    gpt2 serve --model_path runs/my-model --host 0.0.0.0 --port 8080 --num_replicas 2
    RAY_ADDRESS=auto gpt2 serve --model_path /shared/my-model    # onto a running cluster

The app is loaded by its import path, serve.app:app, so pipelines never import serve. The same
app runs with `serve run serve.app:app model_dir=PATH` or `serve deploy serve/config.yaml`.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import time
import typing

IMPORT_PATH = "serve.app:app"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpt2 serve", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, help="model dir to serve (HF GPT-2 format)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind; 0.0.0.0 to accept other machines (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--num_replicas", type=int, default=1, help="model replicas (default 1)")
    p.add_argument("--num_cpus", type=float, default=1,
                   help="CPUs per replica; torch uses that many threads (default 1)")
    p.add_argument("--gpus", type=float, default=0, help="GPUs per replica (default 0)")
    p.add_argument("--max_batch_size", type=int, default=16,
                   help="requests decoded together per replica; 1 turns batching off")
    p.add_argument("--max_tokens_cap", type=int, default=256,
                   help="largest max_tokens a request may ask for")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: RAY_ADDRESS, else a local cluster)")
    return p


def load_builder(import_path: str = IMPORT_PATH):
    """The application builder and its typed-args class, imported now by path."""
    module, attr = import_path.split(":")
    builder = getattr(importlib.import_module(module), attr)
    return builder, typing.get_type_hints(builder)["args"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from gpt2core import storage

    try:
        is_model = storage.is_file(storage.join(args.model_path, "config.json"))
    except storage.StorageError as e:
        print(f"gpt2 serve: {e}", file=sys.stderr)
        return 2
    if not is_model:
        print(f"gpt2 serve: {args.model_path} is not a model dir (no config.json); pass "
              "--model_path a dir written by `gpt2 train` or save_pretrained.", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    builder, args_cls = load_builder()
    app_args = args_cls(model_dir=storage.resolve(args.model_path),
                        num_replicas=args.num_replicas, num_cpus=args.num_cpus,
                        num_gpus=args.gpus, max_batch_size=args.max_batch_size,
                        max_tokens_cap=args.max_tokens_cap)
    ray.init(address=args.address, logging_level="warning")
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(builder(app_args), name="gpt2", route_prefix="/", blocking=False)
    # Ray's driver installs its own SIGINT handler, which kills the process before the clean
    # shutdown below; Ctrl-C (and SIGTERM) should raise KeyboardInterrupt here instead.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:  # the print too: a Ctrl-C may land while it is still writing the line
        print(f"gpt2 serve: {args.model_path} at http://{args.host}:{args.port}/ "
              "(playground at /, API at /v1); Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("gpt2 serve: stopping", file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
