"""The GPU check: one command that says whether sstream is exact, fast and fed on a GPU.

    python benchmarks/gpu_check.py [--device cuda] [--small] [--out DIR]

Sections, each timed and reported even when another fails:
1. the tests that need CUDA (tests/test_cuda.py);
2. float64 exactness on the device: the engine (feature map, every parameter gradient, the
   input gradient), the pooled head (max and avg, `global_pool`) and saliency (the input
   gradient handed out block by block), each against plain autograd on the whole image;
3. an fp16 autocast training step, streamed against the same step under plain autocast;
4. ResNet-34 at 8192 px: a whole-slide training step's time and `max_memory_reserved`,
   streamed and plain (plain where it fits), and the memory estimate's error;
5. decode throughput with every core, alone and while the GPU computes, and a whole-slide
   predict's wall time against compute alone and decode alone;
6. nvJPEG (`torchvision.io.decode_jpeg` on the GPU) against the CPU pool on the same tiles.

`--device cpu --small` runs every section at toy sizes (the test suite does, so the script
cannot rot); on a GPU it is sized to finish within 8 minutes. The table is printed as it
grows and written to DIR/gpu_check.md and DIR/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass
class Check:
    device: torch.device
    small: bool
    work: Path
    rows: list[list[str]] = field(default_factory=list)

    def row(self, section: str, what: str, value: str, verdict: str = "") -> None:
        self.rows.append([section, what, value, verdict])
        print(f"| {section} | {what} | {value} | {verdict} |", flush=True)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def verdict(error: float, tolerance: float) -> str:
    return "ok" if error < tolerance else f"FAIL (> {tolerance:g})"


# -- 1. tests --------------------------------------------------------------------------------

def cuda_tests(check: Check) -> None:
    if check.device.type != "cuda":
        check.row("tests", "tests/test_cuda.py", "skipped", "no CUDA device")
        return
    began = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_cuda.py"], cwd=ROOT, capture_output=True, text=True,
                         check=False)
    last = (out.stdout.strip().splitlines() or ["(no output)"])[-1]
    check.row("tests", "tests/test_cuda.py", f"{last} ({time.perf_counter() - began:.0f} s)",
              "ok" if out.returncode == 0 else "FAIL")
    if out.returncode:
        print(out.stdout[-4000:], out.stderr[-2000:], flush=True)


# -- 2. float64 exactness ----------------------------------------------------------------------

def _trunk(dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """ResNet-18's trunk with random BatchNorm statistics (eval mode): every kind of layer
    the models stream (strided convolutions, max pooling, residual adds)."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.running_var, 0.5, 1.5)
            torch.nn.init.normal_(m.running_mean, 0, 0.3)
            torch.nn.init.normal_(m.weight, 1, 0.2)
            torch.nn.init.normal_(m.bias, 0, 0.2)
    trunk = torch.nn.Sequential(*list(net.children())[:-2])
    return trunk.eval().to(device, dtype)


