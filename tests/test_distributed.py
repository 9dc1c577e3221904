"""Data-parallel training on torch.distributed (gloo, CPU): two ranks == one process.

Every test starts two processes with the environment torchrun would give them (RANK,
WORLD_SIZE, MASTER_ADDR, ...), so `sstream.train.train` joins a process group exactly as under
`torchrun --nproc_per_node=2 -m sstream train ...`.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import socket
import traceback
from pathlib import Path

import pytest
import torch

import sstream.training.images
from sstream.train import TrainConfig, train
from tests.conftest import float64_training
from tests.test_train_predict import write_dataset

JOIN_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def relative_errors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
                    ) -> float:
    """The worst max |actual - expected| / max |expected| over the tensors of a state dict."""
    return max((actual[name] - value).abs().max().item() / (value.abs().max().item() or 1.0)
               for name, value in expected.items())


def _rank_main(rank: int, world: int, port: int, job: str, args: dict, result: str) -> None:
    """One rank: set torchrun's environment, run `job`, save what it returns to `result`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        outcome = JOBS[job](rank, **args)
    except BaseException:
        outcome = {"exception": traceback.format_exc()}
    torch.save(outcome, result)


def _train_job(rank: int, config: dict) -> dict:
    with float64_training():
        result = train(TrainConfig(**config))
    return {"model": result.model.state_dict(), "history": result.state.history,
            "rank": result.rank}


def _cli_job(rank: int, argv: list[str], failing_rank: int) -> dict:
    """`sstream train ...` where one rank cannot read its first image."""
    load = sstream.training.images.load_training_image

    def unreadable(sample, *args, **kwargs):
        if rank == failing_rank:
            raise ValueError(f"{sample.image.name}: cannot decode the image")
        return load(sample, *args, **kwargs)

    sstream.training.images.load_training_image = unreadable
    code, stderr = _run_cli(argv, contextlib.redirect_stderr)
    return {"exit_code": code, "stderr": stderr}


def _run_cli(argv: list[str], redirect) -> tuple[int, str]:
    """(exit code, what `redirect` caught) of `sstream argv` in this process."""
    from sstream.cli import main

    caught = io.StringIO()
    code = 0
    with redirect(caught):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, caught.getvalue()


JOBS = {"train": _train_job, "cli": _cli_job}


def start_ranks(world: int, job: str, args: dict, tmp_path: Path
                ) -> list[tuple[multiprocessing.Process, Path]]:
    context = multiprocessing.get_context("spawn")
    port, ranks = _free_port(), []
    for rank in range(world):
        result = tmp_path / f"rank{rank}-{job}.pt"
        process = context.Process(target=_rank_main, args=(rank, world, port, job, args,
                                                           str(result)))
        process.start()
        ranks.append((process, result))
    return ranks


