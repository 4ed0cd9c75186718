"""Two-process DDP on CPU (gloo): identical weights on both ranks, rank 0 alone writes the log
and the checkpoint, each rank drew its own batches."""
from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, root: str, out: str, res: str) -> None:
    import torch.distributed as dist
    from ucseg_fast.config import load_config
    from ucseg_fast.train import Trainer
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        ov = {"data.root": f"'{root}'", "data.img_size": "[32,32]", "data.labeled_bs": "1",
              "data.unlabeled_bs": "1", "train.max_iterations": "2", "train.log_every": "1",
              "train.val_every": "100", "train.checkpoint_every": "100",
              "train.max_val_volumes": "1", "train.out_dir": f"'{out}'",
              "train.progress": "false", "train.amp": "'none'", "train.channels_last": "false",
              "loss.phase2_start": "1", "loss.queue_size": "16"}
        tr = Trainer(load_config(None, [f"--{k}={v}" for k, v in ov.items()]), log=lambda s: None)
        state = copy.deepcopy(tr.stream.state_dict())
        first = tr.stream.next()  # this rank's first batch, then rewind the stream
        tr.stream.load_state_dict(state)
        assert tr.dist.world_size == world and tr.dist.rank == rank
        tr.train()
        torch.save({"params": {k: p.detach().clone() for k, p in tr.model.named_parameters()},
                    "x_l": first.x_l}, f"{res}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo(acdc_root, tmp_path):
    out, res = tmp_path / "run", tmp_path / "res"
    res.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(acdc_root), str(out), str(res)), nprocs=2,
             join=True)
    r0, r1 = (torch.load(res / f"rank{r}.pt") for r in (0, 1))
    assert not torch.equal(r0["x_l"], r1["x_l"])  # per-rank data streams
    assert r0["params"].keys() == r1["params"].keys()
    for k, v in r0["params"].items():  # gradients were averaged: the replicas never diverge
        assert torch.equal(v, r1["params"][k]), k
    from ucseg_fast.train.checkpoint import load_checkpoint
    tensors, meta = load_checkpoint(out / "last.json")
    assert meta["iteration"] == 2
    for k, v in r0["params"].items():
        assert torch.equal(tensors[f"model.{k}"], v), k
    import json
    recs = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["iteration"] for r in recs if "L" in r] == [1, 2]  # one writer: rank 0
    assert all(r["img_per_s"] > 0 for r in recs if "L" in r)
