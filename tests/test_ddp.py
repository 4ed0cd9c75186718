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


def _acdc_cfg(root: str, out: str, **over: str):
    from ucseg_fast.config import load_config
    ov = {"data.root": f"'{root}'", "data.img_size": "[32,32]", "data.labeled_bs": "1",
          "data.unlabeled_bs": "1", "train.max_iterations": "2", "train.log_every": "1",
          "train.val_every": "100", "train.checkpoint_every": "100",
          "train.max_val_volumes": "1", "train.out_dir": f"'{out}'",
          "train.progress": "false", "train.amp": "'none'", "train.channels_last": "false",
          "loss.phase2_start": "1", "loss.queue_size": "16", **over}
    return load_config(None, [f"--{k}={v}" for k, v in ov.items()])


def _la_cfg(root: str, out: str):
    """The 3D recipe at 32³, batch 1 + 1 (tests/test_trainer_3d.py's settings), 2 iterations."""
    from test_trainer_3d import cfg_for
    return cfg_for(root, out, **{"train.max_iterations": "2", "loss.phase2_start": "1"})


_CONFIGS = {"acdc": _acdc_cfg, "la": _la_cfg}


def _worker(rank: int, world: int, port: int, root: str, out: str, res: str,
            recipe: str = "acdc") -> None:
    import torch.distributed as dist
    from ucseg_fast.train import Trainer
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        tr = Trainer(_CONFIGS[recipe](root, out), log=lambda s: None)
        state = copy.deepcopy(tr.stream.state_dict())
        first = tr.stream.next()  # this rank's first batch, then rewind the stream
        tr.stream.load_state_dict(state)
        assert tr.dist.world_size == world and tr.dist.rank == rank
        tr.train()
        torch.save({"params": {k: p.detach().clone() for k, p in tr.model.named_parameters()},
                    "x_l": first.x_l}, f"{res}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn_two(root, tmp_path, recipe: str):
    out, res = tmp_path / "run", tmp_path / "res"
    res.mkdir()
    mp.spawn(_worker, args=(2, _free_port(), str(root), str(out), str(res), recipe), nprocs=2,
             join=True)
    r0, r1 = (torch.load(res / f"rank{r}.pt") for r in (0, 1))
    assert not torch.equal(r0["x_l"], r1["x_l"])  # per-rank data streams
    assert r0["params"].keys() == r1["params"].keys()
    for k, v in r0["params"].items():  # gradients were averaged: the replicas never diverge
        assert torch.equal(v, r1["params"][k]), k
    import json
    recs = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["iteration"] for r in recs if "L" in r] == [1, 2]  # one writer: rank 0
    return out, r0, recs


def test_two_process_gloo_3d(synth_la, tmp_path):
    """The 3D recipe: each rank crops its own volumes, the replicas stay in lockstep."""
    _spawn_two(synth_la, tmp_path, "la")


def test_two_process_gloo(synth_acdc, tmp_path):
    out, r0, recs = _spawn_two(synth_acdc, tmp_path, "acdc")
    from ucseg_fast.train.checkpoint import load_checkpoint
    tensors, meta = load_checkpoint(out / "last.json")
    assert meta["iteration"] == 2
    for k, v in r0["params"].items():
        assert torch.equal(tensors[f"model.{k}"], v), k
    assert all(r["img_per_s"] > 0 for r in recs if "L" in r)


# ---------------------------------------------------------------------------------------------
# exact multi-process resume: 4 straight == 2 + save + resume + 2, on each rank
# ---------------------------------------------------------------------------------------------
def _resume_cfg(root: str, out: str):
    # phase 2 (the copy-paste generator) from iteration 1: every rank-local stream (data,
    # dropout RNG, mix generator, queues) has moved before the save at 2; queue gate threshold
    # 0: every step enqueues, so the CCP queues move per rank
    return _acdc_cfg(root, out, **{"train.max_iterations": "4", "loss.gate_base": "0.0",
                                   "loss.gate_span": "0.0"})


def _recording(tr, terms_out: list) -> None:
    """Wrap tr.step so this rank's own (not all-reduced) loss terms are kept per iteration."""
    step = tr.step

    def rec(batch, t):
        terms = step(batch, t)
        terms_out.append({k: v.detach().clone() for k, v in terms.items()})
        return terms
    tr.step = rec