def exactness(check: Check) -> None:
    from sstream.engine import StreamingCNN

    dtype, device = torch.float64, check.device
    size, tile = (160, 128) if check.small else (1024, 256)
    trunk = _trunk(dtype, device)
    params = [p for p in trunk.parameters()]
    torch.manual_seed(1)
    image = torch.rand(1, 3, size, size + 37, dtype=dtype, device=device)
    weights = torch.randn_like(trunk(image))

    def grads(run: Callable[[torch.Tensor], torch.Tensor]) -> tuple:
        leaf = image.clone().requires_grad_(True)
        out = run(leaf)
        loss = (out * weights).sum() if out.shape == weights.shape else out.sum()
        got = torch.autograd.grad(loss, [leaf, *params])
        return out.detach(), got[0], got[1:]

    scnn = StreamingCNN(trunk, tile)
    plain, streamed = grads(trunk), grads(scnn)
    worst = max(relative_error(a, b) for a, b in zip(streamed[2], plain[2]))
    check.row("float64", f"engine ({scnn.engine_for(image.shape)}): feature map",
              f"{relative_error(streamed[0], plain[0]):.1e}",
              verdict(relative_error(streamed[0], plain[0]), 1e-9))
    check.row("float64", "engine: input gradient",
              f"{relative_error(streamed[1], plain[1]):.1e}",
              verdict(relative_error(streamed[1], plain[1]), 1e-9))
    check.row("float64", f"engine: worst of {len(params)} parameter gradients", f"{worst:.1e}",
              verdict(worst, 1e-9))
    head = torch.randn(512, dtype=dtype, device=device)
    for mode, plain_pool in (("max", torch.nn.functional.adaptive_max_pool2d),
                             ("avg", torch.nn.functional.adaptive_avg_pool2d)):
        def pooled_plain(x: torch.Tensor, plain_pool=plain_pool) -> torch.Tensor:
            return plain_pool(trunk(x), 1).flatten(1) @ head

        def pooled_streamed(x: torch.Tensor, mode=mode) -> torch.Tensor:
            return scnn.global_pool(x, mode)[0] @ head

        plain, streamed = grads(pooled_plain), grads(pooled_streamed)
        errors = [relative_error(streamed[0], plain[0]), relative_error(streamed[1], plain[1]),
                  max(relative_error(a, b) for a, b in zip(streamed[2], plain[2]))]
        check.row("float64", f"pooled head ({mode}): value / input grad / worst param grad",
                  " / ".join(f"{e:.1e}" for e in errors), verdict(max(errors), 1e-9))
    saliency_exactness(check, trunk, scnn, image, head)


def saliency_exactness(check: Check, trunk: torch.nn.Module, scnn, image: torch.Tensor,
                       head: torch.Tensor) -> None:
    """The input gradient handed out block by block (saliency's path) against autograd's."""
    leaf = image.clone().requires_grad_(True)
    expected = torch.autograd.grad(
        torch.nn.functional.adaptive_max_pool2d(trunk(leaf), 1).flatten(1) @ head, leaf)[0]
    assembled = torch.zeros_like(image)

    def sink(box: tuple[int, int, int, int], grad: torch.Tensor) -> None:
        y0, y1, x0, x1 = box
        assembled[..., y0:y1, x0:x1] = grad

    values, _ = scnn.global_pool(image, "max", input_grad_sink=sink)
    torch.autograd.backward(values @ head)
    error = relative_error(assembled, expected)
    check.row("float64", "saliency: input gradient through the sink", f"{error:.1e}",
              verdict(error, 1e-9))


# -- 3. fp16 autocast --------------------------------------------------------------------------

