"""The pieces of the training job; `sstream.train` composes them into a run.

- `images`: how a training image is read (resolution, crop, augmentation, stain) and each
  epoch's order, both derived from (seed, epoch, position) so that a resume repeats them.
- `setup`: the run's parts built from its options (task, samples, model, streaming,
  optimizer, schedule), the output directory, and the checks made before the first step.
- `checkpoint`: `TrainState`, writing and restoring checkpoints, and the one resume check.
- `steps`: one epoch of optimizer steps, the images of each step shared among the ranks.
- `validation`: the streamed forward over the validation set, gathered from the ranks.
- `reporting`: `TrainEvents` (the caller renders them), each epoch's row, metrics.csv and
  curves.png.

The options (`TrainConfig`) stay with the job in `sstream.train`; the pieces read them and
never import the job.
"""