def _final_state(tr, terms: list) -> dict:
    return {"terms": terms,
            "model": {k: v.detach().clone() for k, v in tr.model.state_dict().items()},
            "objective": {k: v.detach().clone() for k, v in tr.objective.state_dict().items()},
            "stream": copy.deepcopy(tr.stream.state_dict()), "cpu_rng": torch.get_rng_state(),
            "mix_rng": tr.mix_generator.get_state()}


def _resume_worker(rank: int, world: int, port: int, root: str, out: str, res: str) -> None:
    import torch.distributed as dist
    from ucseg_fast.train import Trainer
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    quiet = lambda s: None  # noqa: E731
    try:
        straight_terms: list = []
        a = Trainer(_resume_cfg(root, f"{out}/straight"), log=quiet)
        _recording(a, straight_terms)
        a.train()
        straight = _final_state(a, straight_terms)

        split_terms: list = []
        b = Trainer(_resume_cfg(root, f"{out}/split"), log=quiet)
        _recording(b, split_terms)
        b.train(stop_at=2)  # saves last at iteration 2 (collective: both ranks' state)
        c = Trainer(_resume_cfg(root, f"{out}/split"), log=quiet)
        c.load(f"{out}/split/last.json")
        assert c.iteration == 2
        _recording(c, split_terms)
        c.train()
        torch.save({"straight": straight, "split": _final_state(c, split_terms)},
                   f"{res}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_resume_is_exact(synth_acdc, tmp_path):
    out, res = tmp_path / "run", tmp_path / "res"
    res.mkdir()
    mp.spawn(_resume_worker, args=(2, _free_port(), str(synth_acdc), str(out), str(res)),
             nprocs=2, join=True)
    runs = [torch.load(res / f"rank{r}.pt") for r in (0, 1)]
    for rank, run in enumerate(runs):
        a, c = run["straight"], run["split"]
        assert len(a["terms"]) == len(c["terms"]) == 4, rank
        for t, (ta, tc) in enumerate(zip(a["terms"], c["terms"])):
            assert ta.keys() == tc.keys(), (rank, t)
            for k in ta:
                assert torch.equal(ta[k], tc[k]), (rank, t, k)
        for part in ("model", "objective"):  # weights, BN buffers; CCP queues and pointers
            assert a[part].keys() == c[part].keys()
            for k, v in a[part].items():
                assert torch.equal(v, c[part][k]), (rank, part, k)
        assert a["stream"] == c["stream"], rank
        assert torch.equal(a["cpu_rng"], c["cpu_rng"]) and torch.equal(a["mix_rng"], c["mix_rng"])
    # the check has teeth: the ranks' rank-local states differ (restoring rank 0's state on
    # rank 1, the old behaviour, fails the comparison above)
    s0, s1 = runs[0]["straight"], runs[1]["straight"]
    assert not torch.equal(s0["terms"][2]["L"], s1["terms"][2]["L"])
    assert any(not torch.equal(v, s1["objective"][k]) for k, v in s0["objective"].items())
    assert s0["stream"] != s1["stream"] and not torch.equal(s0["mix_rng"], s1["mix_rng"])

    # one atomic, hash-verified pair (the resumed run's final save) holding both ranks' state:
    # rank 0's under the plain names, rank 1's under "rank1."
    from ucseg_fast.train.checkpoint import CheckpointError, load_checkpoint
    tensors, meta = load_checkpoint(out / "split" / "last.json")
    assert meta["world_size"] == 2 and meta["iteration"] == 4 and set(meta["ranks"]) == {"1"}
    for rank, prefix in ((0, ""), (1, "rank1.")):
        fin = runs[rank]["split"]
        for k, v in fin["objective"].items():
            assert torch.equal(tensors[f"{prefix}objective.{k}"], v), (rank, k)
        assert torch.equal(tensors[f"{prefix}rng.mix"], fin["mix_rng"]), rank
    assert meta["ranks"]["1"]["stream"]["sampler"] == runs[1]["split"]["stream"]["sampler"]
    assert not list((out / "split").glob(".*.tmp"))

    # another world size is refused, naming both sizes
    from ucseg_fast.train import Trainer
    single = Trainer(_resume_cfg(str(synth_acdc), str(tmp_path / "single")), log=lambda s: None)
    with pytest.raises(CheckpointError, match="saved with world size 2 but this run has world "
                                              "size 1"):
        single.load(out / "split" / "last.json")
