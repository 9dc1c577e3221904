"""Streamed and conventional training side by side: the paper's Imagenette figure, on our data.

The `tiny` model trains on `sample_data/train.csv` twice from the same seed, with the same
images, order, augmentation and optimizer: once conventionally (plain PyTorch on the whole
image) and once streamed as `sstream train` runs it (the whole-slide path: pooled tile by
tile, the backward re-run where the gradient goes; no tissue mask, which the conventional
model would not have). One loss per optimizer step is recorded for each; the two curves are
drawn over each other (in the results folder; a full run also refreshes docs/results.md's
`benchmarks/figures/equivalence.png`, a quick run leaves it alone), and
the largest difference of the losses and of the final weights is printed. float32: the two
differ by rounding only (float64 makes them equal to 1e-12, see tests). Standalone:
`python -m benchmarks.bench_equivalence [--quick]`.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sstream import StreamingCNN  # noqa: E402
from sstream.data import read_label_csv  # noqa: E402
from sstream.models import (  # noqa: E402
    ModelConfig,
    build_model,
    freeze_batchnorm,
    streamed_logits,
)
from sstream.plots import Panel, Series, line_plot  # noqa: E402
from sstream.train import TrainConfig, epoch_order, load_training_image  # noqa: E402

CSV = HERE.parent / "sample_data" / "train.csv"
FIGURE = HERE / "figures" / "equivalence.png"
ACCUMULATE, LR, TILE = 2, 3e-3, 256


def training_losses(streamed: bool, epochs: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Loss per optimizer step (mean over its images) and the final weights of one run."""
    samples = read_label_csv(CSV)
    config = TrainConfig(train_csv=str(CSV), seed=0)
    torch.manual_seed(0)
    model = build_model(ModelConfig("tiny"))
    freeze_batchnorm(model, train_affine=True)
    model.train()
    scnn = StreamingCNN(model.stream, TILE)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    losses = []
    for epoch in range(epochs):
        order = epoch_order(config.seed, epoch, len(samples))
        for start in range(0, len(order), ACCUMULATE):
            step_loss = 0.0
            for index in range(start, min(start + ACCUMULATE, len(order))):
                sample = samples[int(order[index])]
                source = load_training_image(sample, config, True, (epoch, 1, index))
                logits = (streamed_logits(model, scnn, source) if streamed
                          else model(source.to_tensor()))
                loss = F.cross_entropy(logits, torch.tensor([sample.label]))
                (loss / ACCUMULATE).backward()
                step_loss += loss.item() / ACCUMULATE
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
    return losses, {k: v.clone() for k, v in model.state_dict().items()}


def run(quick: bool = False) -> dict:
    epochs = 1 if quick else 4
    plain, plain_weights = training_losses(False, epochs)
    streamed, streamed_weights = training_losses(True, epochs)
    steps = list(range(1, len(plain) + 1))
    out = HERE / "results" / "equivalence.png"
    out.parent.mkdir(exist_ok=True)
    line_plot(out, [Panel(
        f"tiny on sample_data: training loss per optimizer step, float32, {epochs} epochs",
        [Series("conventional (plain PyTorch)", steps, plain),
         Series("streamed (sstream, tile 256)", steps, streamed)],
        xlabel="optimizer step", ylabel="loss")])
    if not quick:  # the committed figure is the full run's
        FIGURE.parent.mkdir(exist_ok=True)
        shutil.copyfile(out, FIGURE)
    loss_gap = max(abs(a - b) for a, b in zip(plain, streamed))
    weight_gap = max(((streamed_weights[k] - v).abs().max() / v.abs().max().clamp_min(1e-12))
                     .item() for k, v in plain_weights.items() if v.is_floating_point())
    return {"title": "Streamed vs conventional training (tiny, sample_data, same seed)",
            "columns": ["steps", "first loss", "last loss (conventional)",
                        "last loss (streamed)", "largest loss difference",
                        "largest relative weight difference"],
            "rows": [[len(steps), round(plain[0], 4), round(plain[-1], 4),
                      round(streamed[-1], 4), f"{loss_gap:.1e}", f"{weight_gap:.1e}"]],
            "notes": [f"figure: {out.relative_to(HERE.parent)}" + (
                "" if quick else f" (copied to {FIGURE.relative_to(HERE.parent)})")]}


if __name__ == "__main__":
    from benchmarks.run import standalone

    standalone(run)