def join_ranks(ranks: list[tuple[multiprocessing.Process, Path]]) -> list[dict]:
    outcomes = []
    for process, result in ranks:
        process.join(JOIN_TIMEOUT_S)
        if process.is_alive():
            for other, _ in ranks:
                other.kill()
            pytest.fail(f"a rank did not finish within {JOIN_TIMEOUT_S} s (hung)")
        outcome = torch.load(result, weights_only=False)
        assert "exception" not in outcome, outcome.get("exception")
        outcomes.append(outcome)
    return outcomes


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One training, float64, twice: 2 ranks x accumulate 2 (spawned) and 1 process x
    accumulate 4 (here, while the ranks start).

    5 images: each epoch has a full group of 4 and a last group of 1 (rank 1 idle in it);
    2 epochs, so the order reshuffles; validation is sharded (3 images) and gathered.
    """
    root = tmp_path_factory.mktemp("data_parallel")
    common = dict(train_csv=str(write_dataset(root, 5, size=(40, 48))),
                  val_csv=str(write_dataset(root, 3, size=(40, 40), name="val")),
                  epochs=2, tile_size=32, device="cpu", lr=1e-2, seed=5)
    ranks = start_ranks(2, "train", {"config": {**common, "out": str(root / "two"),
                                                "accumulate": 2}}, root)
    with float64_training():
        single = train(TrainConfig(**common, out=str(root / "one"), accumulate=4))
    rank0, rank1 = join_ranks(ranks)
    return {"common": common, "root": root, "single": single, "ranks": (rank0, rank1)}


def test_two_ranks_equal_one_process_with_twice_the_accumulation(runs):
    rank0, rank1 = runs["ranks"]
    expected = runs["single"].model.state_dict()
    assert expected["head.fc.weight"].dtype == torch.float64
    for name in expected:
        assert torch.equal(rank0["model"][name], rank1["model"][name]), name  # in lockstep
    assert relative_errors(rank0["model"], expected) < 1e-10
    assert (rank0["rank"], rank1["rank"]) == (0, 1)
    for mine, theirs in zip(rank0["history"], runs["single"].state.history, strict=True):
        for key in ("train_loss", "val_loss", "val_auc", "val_accuracy"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-10), key
    # rank 0 wrote the outputs, with every rank's RNG state in the checkpoint
    assert {"last.pt", "best.pt", "metrics.csv", "curves.png"} <= {
        p.name for p in (runs["root"] / "two").iterdir()}
    checkpoint = torch.load(runs["root"] / "two" / "last.pt", weights_only=True)
    assert len(checkpoint["torch_rng_states"]) == 2
    assert checkpoint["train_state"]["step"] == 4


def test_a_two_rank_run_resumes_in_one_process(runs):
    """Checkpoints count images of whole groups: resume on another number of ranks."""
    with float64_training():
        resumed = {name: train(TrainConfig(**{**runs["common"], "epochs": 3, "accumulate": 4,
                                              "out": str(runs["root"] / name)}), resume=True)
                   for name in ("two", "one")}
    assert resumed["two"].state.step == resumed["one"].state.step == 6
    assert relative_errors(resumed["two"].model.state_dict(),
                           resumed["one"].model.state_dict()) < 1e-10


def test_a_failing_rank_stops_every_rank_with_a_clear_message(tmp_path):
    csv_path = write_dataset(tmp_path, 4, size=(40, 40))
    argv = ["train", "--train-csv", str(csv_path), "--out", str(tmp_path / "run"),
            "--epochs", "1", "--tile-size", "32", "--device", "cpu", "--quiet",
            "--dist-timeout", "30"]
    rank0, rank1 = join_ranks(start_ranks(2, "cli", {"argv": argv, "failing_rank": 1},
                                          tmp_path))
    assert rank1["exit_code"] == 1 and "cannot decode the image" in rank1["stderr"]
    assert rank0["exit_code"] == 1
    assert "rank 1 failed at optimizer step 1" in rank0["stderr"]
    assert "cannot decode the image" in rank0["stderr"]



def test_regression_on_two_ranks_equals_one_process(tmp_path):
    """A regression run (two targets, standardised, sharded validation) on two ranks equals
    one process with twice the accumulation, metrics included."""
    from tests.test_regression import write_regression_dataset

    targets = {"a": [0.0, 1.0, 2.0, 3.0, 0.5], "b": [3.0, 1.0, 4.0, 1.0, 5.0]}
    common = dict(train_csv=str(write_regression_dataset(tmp_path, targets, size=(40, 48))),
                  val_csv=str(write_regression_dataset(tmp_path, {"a": [0.2, 2.8, 1.5],
                                                                  "b": [2.0, 6.0, 5.0]},
                                                       "val", size=(40, 40))),
                  task="regression", loss="huber", epochs=1, tile_size=32, device="cpu",
                  lr=1e-2, seed=5)
    ranks = start_ranks(2, "train", {"config": {**common, "out": str(tmp_path / "two"),
                                                "accumulate": 2}}, tmp_path)
    with float64_training():
        single = train(TrainConfig(**common, out=str(tmp_path / "one"), accumulate=4))
    rank0, _ = join_ranks(ranks)
    assert relative_errors(rank0["model"], single.model.state_dict()) < 1e-10
    for key in ("train_loss", "val_loss", "val_spearman", "val_pearson", "val_mae"):
        assert rank0["history"][0][key] == pytest.approx(single.state.history[0][key],
                                                         rel=1e-9), key


def _predict_cli_job(rank: int, argv: list[str]) -> dict:
    """`sstream predict ...` on one rank: its exit code and what it printed."""
    import sstream.predict

    slides = []
    outputs = sstream.predict.model_outputs

    def counted(*args, **kwargs):
        slides.append(1)
        return outputs(*args, **kwargs)

    sstream.predict.model_outputs = counted
    code, stdout = _run_cli(argv, contextlib.redirect_stdout)
    return {"exit_code": code, "stdout": stdout, "slides": len(slides)}


JOBS["predict"] = _predict_cli_job


def test_two_ranks_predict_a_csv_as_one_process_in_the_same_order(tmp_path):
    """torchrun shards predict's slides: each rank takes every other one, and rank 0 writes
    the merged CSV in the input's order, equal to one process's."""
    csv_path = write_dataset(tmp_path, 5, size=(40, 48))
    train(TrainConfig(train_csv=str(csv_path), out=str(tmp_path / "run"), epochs=1,
                      tile_size=32, device="cpu"))
    checkpoint = str(tmp_path / "run" / "last.pt")
    common = ["predict", "--checkpoint", checkpoint, "--csv", str(csv_path), "--device",
              "cpu", "--quiet"]
    single = tmp_path / "one.csv"
    from sstream.cli import main

    with contextlib.suppress(SystemExit):
        main([*common, "--out", str(single)])
    merged = tmp_path / "two.csv"
    outcomes = join_ranks(start_ranks(2, "predict", {"argv": [*common, "--out", str(merged)]},
                                      tmp_path))
    assert [o["exit_code"] for o in outcomes] == [0, 0]
    assert [o["slides"] for o in outcomes] == [3, 2]  # each rank its own share
    assert merged.read_text() == single.read_text()
    assert len(merged.read_text().splitlines()) == 6  # the header and the five slides


def _saliency_cli_job(rank: int, argv: list[str]) -> dict:
    """`sstream saliency ...` on one rank: its exit code, what it printed and the slides it
    mapped."""
    import importlib

    saliency = importlib.import_module("sstream.saliency")  # the module, not the function
    slides = []
    compute = saliency.compute_saliency

    def counted(sample, *args, **kwargs):
        slides.append(sample.image.name)
        return compute(sample, *args, **kwargs)

    saliency.compute_saliency = counted
    code, stdout = _run_cli(argv, contextlib.redirect_stdout)
    return {"exit_code": code, "stdout": stdout, "slides": slides}


JOBS["saliency"] = _saliency_cli_job


def test_two_ranks_map_a_csv_as_one_process(tmp_path):
    """torchrun shards saliency's slides: each rank writes the maps of every other slide,
    the same files one process writes, and rank 0 alone reports."""
    from sstream.cli import main
    from tests.test_saliency import make_checkpoint, make_slide

    names = ["a.tif", "b.tif", "c.tif"]
    for seed, name in enumerate(names):
        make_slide(tmp_path / name, seed=seed)
    (tmp_path / "list.csv").write_text("image\n" + "\n".join(names) + "\n")
    common = ["saliency", "--csv", str(tmp_path / "list.csv"), "-c",
              str(make_checkpoint(tmp_path / "ckpt.pt")), "--tile-size", "64", "--device",
              "cpu"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same float32 sums, bit for bit
    try:
        with contextlib.suppress(SystemExit):
            main([*common, "--out", str(tmp_path / "one")])
    finally:
        torch.set_num_threads(threads)
    outcomes = join_ranks(start_ranks(2, "saliency", {"argv": [*common, "--out",
                                                                str(tmp_path / "two")]},
                                      tmp_path))
    assert [o["exit_code"] for o in outcomes] == [0, 0]
    assert [o["slides"] for o in outcomes] == [["a.tif", "c.tif"], ["b.tif"]]
    assert "3 of 3 maps written" in outcomes[0]["stdout"] and outcomes[1]["stdout"] == ""
    written = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert written == ["a.png", "a.tif", "b.png", "b.tif", "c.png", "c.tif"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == written
    for name in written:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
