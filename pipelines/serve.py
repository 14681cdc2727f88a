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
import logging
import signal
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # as a file (python, ray job submit): import pipelines by package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipelines.common.flags import add_flags, add_verbose, new_parser, option, set_verbose, verbose

IMPORT_PATH = "serve.app:app"
# earlier spellings of the app's fields, still accepted
ALIASES = {"model_dir": ["--model_path"], "num_gpus": ["--gpus"]}


@dataclass
class ServeFlags:
    """Where the app runs; the app's own arguments come from its args model (serve/args.py)."""

    host: str = option("127.0.0.1", "address Serve's HTTP proxy binds; 0.0.0.0 to accept other "
                       "machines (and a load balancer)")
    port: int = option(8000, "HTTP port of Serve's proxy")
    address: str | None = option(None, "Ray cluster to join (None: RAY_ADDRESS, else a new "
                                 "local cluster; 'local': always a new one)")
    route_prefix: str = option("/", "URL path the app answers under, e.g. /gpt2 beside other "
                               "apps")
    name: str = option("gpt2", "Serve application name; Ctrl-C deletes this application only, "
                       "not others on the cluster")


def build_parser(args_cls: type | None = None) -> argparse.ArgumentParser:
    """`gpt2 serve`'s flags: ServeFlags, then every field of the app's args model (its
    defaults, units and help live there, in serve/args.py, loaded here by import path)."""
    p = new_parser("gpt2 serve", __doc__.split("\n")[0])
    add_flags(p, ServeFlags)
    add_flags(p, args_cls or load_builder()[1], ALIASES)
    add_verbose(p)
    return p


def load_builder(import_path: str = IMPORT_PATH):
    """The application builder and its typed-args class, imported now by path."""
    module, attr = import_path.split(":")
    builder = getattr(importlib.import_module(module), attr)
    return builder, typing.get_type_hints(builder)["args"]


def main(argv: list[str] | None = None) -> int:
    builder, args_cls = load_builder()
    args = vars(build_parser(args_cls).parse_args(argv))
    set_verbose(args.pop("verbose"))
    flags = ServeFlags(**{k: args.pop(k) for k in list(args) if k in ServeFlags.__annotations__})
    from gpt2core import storage

    model_dir = args["model_dir"]
    try:
        is_model = storage.is_file(storage.join(model_dir, "config.json"))
    except storage.StorageError as e:
        print(f"gpt2 serve: {e}", file=sys.stderr)
        return 2
    if not is_model:
        print(f"gpt2 serve: {model_dir} is not a model dir (no config.json); pass "
              "--model_path a dir written by `gpt2 train` or save_pretrained.", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    from gpt2core.errors import UserError
    from pipelines.common.entry import Failure
    from pipelines.common.ray_session import init_ray

    app_args = args_cls(**{**args, "model_dir": storage.resolve(model_dir)})
    try:
        init_ray(flags.address, workers_print=False)  # code shipped to replicas; -v: logs
    except (UserError, Failure) as e:
        print(f"gpt2 serve: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UserError) else 1
    if not verbose():  # Serve's own INFO lines on the driver ("Started Serve", "is ready")
        logging.getLogger("ray.serve").setLevel("WARNING")
    serve.start(http_options={"host": flags.host, "port": flags.port})
    serve.run(builder(app_args), name=flags.name, route_prefix=flags.route_prefix,
              blocking=False)
    # Ray's driver installs its own SIGINT handler, which kills the process before the clean
    # shutdown below; Ctrl-C (and SIGTERM) should raise KeyboardInterrupt here instead.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:  # the print too: a Ctrl-C may land while it is still writing the line
        url = f"http://{flags.host}:{flags.port}{flags.route_prefix.rstrip('/')}"
        print(f"gpt2 serve: {model_dir} at {url}/ "
              "(playground at /, API at /v1, docs at /docs); Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("gpt2 serve: stopping", file=sys.stderr)
    finally:
        # only this application: other apps on a shared cluster keep serving (Serve itself
        # and a local cluster of our own end with ray.shutdown)
        serve.delete(flags.name)
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
