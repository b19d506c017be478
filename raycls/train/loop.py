"""The Ray Train side: a TorchTrainer whose workers fine-tune the head on Ray Data shards.

Each worker builds the model (`heads.build_model`), wraps it for DDP
(`ray.train.torch.prepare_model`: gloo on CPUs, NCCL on GPUs), streams its shard of the
training rows (`get_dataset_shard`), and after every epoch scores its shard of the
validation rows; the confusion counts are summed over the workers, and rank 0 reports
loss, accuracy and macro-F1 with a checkpoint of the trainable weights, the optimizer
and the curve so far. A run started again on the same `output.path` resumes from the
latest checkpoint (`ray.train.get_checkpoint()`); a worker failure restarts from it too
(`FailureConfig(max_failures)`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any

from raycls import schema, storage
from raycls.quality.metrics import scores_from_counts
from raycls.train import heads
from raycls.train.data import LABEL_ID, TrainData
from raycls.train.spec import ModelSpec, TrainSpec

RUN_NAME = "run"
TRAIN_DIR = "_train"
"""Subdirectory of `output.path` holding Ray Train's run (checkpoints), for resume."""
EPOCH_DONE = "raycls-train: epoch {epoch}/{epochs} checkpointed"
"""Printed by rank 0 once Ray Train has recorded the epoch's checkpoint (tests and logs watch for it)."""
MAX_FAILURES = 2
"""Worker failures a run recovers from (restarting from the latest checkpoint) before giving up."""
PROGRESS_EVERY = 25
"""Steps between progress lines of rank 0."""
_STATE, _WEIGHTS, _OPTIM = "state.json", "trainable.pt", "optimizer.pt"


def train_func(config: dict[str, Any]) -> None:
    """One training worker (runs inside Ray Train; `config` is plain data)."""
    import ray.train
    import ray.train.torch
    import torch

    torch.set_num_threads(config["threads"])
    model_spec = ModelSpec.model_validate(config["model"])
    labels, epochs, batch_size = config["labels"], config["epochs"], config["batch_size"]
    net, tokenizer = heads.build_model(config["base_path"], model_spec, labels, seed=config["seed"])
    device = ray.train.torch.get_device()
    net = ray.train.torch.prepare_model(net)
    inner = net.module if hasattr(net, "module") else net
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config["learning_rate"], weight_decay=config["weight_decay"])
    world = ray.train.get_context().get_world_size()
    total_steps = max(1, epochs * math.ceil(config["rows_train"] / world / batch_size))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total_steps))
    start, curve = _restore(ray.train.get_checkpoint(), inner, optimizer, scheduler)

    def encode(texts):
        enc = tokenizer(list(texts), truncation=True, max_length=model_spec.max_length, padding=True, return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items()}

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")
    for epoch in range(start, epochs):
        net.train()
        loss_sum, steps, rows, began = 0.0, 0, 0, time.monotonic()
        for batch in train_shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                              local_shuffle_buffer_size=4 * batch_size, local_shuffle_seed=config["seed"] + epoch):
            target = torch.as_tensor(batch[LABEL_ID], dtype=torch.long, device=device)
            loss = net(**encode(batch[schema.TEXT]), labels=target).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum, steps, rows = loss_sum + loss.item(), steps + 1, rows + len(target)
            if steps % PROGRESS_EVERY == 0 and ray.train.get_context().get_world_rank() == 0:
                print(f"raycls-train: epoch {epoch + 1} step {steps}: {rows} rows, loss {loss_sum / steps:.4f}, "
                      f"{rows / (time.monotonic() - began):.1f} rows/s on this worker", flush=True)
        train_s = time.monotonic() - began
        confusion = _evaluate(net, val_shard, encode, len(labels), batch_size)
        loss_sum, steps, rows, confusion = _sum_over_workers(torch, [loss_sum, steps, rows], confusion)
        scores = scores_from_counts(_pairs(confusion, labels), labels)
        curve.append({"epoch": epoch + 1, "train_loss": loss_sum / max(steps, 1), "train_rows": int(rows),
                      "train_s": round(train_s, 2), "train_rows_per_s": round(rows / train_s, 2) if train_s > 0 else None,
                      "val_accuracy": scores["accuracy"], "val_macro_f1": scores["macro_f1"]})
        if epoch == start and start > 0:
            curve[-1]["resumed_after_epoch"] = start  # this attempt began from that epoch's checkpoint
        _report(ray.train, inner, optimizer, scheduler, curve, config["threads"])
        if ray.train.get_context().get_world_rank() == 0:
            print(EPOCH_DONE.format(epoch=epoch + 1, epochs=epochs), json.dumps(curve[-1]), flush=True)