def amp_step(check: Check) -> None:
    from sstream.engine import StreamingCNN

    if check.device.type != "cuda":
        check.row("fp16 AMP", "streamed vs plain autocast step", "skipped",
                  "fp16 autocast needs CUDA")
        return
    size, tile = (256, 128) if check.small else (2048, 512)
    trunk = _trunk(torch.float32, check.device)
    params = list(trunk.parameters())
    torch.manual_seed(2)
    image = torch.rand(1, 3, size, size, device=check.device)
    head = torch.randn(512, device=check.device)

    def step(run: Callable[[torch.Tensor], torch.Tensor], amp: bool = True) -> tuple:
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            loss = run(image).float().sum()
        return loss.detach(), torch.autograd.grad(loss, params)

    def errors(a: tuple, b: tuple) -> tuple[float, float]:
        return (relative_error(a[0], b[0]),
                max(relative_error(x, y) for x, y in zip(a[1], b[1])))

    scnn = StreamingCNN(trunk, tile)

    def plain_run(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_max_pool2d(trunk(x), 1).flatten(1).float() @ head

    plain, full = step(plain_run), step(plain_run, amp=False)
    streamed = step(lambda x: scnn.global_pool(x, "max")[0].float() @ head)
    # fp16 rounds differently in tiles, and max pooling's near-ties can flip: what matters is
    # that streamed AMP is as close to the float32 step as plain AMP is
    own, ours, between = errors(plain, full), errors(streamed, full), errors(streamed, plain)
    check.row("fp16 AMP", f"{size}² tile {tile}: loss / worst param grad vs float32, plain "
              "AMP | streamed AMP", f"{own[0]:.1e} / {own[1]:.1e} | {ours[0]:.1e} / "
              f"{ours[1]:.1e}", "ok" if max(ours[0] - 1.5 * own[0], ours[1] - 1.5 * own[1])
              < 1e-3 else "FAIL (streamed AMP further from float32 than plain AMP)")
    check.row("fp16 AMP", "streamed AMP vs plain AMP: loss / worst param grad",
              f"{between[0]:.1e} / {between[1]:.1e}", "")


# -- 4. ResNet-34 at 8192 px -------------------------------------------------------------------

def resnet34(check: Check) -> None:
    from sstream.estimate import EstimateConfig, estimate_memory

    size, tile = (256, 128) if check.small else (8192, 2048)
    streamed = _training_step(check, "resnet34", size, tile)
    check.row("ResNet-34", f"{size}² streamed step, tile {tile} (whole-slide, max pool)",
              f"{streamed[0]:.2f} s, {streamed[1] / 2**30:.2f} GiB reserved", "")
    plain_reserved = 0
    try:
        plain = _training_step(check, "resnet34", size, None)
        plain_reserved = plain[1]
        memory = f", {streamed[1] / plain[1]:.2f}x memory" if plain[1] else ""
        check.row("ResNet-34", f"{size}² plain step", f"{plain[0]:.2f} s, "
                  f"{plain[1] / 2**30:.2f} GiB reserved",
                  f"streamed {streamed[0] / plain[0]:.2f}x time{memory}")
    except torch.OutOfMemoryError:
        check.row("ResNet-34", f"{size}² plain step", "does not fit", "")
    finally:
        torch.cuda.empty_cache() if check.device.type == "cuda" else None
    estimate = estimate_memory(EstimateConfig([str(size)], "resnet34", tile_size=[tile]))
    for row in estimate.rows:
        measured = streamed[1] if row.get("tile_size") == tile else plain_reserved
        what = f"{row.get('path')} tile {tile}" if row.get("tile_size") else "plain"
        error = f"{row['peak_bytes'] / measured - 1:+.0%} of reserved" if measured else ""
        check.row("ResNet-34", f"memory estimate, {what}",
                  f"{row['peak_bytes'] / 2**30:.2f} GiB predicted", error)


def _training_step(check: Check, name: str, size: int, tile: int | None) -> tuple[float, int]:
    """(seconds of the second step, max_memory_reserved) of an AdamW step on one image."""
    from sstream.engine import StreamingCNN
    from sstream.models import ModelConfig, build_model, freeze_batchnorm, streamed_logits

    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, num_classes=2)).to(check.device).train()
    freeze_batchnorm(model, train_affine=True)  # as training does: batch statistics of one
    # image's tiles would not be the whole image's
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    image = torch.rand(1, 3, size, size, device=check.device)
    target = torch.tensor([1], device=check.device)
    scnn = StreamingCNN(model.stream, tile) if tile else None
    if check.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(check.device)
    seconds = 0.0
    for _ in range(2):  # the first step warms up kernels and the allocator
        check.sync()
        began = time.perf_counter()
        logits = streamed_logits(model, scnn, image) if scnn else model(image)
        torch.nn.functional.cross_entropy(logits, target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        check.sync()
        seconds = time.perf_counter() - began
    reserved = torch.cuda.max_memory_reserved(check.device) if check.device.type == "cuda" else 0
    del model, optimizer, image
    return seconds, reserved


# -- 5. decoding while computing ---------------------------------------------------------------

def jpeg_slide(check: Check, side: int | None = None) -> Path:
    """A JPEG-tiled (256 px, YCbCr, quality 90) slide: 8192 px (small: 1536), made from a
    synthetic slide repeated so that it is written fast, on every core."""
    import tifffile

    from sstream.io import open_image, write_synthetic_slide

    side = side or (1536 if check.small else 8192)
    path = check.work / f"jpeg_{side}.tif"
    if path.exists():
        return path
    seed_path = check.work / f"seed_{side}.tif"
    write_synthetic_slide(seed_path, side // 4 if check.small else 2048, label=1, seed=0)
    with open_image(seed_path) as seed:
        block = seed.read_level(0)
    pixels = np.tile(block, (side // block.shape[0], side // block.shape[1], 1))
    tifffile.imwrite(path, pixels, tile=(256, 256), photometric="rgb", compression="jpeg",
                     compressionargs={"level": 90}, maxworkers=os.cpu_count(),
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    return path


def decode_overlap(check: Check) -> None:
    from benchmarks.bench_read import raw_mps, sstream_mps, worker_counts
    from sstream.io.parallel import default_read_workers

    path = jpeg_slide(check)
    side = 1536 if check.small else 8192
    region = min(2048, side // 2)
    for workers in worker_counts():
        ours = sstream_mps(str(path), side, 4, workers, region=region)
        raw = raw_mps(str(path), side, 4, workers, region=region)
        check.row("decode", f"{workers} threads: sstream / raw imagecodecs pool",
                  f"{ours:.0f} / {raw:.0f} MP/s", f"{ours / raw:.2f}x (goal >= 0.8x)")
    workers = default_read_workers()
    alone = _decode_mps(path, side, workers)
    check.row("decode", f"{workers} threads, 2048² regions (alone)", f"{alone:.0f} MP/s", "")
    if check.device.type == "cuda":
        busy = threading.Event()
        load = threading.Thread(target=_keep_gpu_busy, args=(check.device, busy), daemon=True)
        load.start()
        try:
            during = _decode_mps(path, side, workers)
        finally:
            busy.set()
            load.join()
        check.row("decode", f"{workers} threads while the GPU multiplies matrices",
                  f"{during:.0f} MP/s", f"{during / alone:.2f}x alone")
    big = path if check.small else jpeg_slide(check, 16384)
    side = 1536 if check.small else 16384
    for tile in ((512,) if check.small else (1024, 2048)):
        predict_against_parts(check, big, side, tile)


def predict_against_parts(check: Check, path: Path, side: int, tile: int) -> None:
    """A whole-slide predict's wall time with 0, 1, 2 and 4 regions read ahead (and with
    nvJPEG on a GPU), against compute alone and decode alone."""
    from benchmarks.bench_read import predict_seconds

    def seconds(mode: str, **options: object) -> float:
        return predict_seconds(str(path), tile, mode, check.device, **options)

    compute, decode = seconds("compute"), seconds("decode")
    limit = (1.15 * max(compute, decode) if check.device.type == "cuda"
             else 1.05 * (compute + decode))
    check.row("predict", f"tiny {side}² tile {tile}: compute alone / decode alone",
              f"{compute:.2f} s / {decode:.2f} s", f"limit {limit:.2f} s")
    runs = [("no read-ahead", "serial", {}), *(
        (f"read-ahead {n}", "wall", {"read_ahead": n}) for n in (1, 2, 4))]
    if check.device.type == "cuda":
        runs.append(("read-ahead 2, nvJPEG", "wall", {"decoder": "nvjpeg"}))
    for name, mode, options in runs:
        wall = seconds(mode, **options)
        check.row("predict", f"tiny {side}² tile {tile}: {name}", f"{wall:.2f} s",
                  f"{'ok' if wall <= limit else 'MISSED'} ({wall / limit * 1.15:.2f}x "
                  f"{'max' if check.device.type == 'cuda' else 'sum'} of the parts)")


def _decode_mps(path: Path, side: int, workers: int) -> float:
    from benchmarks.bench_read import sstream_mps

    return sstream_mps(str(path), side, 4, workers, region=min(2048, side // 2))


def _keep_gpu_busy(device: torch.device, stop: threading.Event) -> None:
    a = torch.randn(4096, 4096, device=device)
    while not stop.is_set():
        for _ in range(20):
            a = torch.tanh(a @ a * 1e-3)
        torch.cuda.synchronize(device)


# -- 6. nvJPEG ---------------------------------------------------------------------------------

def nvjpeg(check: Check) -> None:
    from benchmarks.bench_read import regions
    from sstream.gpu_decode import JpegRegionReader
    from sstream.io import open_image

    path = jpeg_slide(check)
    side = 1536 if check.small else 8192
    boxes = regions(side, 4, region=1024 if check.small else 2048)
    with open_image(path) as slide:
        if not JpegRegionReader.supports(slide, 0):
            check.row("nvJPEG", "slide's tiles", "not baseline YCbCr JPEG", "FAIL")
            return
        reader = JpegRegionReader(slide, 0, check.device)
        reader(*boxes[0])  # decoder started
        results = {}
        for name, read in (("CPU pool", lambda b: slide.read_region((b[2], b[0]), 0, (
                b[3] - b[2], b[1] - b[0]))), ("decode_jpeg", lambda b: reader(*b))):
            check.sync()
            began = time.perf_counter()
            for box in boxes:
                read(box)
            check.sync()
            results[name] = sum((b[1] - b[0]) * (b[3] - b[2]) for b in boxes) / 1e6 / (
                time.perf_counter() - began)
        gpu = reader(*boxes[0]).cpu().numpy().astype(int)
        y0, y1, x0, x1 = boxes[0]
        cpu = slide.read_region((x0, y0), 0, (x1 - x0, y1 - y0)).astype(int)
    where = "GPU" if check.device.type == "cuda" else "CPU (torchvision's libjpeg)"
    check.row("nvJPEG", f"decode_jpeg on {where} / CPU pool",
              f"{results['decode_jpeg']:.0f} / {results['CPU pool']:.0f} MP/s",
              f"{results['decode_jpeg'] / results['CPU pool']:.2f}x: " + (
                  "nvJPEG, the default on CUDA, pays" if results["decode_jpeg"] >
                  results["CPU pool"] else "nvJPEG is slower here: --jpeg-decoder cpu"))
    check.row("nvJPEG", "pixels against the CPU decoder", f"max {np.abs(gpu - cpu).max()}, "
              f"mean {np.abs(gpu - cpu).mean():.3f} levels", "")


SECTIONS = [("tests", cuda_tests), ("float64", exactness), ("fp16 AMP", amp_step),
            ("ResNet-34", resnet34), ("decode", decode_overlap), ("nvJPEG", nvjpeg)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="toy sizes (the test suite's)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--only", nargs="*", help="run only these sections")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as work:
        check = Check(device, args.small, Path(work))
        print(f"gpu_check on {_machine(device)}\n", flush=True)
        print("| section | measurement | value | verdict |\n|---|---|---|---|", flush=True)
        failed = False
        for name, section in SECTIONS:
            if args.only and name not in args.only:
                continue
            began = time.perf_counter()
            try:
                section(check)
            except Exception as e:  # one section's failure must not hide the others'
                failed = True
                check.row(name, "error", f"{type(e).__name__}: {str(e)[:200]}", "FAIL")
                traceback.print_exc()
            print(f"  ({name}: {time.perf_counter() - began:.0f} s)", flush=True)
    failed = failed or any(r[3].startswith("FAIL") for r in check.rows)
    _write(args.out, device, check.rows)
    return 1 if failed else 0


def _machine(device: torch.device) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    return (f"{gpu}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}")


def _write(out: Path, device: torch.device, rows: list[list[str]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"GPU check on {_machine(device)}", "",
             "| section | measurement | value | verdict |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    (out / "gpu_check.json").write_text(json.dumps(
        {"machine": _machine(device), "rows": rows}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
