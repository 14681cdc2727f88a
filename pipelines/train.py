"""Train GPT-2 with Ray Train: a TorchTrainer over the Parquet shards of a dataset dir.

    python pipelines/train.py                         # demo: sample corpus, tiny model, 2 CPUs
    gpt2 train --data data/dataset --preset tiny --total_steps 2000 --num_workers 2
    ray job submit --working-dir . -- python pipelines/train.py --data /shared/data/books \
        --preset gpt2 --gpus 8 --use_amp --storage_path s3://bucket/runs
    gpt2 train --train_corpus a.txt --eval_corpus b.txt --save_model_path out/model \
        --seq_len 128 --layers 6 --heads 8 --dims 256 --batch_train 32 --total_steps 5000
    gpt2 train --from_checkpoint runs/gpt2-20261124-120000     # resume a run where it stopped

Given text (--train_corpus) it prepares the dataset dir first (pipelines/prepare.py); with no
--data it uses data/dataset, preparing the sample corpus there when it does not exist.

The job, top to bottom:
  1. Driver: the run is resolved once (training/driver.py, plan_job): the MLflow store, the
     run's name and dir, the checkpoint it resumes, and the flags, the dataset's manifest and
     the model's shape checked together (vocab, seq_len, batch against the data, GPUs); bad
     input ends there in one sentence, exit 2.
  2. Ray Train: `num_workers` workers each run train_loop_per_worker (training/worker.py) with
     this config and the RunContext the driver resolved (training/driver.py). Each streams its
     equal share of the train rows (`get_dataset_shard`): row groups in an order --seed
     shuffles across the split, then a shuffle buffer seeded per epoch;
     AdamW with warm-up + cosine, grad accumulation and clipping, AMP, DDP across workers.
     Every --save_steps all ranks report and rank 0's checkpoint is kept (training/checkpoint.py);
     rank 0's reports carry its records, which the Train controller logs to MLflow
     (common/tracking.py). A dead worker restarts the group from the last checkpoint.
  3. Driver: the final checkpoint's model dir is copied to --save_model_path; a sample of text
     from it is printed, with where the model, the loss curve and the MLflow run are.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

if __name__ == "__main__":  # as a file (python, ray job submit): import pipelines by package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from gpt2core import storage
from pipelines.common.entry import stage_main
from pipelines.common.flags import parse
from pipelines.common.tracking import run_page, train_run
from pipelines.training import checkpoint
from pipelines.training.config import TrainConfig
from pipelines.training.driver import make_trainer, plan_job


def train(cfg: TrainConfig) -> dict:
    """Resolve, prepare if asked, train, export; returns where things went and the last
    metrics."""
    job = plan_job(cfg)  # the one place a run is resolved: training/driver.py
    if job.cfg.resume:
        print(f"resuming {job.name} from {job.resumes}" if job.resumes else
              f"resuming {job.name}: no complete checkpoint yet, so from the start")
    print(f"training {job.name}: {job.workers} worker(s) x {job.cpus:g} CPU"
          f"{' + 1 GPU' if job.cfg.gpus else ''} ({job.context.threads} torch thread(s) each), "
          f"{job.cfg.total_steps} steps -> {job.run_dir}")
    with train_run(job.tracking_uri, job.cfg, job.name, job.resumed_run_id) as run:  # MLflow
        job = replace(job, context=replace(job.context, mlflow_run_id=run.run_id))
        result = make_trainer(job, callbacks=[run.callback]).fit()
    out = storage.resolve(job.cfg.save_model_path or storage.join(job.run_dir, "model"))
    checkpoint.export_model(result.checkpoint, out)
    return {"name": job.name, "model_dir": out, "run_dir": job.run_dir, "data": job.cfg.data,
            "checkpoint": result.checkpoint.path, "metrics": dict(result.metrics),
            "tracking_uri": job.tracking_uri}


def _sample(model_dir: str, prompt: str = "\n", tokens: int = 60, lines: int = 8) -> str:
    """A few sampled tokens from the trained model (top-p 0.9), to show it works; at most
    `lines` lines of them, so the whole console fits on one screen."""
    from gpt2core import GPT2, Tokenizer, generate

    model, tok = GPT2.from_pretrained(model_dir).eval(), Tokenizer.from_pretrained(model_dir)
    ids = tok.encode(prompt) or [tok.eos_id]
    text = prompt + tok.decode(generate(model, ids, tokens, top_p=0.9, seed=0), partial=True)
    return "\n".join(text.strip("\n").splitlines()[:lines])


@stage_main("gpt2 train")
def main(argv: list[str] | None = None) -> int:
    out = train(parse(TrainConfig, argv, prog="gpt2 train", description=__doc__))
    m = out["metrics"]
    print(f"\nfinished {out['name']}: step {m.get('step')}, eval loss "
          f"{m.get('eval/loss', float('nan')):.4f}, {m.get('eval/bpb', float('nan')):.4f} "
          f"bits per byte\n--- sample ---\n{_sample(out['model_dir'])}\n--------------")
    uri, model = out["tracking_uri"], out["model_dir"]
    local = not uri.startswith(("http://", "https://"))
    print(f"model dir:   {model}   (loss curve: loss_curve.png inside)\n"
          f"checkpoints: {out['run_dir']}\n"
          f"MLflow run:  {m.get('mlflow_run_id')} in {uri}\n\nnext:\n"
          f"  gpt2 generate --model_path {model}    # a prompt at a time\n"
          f"  gpt2 evaluate --model_path {model} --eval_corpus {out['data']}\n"
          f"  gpt2 serve --model_path {model}        # then http://127.0.0.1:8000/\n"
          + (f"  mlflow ui --backend-store-uri {uri}\n" if local else "")
          + f"  the curves: {run_page(uri, m.get('mlflow_run_id'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