def _evaluate(net, shard, encode, n_labels: int, batch_size: int):
    import torch

    net.eval()
    confusion = torch.zeros((n_labels, n_labels), dtype=torch.long)
    with torch.inference_mode():
        for batch in shard.iter_batches(batch_size=max(batch_size, 32), batch_format="numpy"):
            predicted = net(**encode(batch[schema.TEXT])).logits.argmax(-1).cpu()
            for gold, pred in zip(batch[LABEL_ID].tolist(), predicted.tolist()):
                confusion[gold, pred] += 1
    return confusion


def _sum_over_workers(torch, scalars: list[float], confusion):
    """Sum the per-worker figures (a no-op with one worker)."""
    import torch.distributed as dist

    flat = torch.cat([torch.tensor(scalars, dtype=torch.float64), confusion.flatten().double()])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flat)
    n = len(scalars)
    return (*flat[:n].tolist(), flat[n:].long().reshape(confusion.shape))


def _pairs(confusion, labels: list[str]) -> list[tuple[str, str, int]]:
    return [(labels[g], labels[p], int(confusion[g, p])) for g in range(len(labels)) for p in range(len(labels))]


def _report(train, inner, optimizer, scheduler, curve: list[dict], threads: int) -> None:
    """Report the epoch's figures; rank 0 attaches the checkpoint (every rank must call report)."""
    import torch

    metrics = dict(curve[-1])
    if train.get_context().get_world_rank() != 0:
        train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="raycls-ckpt-") as tmp:
        torch.save(heads.trainable_state(inner), os.path.join(tmp, _WEIGHTS))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, os.path.join(tmp, _OPTIM))
        with open(os.path.join(tmp, _STATE), "w", encoding="utf-8") as f:
            json.dump({"epoch": curve[-1]["epoch"], "curve": curve}, f)
        train.report(metrics, checkpoint=train.Checkpoint.from_directory(tmp))
    # report() returns once the files are uploaded; the controller records the checkpoint
    # (the snapshot a restarted run resumes from) a moment later. Wait for that, so that
    # EPOCH_DONE means a run killed now resumes after this epoch.
    train.get_all_reported_checkpoints(consistency_mode=train.CheckpointConsistencyMode.COMMITTED)


def _restore(checkpoint, inner, optimizer, scheduler) -> tuple[int, list[dict]]:
    """Load the latest checkpoint, if there is one: (epochs already done, the curve so far)."""
    if checkpoint is None:
        return 0, []
    import torch

    with checkpoint.as_directory() as path:
        heads.load_trainable(inner, torch.load(os.path.join(path, _WEIGHTS), weights_only=True))
        states = torch.load(os.path.join(path, _OPTIM), weights_only=False)
        optimizer.load_state_dict(states["optimizer"])
        scheduler.load_state_dict(states["scheduler"])
        with open(os.path.join(path, _STATE), encoding="utf-8") as f:
            state = json.load(f)
    print(f"raycls-train: resuming after epoch {state['epoch']} from its checkpoint", flush=True)
    return state["epoch"], state["curve"]


def read_checkpoint_state(path: str) -> dict[str, Any]:
    """`state.json` of a checkpoint directory (the epoch and the curve)."""
    with open(os.path.join(path, _STATE), encoding="utf-8") as f:
        return json.load(f)


def load_checkpoint_weights(path: str) -> dict[str, Any]:
    import torch

    return torch.load(os.path.join(path, _WEIGHTS), weights_only=True)


def fit(spec: TrainSpec, base_path: str, data: TrainData):
    """Run (or resume) the TorchTrainer; returns Ray Train's Result (latest checkpoint, metrics)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = {
        "base_path": base_path, "model": spec.model.model_dump(), "labels": spec.label_names,
        "epochs": spec.training.epochs, "batch_size": spec.training.batch_size,
        "learning_rate": spec.training.learning_rate, "weight_decay": spec.training.weight_decay,
        "seed": spec.training.seed, "threads": spec.ray.cpus_per_worker, "rows_train": data.counts["rows_train"],
    }
    trainer = TorchTrainer(
        train_func,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=spec.ray.workers, use_gpu=spec.ray.use_gpu,
                                     resources_per_worker={"CPU": spec.ray.cpus_per_worker}),
        datasets={"train": data.train, "validation": data.validation},
        run_config=RunConfig(
            storage_path=train_storage(spec.output.path), name=RUN_NAME,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            failure_config=FailureConfig(max_failures=MAX_FAILURES),
        ),
    )
    return trainer.fit()


def train_storage(output: str) -> str:
    """Ray Train's storage_path for an output (absolute: Ray Train wants a path or a URI)."""
    return storage.absolute(storage.join(output, TRAIN_DIR))
