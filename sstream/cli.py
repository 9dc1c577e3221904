"""The `sstream` command line: parse options, call the jobs, render results with rich.

Nothing here computes anything; every command is a thin wrapper over a function in the
package that can be called from Python as well. Errors a user can act on (an `SstreamError`,
a file that cannot be read or written, a bad value) are printed as one line on stderr with a
non-zero exit code; `--debug` shows the traceback instead. Any other exception is a bug in
sstream: its traceback is printed with a line asking for a report.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
import typer.core
from rich.console import Console

from sstream.errors import InputError, SstreamError, first_line

if TYPE_CHECKING:  # the jobs are imported when a command runs
    from sstream.saliency import SaliencyConfig
    from sstream.view import ViewConfig


def _clean_metavar(param: object) -> None:
    """No type after an on/off flag (typer shows `<bool>`), and a repeatable option's or
    argument's element type with `...` instead of a Python annotation (`<list[Path]>`)."""
    if not isinstance(param, (typer.core.TyperOption, typer.core.TyperArgument)):
        return
    if isinstance(param, typer.core.TyperOption) and param.metavar is None and param.is_flag:
        param.metavar = ""
    elif getattr(param, "multiple", False) or param.nargs != 1:
        from typing import get_args

        element = get_args(param.type_descriptor.annotation) or (str,)
        label = f"<{getattr(element[0], '__name__', 'str').lower()}>..."
        param.display_type_rich = lambda ctx: label  # typer: the type column of the help


# options whose values are names from a fixed list (or a path, for --tissue): any letter case
CHOICE_OPTIONS = frozenset({"amp_dtype", "backend", "balance", "device", "dtype", "engine",
                            "log", "loss", "method", "model", "optimizer", "pooling",
                            "schedule", "task"})


def _lower_choice(param: object) -> None:
    """`--engine HALO` is `--engine halo`: a choice option's value is read in lower case."""
    if getattr(param, "name", None) in CHOICE_OPTIONS and param.callback is None:
        param.callback = lambda ctx, param, value: (value.lower() if isinstance(value, str)
                                                    else value)


class _Commands(typer.core.TyperGroup):
    """Typer's command group, with clean metavars in every command's help and choices read
    in any letter case."""

    def get_command(self, ctx: typer.Context, cmd_name: str) -> typer.core.TyperCommand | None:
        command = super().get_command(ctx, cmd_name)
        for param in command.get_params(ctx) if command is not None else ():
            _clean_metavar(param)
            _lower_choice(param)
        return command

    def get_params(self, ctx: typer.Context) -> list:
        params = super().get_params(ctx)
        for param in params:
            _clean_metavar(param)
        return params


app = typer.Typer(
    name="sstream",
    cls=_Commands,
    help="Exact streaming training of CNNs on multi-megapixel and gigapixel images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console()
err_console = Console(stderr=True)
_state = {"debug": False}

EXIT_FAILURE = 1
EXIT_USAGE = 2


class UsageError(InputError):
    """A bad combination of options: exit code 2, like typer's own usage errors."""


def _show_version(value: bool) -> None:
    if value:
        from sstream import __version__

        console.print(f"sstream {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                 help="Print sstream's version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    compact_memory: bool = typer.Option(
        False, "--compact-memory", envvar="SSTREAM_COMPACT_MEMORY",
        help="CPU: keep the process's resident memory close to its live tensors (glibc "
             "returns every block above 1 MiB when freed), at a cost in time "
             "(docs/results.md)."),
    backend: str = typer.Option(
        "auto", "--backend", envvar="SSTREAM_BACKEND",
        help="What reads slides: auto (tifffile for TIFFs, OpenSlide for MIRAX, DICOM and "
             "other formats), tifffile or openslide."),
    read_workers: int | None = typer.Option(
        None, "--read-workers", envvar="SSTREAM_READ_WORKERS", metavar="N",
        help="Threads that decode a region's tiles [default: the cores available]."),
    jpeg_decoder: str = typer.Option(
        "auto", "--jpeg-decoder", envvar="SSTREAM_JPEG_DECODER", metavar="auto|nvjpeg|cpu",
        help="JPEG-tiled slides read for a CUDA model: auto/nvjpeg decode on the GPU "
             "(nvJPEG), cpu on the CPU pool."),
) -> None:
    """Exact streaming training of CNNs on multi-megapixel and gigapixel images."""
    import os

    from sstream.gpu_decode import JPEG_DECODERS
    from sstream.io import BACKENDS

    _state["debug"] = debug
    for name, value, choices in (("--backend", backend, BACKENDS),
                                 ("--jpeg-decoder", jpeg_decoder, JPEG_DECODERS)):
        if value.lower() not in choices:
            err_console.print(f"[bold red]error:[/bold red] {name} must be one of "
                              f"{', '.join(choices)}, got {value!r}", highlight=False)
            raise typer.Exit(EXIT_USAGE)
    # every open_image and PixelSource of this process (and of the ranks it starts)
    os.environ["SSTREAM_BACKEND"] = backend.lower()
    os.environ["SSTREAM_JPEG_DECODER"] = jpeg_decoder.lower()
    if read_workers is not None:
        if read_workers < 1:
            err_console.print(f"[bold red]error:[/bold red] --read-workers must be at least "
                              f"1, got {read_workers}", highlight=False)
            raise typer.Exit(EXIT_USAGE)
        os.environ["SSTREAM_READ_WORKERS"] = str(read_workers)
    if compact_memory:
        from sstream.runtime import compact_cpu_memory

        if not compact_cpu_memory():
            err_console.print("[yellow]--compact-memory needs glibc (Linux); ignored[/yellow]")


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can act on into one line on stderr and a non-zero exit, and
    anything else into its traceback and a request for a bug report (exit 1)."""
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        err_console.print("[red]interrupted[/red]")
        raise typer.Exit(130) from None
    except (UsageError, typer.BadParameter) as exc:
        _fail(exc, EXIT_USAGE)
    except typer.Abort:
        raise
    except (SstreamError, OSError) as exc:
        _fail(exc, EXIT_FAILURE)
    except Exception as exc:
        if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":  # torch's
            _fail(RuntimeError(f"{first_line(exc)} (a smaller --tile-size or a "
                               "--memory-budget fits; see estimate-memory)"), EXIT_FAILURE)
        _report_bug(exc)


def _report_bug(exc: BaseException) -> None:
    """An exception sstream did not raise on purpose: its traceback, then one line saying so."""
    import traceback

    from sstream import __version__

    if _state["debug"]:
        raise exc
    traceback.print_exception(exc, file=sys.stderr)
    err_console.print(f"[bold red]error:[/bold red] a bug in sstream {__version__} "
                      f"({type(exc).__name__}: {first_line(exc)}); please report it with "
                      "the command and the traceback above", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_FAILURE)


def _fail(exc: BaseException, code: int) -> None:
    if _state["debug"]:
        raise exc
    message = first_line(exc)
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in message:
        message = f"{message}: {exc.filename}"
    err_console.print(f"[bold red]error:[/bold red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _parse_size(text: str | None, option: str) -> tuple[int, int] | None:
    """'1024' or 'WxH' -> (height, width)."""
    if text is None:
        return None
    parts = text.lower().replace(" ", "").split("x")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        raise UsageError(f"{option} must be a positive integer or WxH, got {text!r}") from None
    if len(numbers) not in (1, 2) or min(numbers) <= 0:
        raise UsageError(f"{option} must be a positive integer or WxH, got {text!r}")
    width, height = (numbers[0], numbers[0]) if len(numbers) == 1 else numbers
    return (height, width)


def _check_read(level: int | None = None, mpp: float | None = None,
                assume_mpp: float | None = None,
                image_size: tuple[int, int] | None = None) -> None:
    """The read options checked where every job checks them (`ReadSpec`), answered as
    usage errors (exit 2)."""
    from sstream.reading import ReadSpec, ReadSpecError

    try:
        ReadSpec(level, mpp, assume_mpp, image_size)
    except ReadSpecError as exc:
        raise UsageError(str(exc)) from None


ASSUME_MPP_HELP = ("Level 0's µm per pixel for slides that do not state it (a CSV's mpp "
                   "column gives each slide its own); a stated one wins.")


def _tissue_choice(value: str | None) -> str | None:
    """--tissue: auto and none in any letter case; anything else names a mask file."""
    return value.lower() if value is not None and value.lower() in ("auto", "none") else value


def _renamed(value: object, old_value: object) -> object:
    """An option's value given by its name, or by its former name (hidden, still read)."""
    return value if old_value in (None, []) else old_value


DEVICE_HELP = "auto (CUDA when a GPU is there, else the CPU), cpu, cuda or cuda:N."


def _validated(config: Any) -> Any:
    """A job's config checked before the job starts (its `validate`): options that cannot
    work are a usage error (exit 2)."""
    try:
        config.validate()
    except InputError as exc:
        raise UsageError(str(exc)) from None
    return config


def _print_json(value: object) -> None:
    """A command's result as JSON on stdout (progress and notes stay on stderr)."""
    from sstream.cli_render import to_json

    print(to_json(value))


def _load_config_file(path: Path) -> dict:
    """Options from a TOML or YAML file; keys are option names (dashes or underscores)."""
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        text = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise UsageError("YAML config files need PyYAML (pip install pyyaml); "
                                 "or use TOML") from None
            values = yaml.safe_load(text) or {}
        else:
            import tomllib

            values = tomllib.loads(text)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"--config {path}: cannot parse ({exc})") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a table of option = value")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def _explicit(ctx: typer.Context, name: str) -> bool:
    """Whether the option was given on the command line (not its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


@app.command()
def train(
    ctx: typer.Context,
    train_csv: Path = typer.Option(
        None, help="CSV with header image,label (paths relative to the CSV; regression: label "
        "or label_<name> columns).", rich_help_panel="Data"),
    val_csv: Path = typer.Option(
        None, help="Validation CSV (same format).", rich_help_panel="Data"),
    task: str = typer.Option(
        "classification", help="classification (integer labels) or regression (numbers; one "
        "target per label_<name> column).", rich_help_panel="Data"),
    num_classes: int = typer.Option(
        None, help="Classes (default: 1 + largest label).", rich_help_panel="Data"),
    loss: str = typer.Option(
        "mse", help="Regression loss: mse, l1 or huber.", rich_help_panel="Data"),
    standardise: bool = typer.Option(
        True, help="Regression: the loss sees targets scaled by the training labels' mean and "
        "standard deviation (predictions stay in the label's units).", rich_help_panel="Data"),
    model: str = typer.Option(
        "tiny", help="tiny, resnet18, resnet34, resnet50, convnext_tiny or vgg16.",
        rich_help_panel="Model"),
    stream_layers: str = typer.Option(
        None, help="Stream up to this stage (e.g. layer3); the rest runs normally. Default: the "
        "whole trunk.", rich_help_panel="Model"),
    pooling: str = typer.Option(
        "max", help="Pooling of the head: max, avg, or attention (CLAM-SB's gated attention, "
        "trained end to end, memory flat in the slide's area).", rich_help_panel="Model"),
    attention_hidden: int = typer.Option(
        128, help="Hidden size of the gated attention (--pooling attention).",
        rich_help_panel="Model"),
    dropout: float = typer.Option(
        0.0, help="Dropout before the final linear layer.", rich_help_panel="Model"),
    weights: Path = typer.Option(
        None, help="torchvision-format state dict for the backbone (e.g. ImageNet weights "
        "downloaded beforehand).", rich_help_panel="Model"),
    pretrained: bool = typer.Option(
        False, help="torchvision's ImageNet weights (needs network; fails clearly offline).",
        rich_help_panel="Model"),
    train_bn_affine: bool = typer.Option(
        True, help="Train BatchNorm weight/bias (statistics stay frozen either way).",
        rich_help_panel="Model"),
    level: int = typer.Option(
        None, help="Pyramid level to read (0 = full resolution).", rich_help_panel="Reading"),
    mpp: float = typer.Option(
        None, help="Read every slide at exactly this many µm per pixel: the finest level not "
        "coarser, resized (antialiased).", rich_help_panel="Reading"),
    assume_mpp: float = typer.Option(None, help=ASSUME_MPP_HELP, rich_help_panel="Reading"),
    image_size: str = typer.Option(
        None, help="Crop or pad every image to this size (N or WxH; random crop in training, "
        "centre in validation).", rich_help_panel="Reading"),
    tissue: str = typer.Option(
        None, callback=_tissue_choice, help="auto: pool over tissue only, found on each slide's "
        "thumbnail (glass is neither read nor computed); none: every position. A CSV's mask "
        "column gives slides their own mask images. Check masks first with `sstream tissue`.",
        show_default="auto with a pooling head, else none", rich_help_panel="Reading"),
    augment: str = typer.Option(
        "standard", help="standard: flips, 90-degree rotations, light colour jitter; stain: "
        "also HED stain jitter (Tellez et al., drawn once per image); none. Seeded.",
        rich_help_panel="Reading"),
    no_augment: bool = typer.Option(
        False, "--no-augment", hidden=True, help="The same as --augment none.",
        rich_help_panel="Reading"),
    stain_normalize: str = typer.Option(
        None, help="macenko or reinhard: normalise each slide's stain colours to a reference "
        "H&E, fitted on its thumbnail; predict and saliency do the same.", show_default="none",
        rich_help_panel="Reading"),
    optimizer: str = typer.Option("adamw", help="adamw or sgd.", rich_help_panel="Training"),
    lr: float = typer.Option(0.001, help="Learning rate.", rich_help_panel="Training"),
    weight_decay: float = typer.Option(0.0001, help="Weight decay.", rich_help_panel="Training"),
    momentum: float = typer.Option(0.9, help="SGD momentum.", rich_help_panel="Training"),
    epochs: int = typer.Option(10, help="Epochs.", rich_help_panel="Training"),
    schedule: str = typer.Option(
        "cosine", help="Learning-rate schedule: cosine, step or constant (stepped per epoch).",
        rich_help_panel="Training"),
    step_size: int = typer.Option(
        10, help="Epochs between decays (step schedule).", rich_help_panel="Training"),
    step_gamma: float = typer.Option(
        0.1, help="Decay factor (step schedule).", rich_help_panel="Training"),
    accumulate: int = typer.Option(
        1, help="Images per optimizer step and rank (serial mini-batch; the step averages ranks "
        "x accumulate images).", rich_help_panel="Training"),
    amp: bool = typer.Option(
        False, help="Mixed precision (fp16 + GradScaler on CUDA, bf16 on CPU).",
        rich_help_panel="Streaming"),
    amp_dtype: str = typer.Option(
        None, help="Force the AMP dtype: bf16 or fp16.", rich_help_panel="Streaming"),
    seed: int = typer.Option(
        0, help="Seed for order, crops, augmentation and init.", rich_help_panel="Training"),
    tile_size: int = typer.Option(
        512, help="Tile side in input pixels (memory follows it).", rich_help_panel="Streaming"),
    memory_budget: str = typer.Option(
        None, help="Choose the largest tile whose predicted peak fits, e.g. 8GiB (instead of "
        "--tile-size); with --engine auto, the crop engine where no halo tile fits.",
        rich_help_panel="Streaming"),
    engine: str = typer.Option(
        "auto", help="Streaming engine: auto (halos carried between tiles where the stream "
        "allows it: fastest), halo or crop (keeps no halo strips: less memory for small tiles "
        "on huge images).", rich_help_panel="Streaming"),
    whole_slide: bool = typer.Option(
        True, help="With a pooling head (the whole trunk streamed), pool tile by tile: no "
        "feature map is kept and the backward re-runs only the tiles the gradient reaches, so "
        "memory does not grow with the slide. --no-whole-slide keeps the feature map (can be "
        "faster on small images whose maxima reach most tiles).", rich_help_panel="Streaming"),
    device: str = typer.Option("auto", help=DEVICE_HELP, rich_help_panel="Streaming"),
    balance: str = typer.Option(
        "none", help="Class imbalance: none (the cohort as it is; probabilities keep its "
        "prevalence), sampler (each epoch draws classes equally often) or loss (cross-entropy "
        "weighted by inverse class frequency).", rich_help_panel="Cohort"),
    patience: int = typer.Option(
        None, help="Stop after this many epochs without a better best.pt (its validation "
        "metric).", show_default="off", rich_help_panel="Cohort"),
    min_epochs: int = typer.Option(
        0, help="Never stop early before this many epochs.", rich_help_panel="Cohort"),
    out: Path = typer.Option(
        Path("runs/sstream"), help="Output directory.", rich_help_panel="Output"),
    config: Path = typer.Option(
        None, help="TOML or YAML file with any of these options; the command line wins.",
        rich_help_panel="Output"),
    resume: Path = typer.Option(
        None, help="Continue the run in this output directory.", rich_help_panel="Output"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start afresh in an output directory that holds a run.",
        rich_help_panel="Output"),
    log: str = typer.Option(
        "tensorboard", help="tensorboard: every epoch's metrics, losses, learning rate, speed "
        "and memory in OUT/tensorboard (when tensorboard is installed: pip install "
        "sstream[tensorboard]); none: only metrics.csv.", rich_help_panel="Output"),
    quiet: bool = typer.Option(False, help="No progress output.", rich_help_panel="Output"),
    json_events: bool = typer.Option(
        False, "--json", help="Machine-readable events, one JSON object per line.",
        rich_help_panel="Output"),
    dist_timeout: float = typer.Option(
        600.0, help="Under torchrun: seconds a rank waits for the others before the job stops.",
        rich_help_panel="Distributed"),
) -> None:
    """Train a CNN end-to-end on whole images with image-level labels (streaming).

    Data parallel on several GPUs or machines: torchrun --nproc_per_node=N -m sstream train ...
    """
    import os
    import signal
    from dataclasses import fields

    from sstream.cli_render import JsonTrainEvents, RichTrainEvents, print_train_end
    from sstream.train import ResumeMismatch, TrainConfig, TrainEvents, resume_config
    from sstream.train import train as run_training

    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone reports
    with user_errors():
        names = [f.name for f in fields(TrainConfig)]
        given = {name: value for name, value in ctx.params.items() if name in names}
        given["image_size"] = _parse_size(image_size, "--image-size")
        if no_augment:
            given["augment"] = "none"
        for key in ("train_csv", "val_csv", "out", "weights"):
            given[key] = str(given[key]) if given[key] is not None else None
        from_file = _load_config_file(config) if config is not None else {}
        unknown = sorted(set(from_file) - set(names))
        if unknown:
            raise UsageError(f"--config {config}: unknown options {', '.join(unknown)}")
        for name, value in from_file.items():
            if not _explicit(ctx, name):
                given[name] = _parse_size(str(value), "image_size") if (
                    name == "image_size" and value is not None) else value
        if resume is not None:  # the original command, run again, continues its run
            chosen = {n: given[n] for n in names if _explicit(ctx, n) or n in from_file}
            try:
                settings = resume_config(resume, chosen)
            except ResumeMismatch as exc:
                raise UsageError(str(exc)) from None
        else:
            settings = TrainConfig.from_dict(given)
            if not settings.train_csv:
                raise UsageError("--train-csv is required (or --resume DIR)")
            _check_read(settings.level, settings.mpp, settings.assume_mpp, settings.image_size)
        events: TrainEvents = (TrainEvents() if quiet or not main_rank else JsonTrainEvents()
                               if json_events else RichTrainEvents(err_console))
        stop = {"signal": None}

        def request_stop(signum: int, frame: object) -> None:
            if stop["signal"] is not None:  # second signal: leave now
                raise KeyboardInterrupt
            stop["signal"] = signum
            if main_rank:
                err_console.print("\n[yellow]stopping after the current image, or step with "
                                  "several ranks (again to abort)[/yellow]")

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            result = run_training(settings, events, resume=resume is not None,
                                  overwrite=overwrite, should_stop=lambda: bool(stop["signal"]))
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if hasattr(events, "close"):
                events.close()
        if result.interrupted or not (quiet or json_events):
            print_train_end(err_console, result)
        if result.interrupted:
            raise typer.Exit(130 if stop["signal"] == signal.SIGINT else 143)


# ---- predict --------------------------------------------------------------------------------


@app.command()
def predict(
    images: list[Path] = typer.Argument(None, help="Slides or images to predict."),
    csv: Path = typer.Option(None, help="CSV with an image column (and optional labels) "
                             "instead of IMAGES.", rich_help_panel="Data"),
    checkpoint: Path = typer.Option(..., help="Checkpoint written by sstream train.",
                                    rich_help_panel="Model"),
    level: int = typer.Option(None, help="Pyramid level to read.",
                              show_default="as the model was trained", rich_help_panel="Reading"),
    mpp: float = typer.Option(None, help="Read at exactly this many µm per pixel.",
                              show_default="as the model was trained", rich_help_panel="Reading"),
    assume_mpp: float = typer.Option(None, help=ASSUME_MPP_HELP, rich_help_panel="Reading"),
    image_size: str = typer.Option(None, help="Centre crop or pad to N or WxH; whole: the "
                                   "whole image.", show_default="as the model was trained",
                                   rich_help_panel="Reading"),
    tissue: str = typer.Option(None, callback=_tissue_choice, help="auto, none, or a mask "
                               "image (one slide); a CSV's "
                               "mask column gives slides their own masks.",
                               show_default="as the model was trained", rich_help_panel="Reading"),
    tile_size: int = typer.Option(None, help="Tile side in input pixels.",
                                  show_default="training's, else 512", rich_help_panel="Streaming"),
    device: str = typer.Option("auto", help=DEVICE_HELP, rich_help_panel="Streaming"),
    amp: bool = typer.Option(False, help="Mixed precision inference.", rich_help_panel="Streaming"),
    out: Path = typer.Option(None, help="Write predictions to this CSV (columns image, "
                             "prob_<class>..., pred[, label]).", rich_help_panel="Output"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output "
                                   "file.", rich_help_panel="Output"),
    quiet: bool = typer.Option(False, help="Print only errors.", rich_help_panel="Output"),
    json_output: bool = typer.Option(False, "--json", help="Print the predictions, "
                                     "evaluations and failures as JSON instead of tables.",
                                     rich_help_panel="Output"),
) -> None:
    """Predict class probabilities (or regression values) for slides with a trained
    checkpoint (streaming forward)."""
    import os

    from sstream.cli_render import RichPredictEvents, print_notes, print_predictions
    from sstream.predict import PredictConfig, PredictEvents
    from sstream.predict import predict as run_prediction

    with user_errors():
        whole = image_size is not None and image_size.lower() == "whole"
        size = None if whole else _parse_size(image_size, "--image-size")
        config = PredictConfig(
            checkpoint=str(checkpoint), images=[str(i) for i in images or []],
            csv=str(csv) if csv else None, out=str(out) if out else None, level=level,
            mpp=mpp, assume_mpp=assume_mpp, image_size=size, whole_image=whole,
            tile_size=tile_size,
            device=device, amp=amp, overwrite=overwrite, tissue=tissue)
        try:
            config.validate()
        except InputError as exc:
            raise UsageError(str(exc)) from None
        rank = int(os.environ.get("RANK", "0"))  # under torchrun, rank 0 alone reports
        events = PredictEvents() if quiet or json_output or rank else \
            RichPredictEvents(err_console)
        try:
            result = run_prediction(config, events)
        finally:
            if hasattr(events, "close"):
                events.close()
        if result.rank:
            return
        print_notes(err_console, result.notes)
        if json_output:
            _print_json(result)
        elif not quiet:
            print_predictions(console, result)
        for image, reason in result.failures:
            err_console.print(f"[bold red]error:[/bold red] {image}: {reason}", highlight=False)
        if result.failures:
            raise typer.Exit(EXIT_FAILURE)


# ---- saliency -------------------------------------------------------------------------------


@app.command()
def saliency(
    slides: list[str] = typer.Argument(None, help="Slides or images to explain (tiled/"
                                       "pyramidal TIFF, SVS, OME-TIFF, PNG, JPEG)."),
    csv: str | None = typer.Option(None, "--csv", help="CSV with an image column (and "
                                   "optional mask and mpp columns) instead of SLIDES.",
                                   rich_help_panel="Data"),
    checkpoint: str = typer.Option(..., "--checkpoint", "-c",
                                   help="sstream checkpoint (.pt) of the trained model.",
                                   rich_help_panel="Model"),
    class_index: str | None = typer.Option(
        None, "--class", help="Class whose logit is explained: its name (string labels) or "
        "index.",
        show_default="the predicted class", rich_help_panel="Map"),
    target: int | None = typer.Option(
        None, "--target", help="Regression models: the target (0-based) whose predicted "
        "value is explained.", show_default="the first", rich_help_panel="Map"),
    method: str = typer.Option(
        "gradient", "--method",
        help="gradient: max over colour channels of |d logit / d pixel| (Simonyan et al.); "
             "gradient-x-input: sum over channels of pixel x gradient (signed).",
             rich_help_panel="Map"),
    level: int | None = typer.Option(
        None, "--level", help="Slide pyramid level to read (the model's input).",
        show_default="as the model was trained", rich_help_panel="Reading"),
    mpp: float | None = typer.Option(
        None, "--mpp", help="Read at exactly this many µm per pixel (the map then has this "
        "resolution).", show_default="as the model was trained", rich_help_panel="Reading"),
    assume_mpp: float | None = typer.Option(None, "--assume-mpp", help=ASSUME_MPP_HELP,
                                            rich_help_panel="Reading"),
    tissue: str | None = typer.Option(
        None, "--tissue", callback=_tissue_choice,
        help="auto, none or a mask image: the prediction pools over tissue "
        "and the map is zero on glass.", show_default="as the model was trained",
        rich_help_panel="Reading"),
    tile_size: int = typer.Option(
        256, "--tile-size", help="Streaming tile side in pixels. Memory grows with it: "
        "larger tiles take more memory and less time (docs/results.md).",
        rich_help_panel="Streaming"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP, rich_help_panel="Streaming"),
    out: str | None = typer.Option(
        None, "--out", "-o", help="Map TIFF to write; with several slides or --csv, the "
        "folder of the maps (<slide stem>.tif and .png).",
        show_default="<slide>.saliency.tif", rich_help_panel="Output"),
    overview: str | None = typer.Option(
        None, "--overview", help="PNG overview to write.",
        show_default="<slide>.saliency.png", rich_help_panel="Output"),
    no_overview: bool = typer.Option(False, "--no-overview", help="Write no PNG overview.",
                                     rich_help_panel="Output"),
    uint8: bool = typer.Option(
        False, "--uint8", help="Write uint8 quantised with a percentile scale (recorded in the "
                               "TIFF description) instead of float32.", rich_help_panel="Output"),
    percentile: float = typer.Option(
        99.5, "--percentile", help="Percentile of the non-zero |values| that sets the uint8 "
                                   "scale and the overview's colour range.",
                                   rich_help_panel="Output"),
    geojson: str | None = typer.Option(
        None, "--geojson", help="Also write the map's strongest regions as QuPath "
        "annotations (GeoJSON polygons in level-0 pixels, with peak and mean), traced at "
        "the overview's resolution.", rich_help_panel="Output"),
    contour_percentile: float = typer.Option(
        95.0, "--contour-percentile", help="--geojson: outline the regions at or above "
        "this percentile of the map's non-zero |values|.", rich_help_panel="Output"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs.",
                                   rich_help_panel="Output"),
    view: bool = typer.Option(False, "--view", help="Then serve the slide with the map in "
                              "the browser viewer (sstream view) on port 8000.",
                              rich_help_panel="Output"),
    json_output: bool = typer.Option(False, "--json", help="Print what was written and "
                                     "found as JSON.", rich_help_panel="Output"),
) -> None:
    """Write a full-resolution saliency map of a slide as a pyramidal TIFF and a PNG overview
    (several slides or a CSV: one map per slide, shared among the ranks under torchrun)."""
    from pathlib import Path

    from sstream.cli_render import SlideProgress, print_notes, print_saliency
    from sstream.saliency import (
        SaliencyConfig,
        SaliencyOptionError,
        compute_saliency,
        default_output_paths,
    )
    from sstream.view import ViewConfig

    with user_errors():
        if overview is not None and no_overview:
            raise UsageError("give --overview PATH or --no-overview, not both")
        if class_index is not None and target is not None:
            raise UsageError("give --class (classification) or --target (regression), not both")
        _check_read(level, mpp, assume_mpp)
        config = SaliencyConfig(
            index=class_index if target is None else target, level=level, mpp=mpp,
            assume_mpp=assume_mpp, method=method, uint8=uint8, percentile=percentile,
            tile_size=tile_size, device=device, tissue=tissue,
            contour_percentile=contour_percentile, overwrite=overwrite)
        if bool(slides) == (csv is not None):
            raise UsageError("give slides or --csv list.csv, not both" if slides else
                             "no slides given: pass slide paths or --csv list.csv")
        if csv is not None or len(slides) != 1:
            if overview is not None or view or geojson is not None:
                raise UsageError("--overview, --geojson and --view name one slide's files; "
                                 "with several slides or --csv, --out names their folder")
            _saliency_of_slides(slides or [], csv, checkpoint, out, not no_overview,
                                json_output, config)
            return
        slide = slides[0]
        out_path, overview_path = default_output_paths(slide, out)
        if overview is not None:
            overview_path = Path(overview)
        elif no_overview:
            overview_path = None
        progress = SlideProgress(err_console)
        try:
            result = compute_saliency(
                slide, checkpoint, out_path, overview=overview_path, progress=progress,
                config=config, geojson=geojson)
        except SaliencyOptionError as exc:
            raise UsageError(str(exc)) from None
        finally:
            progress.close()
        print_notes(err_console, result.notes)
        if json_output:
            _print_json(result)
        else:
            print_saliency(console, result)
        if view:
            serve(Path(slide), ViewConfig([str(result.out)]))


def _saliency_of_slides(slides: list[str], csv: str | None, checkpoint: str, out: str | None,
                        overviews: bool, json_output: bool, config: SaliencyConfig) -> None:
    """`sstream saliency` over several slides: a line per slide, rank 0's summary, and exit 1
    if any slide was skipped."""
    import os

    from rich.markup import escape

    from sstream.cli_render import RichSaliencyEvents, print_notes
    from sstream.saliency import SaliencyEvents, SaliencyOptionError, saliency_for_slides

    rank = int(os.environ.get("RANK", "0"))  # under torchrun, rank 0 alone reports
    events = RichSaliencyEvents(err_console) if rank == 0 else SaliencyEvents()
    try:
        result = saliency_for_slides(checkpoint, slides, csv, out, overviews, config,
                                     events=events)
    except SaliencyOptionError as exc:
        raise UsageError(str(exc)) from None
    finally:
        if hasattr(events, "close"):
            events.close()
    if result.rank:
        return
    print_notes(err_console, dict.fromkeys(n for r in result.maps.values() for n in r.notes))
    if json_output:
        _print_json(result)
    else:
        console.print(f"{len(result.maps)} of {result.slides} maps written "
                      + (f"to {out}" if out else "beside their slides"), highlight=False)
    for name, reason in result.failures.items():
        err_console.print(f"[bold red]error:[/bold red] {escape(f'{name}: {reason}')}",
                          highlight=False, soft_wrap=True)
    if result.failures:
        raise typer.Exit(EXIT_FAILURE)


@app.command("heatmap")
def heatmap(
    slide: str = typer.Argument(..., help="Slide or image to map (as for saliency)."),
    checkpoint: str = typer.Option(..., "--checkpoint", "-c",
                                   help="sstream checkpoint (.pt) of the trained model.",
                                   rich_help_panel="Model"),
    class_index: str | None = typer.Option(
        None, "--class", help="Max/avg heads: the class (name or index; a regression's "
        "target index) whose activation map is drawn.", show_default="the predicted class",
        rich_help_panel="Map"),
    level: int | None = typer.Option(None, "--level", help="Slide pyramid level to read.",
                                     show_default="as the model was trained",
                                     rich_help_panel="Reading"),
    mpp: float | None = typer.Option(None, "--mpp", help="Read at exactly this many µm per "
                                     "pixel.", show_default="as the model was trained",
                                     rich_help_panel="Reading"),
    assume_mpp: float | None = typer.Option(None, "--assume-mpp", help=ASSUME_MPP_HELP,
                                            rich_help_panel="Reading"),
    tissue: str | None = typer.Option(
        None, "--tissue", callback=_tissue_choice,
        help="auto, none or a mask image: the map is zero off the tissue.",
        show_default="as the model was trained", rich_help_panel="Reading"),
    tile_size: int = typer.Option(512, "--tile-size", help="Streaming tile side in pixels.",
                                  rich_help_panel="Streaming"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP, rich_help_panel="Streaming"),
    out: str = typer.Option(..., "--out", "-o", help="Map TIFF to write (pyramidal, float32, "
                            "one pixel per output position of the stream).",
                            rich_help_panel="Output"),
    geojson: str | None = typer.Option(
        None, "--geojson", help="Also write the map's strongest regions as QuPath "
        "annotations (GeoJSON polygons in level-0 pixels, with peak and mean).",
        rich_help_panel="Output"),
    contour_percentile: float = typer.Option(
        95.0, "--contour-percentile", help="--geojson: outline the regions at or above "
        "this percentile of the map's non-zero values.", rich_help_panel="Output"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs.",
                                   rich_help_panel="Output"),
    json_output: bool = typer.Option(False, "--json", help="Print what was written as JSON.",
                                     rich_help_panel="Output"),
) -> None:
    """Write where the model looked: an attention head's weights, or a max/avg head's class
    activation map, as a pyramidal TIFF that overlays the slide (sstream view, QuPath)."""
    from sstream.cli_render import print_heatmap
    from sstream.heatmap import HeatmapConfig, HeatmapError, compute_heatmap

    with user_errors():
        _check_read(level, mpp, assume_mpp)
        try:
            result = compute_heatmap(slide, checkpoint, out, HeatmapConfig(
                index=class_index, level=level, mpp=mpp, assume_mpp=assume_mpp,
                tile_size=tile_size, device=device, tissue=tissue,
                contour_percentile=contour_percentile, overwrite=overwrite), geojson=geojson)
        except HeatmapError as exc:
            raise UsageError(str(exc)) from None
        if json_output:
            _print_json(result)
        else:
            print_heatmap(console, result)


# ---- verify -------------------------------------------------------------------------------


@app.command("verify")
def verify_command(
    image: Path = typer.Option(None, "--image", help="A slide or image (its centre at "
                               "--image-size) instead of random pixels.", rich_help_panel="Data"),
    seed: int = typer.Option(0, "--seed", help="Seed of the random pixels.",
                             rich_help_panel="Data"),
    model: str = typer.Option("resnet18", "--model", help="Model name (see train --model).",
                              rich_help_panel="Model"),
    stream_layers: str | None = typer.Option(
        None, "--stream-layers", help="Stream up to this stage (as for train).",
        show_default="the whole trunk", rich_help_panel="Model"),
    weights: Path = typer.Option(None, "--weights", help="torchvision-format backbone "
                                 "weights, as for train.", rich_help_panel="Model"),
    pooling: str = typer.Option("max", "--pooling", help="The head's pooling, as for train: "
                                "max, avg or attention.", rich_help_panel="Model"),
    image_size: str = typer.Option("1024", "--image-size", help="Input size: N (square) or "
                                   "WxH.", rich_help_panel="Reading"),
    size: str = typer.Option(None, "--size", hidden=True, help="Former --image-size.",
                             rich_help_panel="Reading"),
    level: int = typer.Option(None, "--level", help="--image: the pyramid level to read.",
                              show_default="0", rich_help_panel="Reading"),
    mpp: float = typer.Option(None, "--mpp", help="--image: read at exactly this many µm "
                              "per pixel.", rich_help_panel="Reading"),
    assume_mpp: float = typer.Option(None, "--assume-mpp", help=ASSUME_MPP_HELP,
                                     rich_help_panel="Reading"),
    tile_size: int = typer.Option(512, "--tile-size", help="Streaming tile side in pixels.",
                                  rich_help_panel="Streaming"),
    dtype: str = typer.Option("float64", "--dtype", help="float64 (exactness, tolerance "
                              "1e-9) or float32 (tolerance 1e-4).", rich_help_panel="Streaming"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP, rich_help_panel="Streaming"),
    json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table.",
                                     rich_help_panel="Output"),
) -> None:
    """Check that streaming trains exactly as conventional backprop, for your model and size.

    Runs one training step both ways on the same input and prints the largest relative
    difference of the logits, the input gradient and every parameter gradient, with the
    time and peak memory of each. Exit code 1 if a difference exceeds the tolerance.
    """

    from sstream.cli_render import verification_table
    from sstream.verify import VerifyConfig, verify

    with user_errors():
        parsed = _parse_size(_renamed(image_size, size), "--image-size")
        assert parsed is not None
        _check_read(level, mpp, assume_mpp)
        with err_console.status("one training step conventionally, then streamed"):
            result = verify(VerifyConfig(
                model=model, image_size=parsed, tile_size=tile_size, stream_layers=stream_layers,
                dtype=dtype, weights=str(weights) if weights else None,
                image=str(image) if image else None, device=device, seed=seed, level=level,
                mpp=mpp, assume_mpp=assume_mpp, pooling=pooling))
        if json_output:
            _print_json(result)
        else:
            console.print(verification_table(result))
            if result.cropped_because:
                console.print(f"[yellow]{result.cropped_because}[/yellow]", highlight=False)
        if not result.passed:
            raise typer.Exit(EXIT_FAILURE)


# ---- tissue -------------------------------------------------------------------------------


@app.command("tissue")
def tissue_command(
    slide: Path = typer.Argument(..., help="Slide or image whose tissue to find."),
    tissue: str = typer.Option("auto", "--tissue", callback=_tissue_choice, help="auto "
                               "(detect) or a mask image to check against the slide.",
                               rich_help_panel="Reading"),
    out: Path = typer.Option(None, "--out", "-o", help="Preview PNG: the slide with glass "
                             "dimmed and the tissue outlined.",
                             show_default="<slide>.tissue.png", rich_help_panel="Output"),
    mask: Path = typer.Option(None, "--mask", help="Also write the mask as a PNG (255 = "
                              "tissue) to edit and pass back as --tissue PATH.",
                              rich_help_panel="Output"),
    max_side: int = typer.Option(1024, "--max-side", help="Longer side of the preview (px).",
                                 rich_help_panel="Output"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing outputs.",
                                   rich_help_panel="Output"),
    json_output: bool = typer.Option(False, "--json", help="Print what was found and written "
                                     "as JSON.", rich_help_panel="Output"),
) -> None:
    """Preview the tissue mask of a slide before a long run: what --tissue auto pools over."""
    from sstream.cli_render import print_tissue
    from sstream.tissue import TissueConfig, preview_tissue

    with user_errors():
        config = _validated(TissueConfig(
            out=None if out is None else str(out), tissue=tissue,
            mask=None if mask is None else str(mask), max_side=max_side, overwrite=overwrite))
        result = preview_tissue(slide, config)
        if json_output:
            _print_json(result)
        else:
            print_tissue(console, result)
        if result.fraction == 0:
            err_console.print("[yellow]no tissue found: with --tissue auto the jobs use the "
                              "whole image (a grayscale, fluorescence or empty slide?); give a "
                              "mask file to restrict it[/yellow]")
            raise typer.Exit(EXIT_FAILURE)


# ---- view -----------------------------------------------------------------------------------


@app.command("view")
def view_command(
    slide: Path = typer.Argument(..., help="Slide to look at."),
    overlays: list[Path] = typer.Option(None, "--overlay", help="Saliency map (pyramidal TIFF "
                                        "from sstream saliency) to overlay; repeatable."),
    port: int = typer.Option(8000, "--port", help="Port (0: any free one)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (default: "
                             "this machine only; reach it over SSH with ssh -L)."),
    tissue: str = typer.Option("none", "--tissue", callback=_tissue_choice, help="Outline "
                               "the tissue: auto (found as the jobs find it), a mask image, "
                               "or none."),
) -> None:
    """Serve a deep-zoom viewer of a slide and its saliency maps to a web browser."""
    from sstream.view import ViewConfig

    with user_errors():
        serve(slide, _validated(ViewConfig([str(path) for path in overlays or []], port, host,
                                           tissue)))


def serve(slide: Path, config: ViewConfig) -> None:
    """Run the viewer's server until Ctrl-C (shared by view and saliency --view)."""
    from sstream.view import make_server, url_of

    server = make_server(slide, config)
    console.print(f"viewing {slide.name} at [bold]{url_of(server)}[/bold] (Ctrl-C to stop; "
                  f"from another machine: ssh -L {server.server_address[1]}:localhost:"
                  f"{server.server_address[1]} this-host)", highlight=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        console.print("stopped")
    finally:
        server.server_close()
        server.source.close()


# ---- info -----------------------------------------------------------------------------------


@app.command("info")
def info_command(
    slides: list[Path] = typer.Argument(..., help="Slides or images to describe."),
    mpp: float = typer.Option(None, "--mpp", help="Also say how --mpp would read each slide: "
                              "the level, its resize factor, the size read.",
                              rich_help_panel="Reading"),
    assume_mpp: float = typer.Option(None, "--assume-mpp", help=ASSUME_MPP_HELP,
                                     rich_help_panel="Reading"),
    thumbnail: Path = typer.Option(None, "--thumbnail", help="Write a PNG thumbnail (one "
                                   "slide).", rich_help_panel="Output"),
    max_side: int = typer.Option(1024, "--max-side", help="Longer side of the thumbnail.",
                                 rich_help_panel="Output"),
    json_output: bool = typer.Option(False, "--json", help="One JSON record per slide, as a "
                                     "list.", rich_help_panel="Output"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the thumbnail.",
                                   rich_help_panel="Output"),
) -> None:
    """Format, backend, levels, resolution, objective and associated images of slides."""

    from sstream.cli_render import info_table
    from sstream.info import InfoConfig, describe_slides, write_slide_thumbnail

    with user_errors():
        if thumbnail is not None and len(slides) > 1:
            raise UsageError("--thumbnail writes one slide's thumbnail: give one slide")
        config = _validated(InfoConfig(mpp, assume_mpp, None if thumbnail is None
                                       else str(thumbnail), max_side, overwrite))
        found = describe_slides(slides, config)
        records, failures = found.records, found.failures
        if json_output:
            _print_json(records + [{"path": str(path), "error": reason}
                                   for path, reason in failures])
        else:
            for record in records:
                console.print(info_table(record))
        for _, reason in failures:
            err_console.print(f"[bold red]error:[/bold red] {reason}", highlight=False,
                              soft_wrap=True)
        if failures:
            raise typer.Exit(EXIT_FAILURE)
        if thumbnail is not None:
            written = write_slide_thumbnail(slides[0], config)
            (err_console if json_output else console).print(
                f"thumbnail ({written.width} x {written.height} px): {written.path}",
                highlight=False)


# ---- estimate-memory ------------------------------------------------------------------------


@app.command("estimate-memory")
def estimate_memory(
    model: str = typer.Option("resnet34", "--model", help="Model name (see sstream.models).",
                              rich_help_panel="Model"),
    stream_layers: str | None = typer.Option(
        None, "--stream-layers", help="Stream up to and including this stage (resnet: "
        "layer1..layer4; convnext_tiny/tiny: stage1..stage4; vgg16: block1..block5).",
        show_default="the whole trunk", rich_help_panel="Model"),
    pooling: str = typer.Option("max", "--pooling", help="The head's pooling, as for train: "
                                "max, avg or attention.", rich_help_panel="Model"),
    image_size: list[str] = typer.Option(
        [], "--image-size", help="Image size: 8192 (square) or 8192x6144 (width x height); "
                                 "repeat for several.", show_default="required",
                                 rich_help_panel="Reading"),
    size: list[str] = typer.Option([], "--size", hidden=True, help="Former --image-size.",
                                   rich_help_panel="Reading"),
    optimizer: str = typer.Option("adamw", "--optimizer", help="adamw or sgd (momentum).",
                                  rich_help_panel="Training"),
    tile_size: list[str] = typer.Option(
        [], "--tile-size", help="Streaming tile side in pixels; repeat for several.",
        show_default="512 1024 2048 4096 (those not larger than the image)",
        rich_help_panel="Streaming"),
    amp_dtype: str | None = typer.Option(
        None, "--amp-dtype", help="Mixed precision in bf16 or fp16 (as train --amp "
                                  "--amp-dtype): float32 parameters, gradients and optimizer "
                                  "state.", show_default="float32 throughout",
                                  rich_help_panel="Streaming"),
    dtype: str | None = typer.Option(None, "--dtype", hidden=True, help="Former "
                                     "--amp-dtype: float32, float16 or bfloat16.",
                                     rich_help_panel="Streaming"),
    budget: str | None = typer.Option(None, "--budget", hidden=True,
                                      help="Former --memory-budget.", rich_help_panel="Streaming"),
    memory_budget: str | None = typer.Option(
        None, "--memory-budget", help="Memory budget, e.g. 12GiB (2**30 bytes each), 12GB (10**9), "
                               "500MiB, 12e9: prints the largest tile that fits.",
                               rich_help_panel="Streaming"),
    engine: str = typer.Option(
        "auto", "--engine", help="Streaming engine to model: auto (halo where the stream "
                                 "allows it, as training picks), halo or crop.",
                                 rich_help_panel="Streaming"),
    json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table.",
                                     rich_help_panel="Output"),
    plot: str | None = typer.Option(
        None, "--plot", help="Write a PNG: predicted peak against image size (log axes), "
                             "conventional and streaming, with the budget line.",
                             rich_help_panel="Output"),
) -> None:
    """Estimate peak memory of conventional vs streaming training, and the tile that fits.

    Traced on the meta device: no GPU, no real memory, seconds even for 65536 x 65536.
    """
    from sstream.cli_render import print_memory_report
    from sstream.estimate import EstimateConfig, plot_estimate
    from sstream.estimate import estimate_memory as run_estimate
    from sstream.runtime import parse_bytes

    with user_errors():
        config = EstimateConfig(
            image_size=_renamed(image_size, size), model=model, stream_layers=stream_layers,
            tile_size=tile_size, amp_dtype=_renamed(amp_dtype, dtype), optimizer=optimizer,
            memory_budget=_renamed(memory_budget, budget), engine=engine, pooling=pooling)
        if not config.image_size:
            raise UsageError("--image-size is required")
        try:
            if config.memory_budget is not None:
                parse_bytes(config.memory_budget)
            with err_console.status("tracing the training step on the meta device (the halo "
                                    "engine runs its tiles: seconds to a minute)"):
                result = run_estimate(config)
        except InputError as exc:
            raise UsageError(str(exc)) from None
        plot_path = None
        if plot is not None:
            with err_console.status("estimating image sides up to 65536 (or the image's) for "
                                    "the plot"):
                plot_path = plot_estimate(plot, config, result)
        if json_output:
            _print_json(result)
        else:
            print_memory_report(console, result, plot_path)
        if result.over_budget:
            raise typer.Exit(EXIT_FAILURE)


# ---- cohorts: split and report ---------------------------------------------------------------


@app.command("split")
def split_command(
    csv: Path = typer.Argument(..., help="Labelled CSV of the whole cohort (image, label, "
                               "optional patient column)."),
    task: str = typer.Option("classification", "--task", help="classification (stratified "
                             "on the class) or regression (on quantile bins of the target).",
                             rich_help_panel="Data"),
    bins: int = typer.Option(4, "--bins", help="Regression: quantile bins to stratify on.",
                             rich_help_panel="Data"),
    folds: int = typer.Option(5, "--folds", help="Cross-validation folds.",
                              rich_help_panel="Cohort"),
    test_fraction: float = typer.Option(0.0, "--test-fraction", help="Share of patients "
                                        "held out in test.csv, from every fold (0: none).",
                                        rich_help_panel="Cohort"),
    seed: int = typer.Option(0, "--seed", help="Seed of the shuffle: the same seed gives "
                             "the same splits.", rich_help_panel="Cohort"),
    out: Path = typer.Option(..., "--out", help="Folder for test.csv, fold_<k>/train.csv "
                             "and fold_<k>/val.csv, and splits.csv (the counts).",
                             rich_help_panel="Output"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing splits.",
                                   rich_help_panel="Output"),
    json_output: bool = typer.Option(False, "--json", help="Print what was written (the "
                                     "files and each split's counts) as JSON.",
                                     rich_help_panel="Output"),
) -> None:
    """Split a cohort into stratified cross-validation folds (and a held-out test set) that
    keep each patient's slides together (scikit-learn's StratifiedGroupKFold)."""
    from sstream.cli_render import split_table
    from sstream.split import SplitConfig, split_cohort

    with user_errors():
        config = SplitConfig(str(csv), str(out), folds, test_fraction, seed, task, bins,
                             overwrite)
        try:
            config.validate()
        except InputError as exc:
            raise UsageError(str(exc)) from None
        result = split_cohort(config)
        if json_output:
            _print_json(result)
        else:
            console.print(split_table(result))
        if not result.grouped_by_patient:
            err_console.print("[yellow]no patient column: every slide counts as its own "
                              "patient[/yellow]")


@app.command("report")
def report_command(
    runs: list[Path] = typer.Argument(..., help="Training output directories (one per fold)."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Mean and standard deviation over runs (e.g. folds) of every metric at each run's best
    epoch (the one best.pt keeps)."""
    from sstream.cli_render import report_table
    from sstream.report import ReportConfig, report

    with user_errors():
        summary = report(_validated(ReportConfig([str(run) for run in runs])))
        if json_output:
            _print_json(summary)
        else:
            console.print(report_table(summary))


# ---- make-sample-data -----------------------------------------------------------------------


@app.command("make-sample-data")
def make_sample_data(
    out: Path = typer.Argument(..., help="Output directory (images/, train.csv, val.csv)."),
    count: int = typer.Option(32, help="Number of slides (labels alternate 0, 1).",
                              rich_help_panel="Data"),
    size: int = typer.Option(768, help="Slide side in pixels (the maximum with --min-size).",
                             rich_help_panel="Data"),
    min_size: int = typer.Option(None, help="Draw each side from \\[min-size, size].",
                                 rich_help_panel="Data"),
    seed: int = typer.Option(0, help="Seed: the same seed gives the same files.",
                             rich_help_panel="Data"),
    val_fraction: float = typer.Option(0.25, help="Share of slides in val.csv.",
                                       rich_help_panel="Data"),
    regression: bool = typer.Option(False, help="Regression data: every slide has lesions "
                                    "and its label is their texture contrast in [0, 1].",
                                    rich_help_panel="Data"),
    patients: int = typer.Option(None, help="A cohort: slide i belongs to patient i mod N "
                                 "(one label per patient), every CSV gets a patient column, "
                                 "val.csv holds whole patients and cohort.csv every slide "
                                 "(for sstream split).", show_default="none",
                                 rich_help_panel="Data"),
    tiff_tile_size: int = typer.Option(256, "--tiff-tile-size", help="Tile side of the "
                                       "TIFFs written (multiple of 16; not the streaming "
                                       "--tile-size).", rich_help_panel="Output"),
    tile: int = typer.Option(None, "--tile", hidden=True, help="Former --tiff-tile-size.",
                             rich_help_panel="Output"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing files.",
                                   rich_help_panel="Output"),
    json_output: bool = typer.Option(False, "--json", help="Print the files written as "
                                     "JSON.", rich_help_panel="Output"),
) -> None:
    """Generate synthetic slides whose label is visible only at full resolution.

    Tiled JPEG pyramidal TIFFs with a tissue-like background; label 1 slides contain small
    textured lesions, label 0 slides only flat decoys of the same mean colour, so that a 4x
    downsample destroys the signal. Generation streams: any size fits in memory.
    """
    from rich.progress import Progress

    from sstream.sample_data import SampleDataConfig, write_sample_data

    with user_errors():
        config = _validated(SampleDataConfig(
            str(out), count, size, min_size, seed, val_fraction,
            _renamed(tiff_tile_size, tile), overwrite, regression, patients))
        with Progress(console=err_console) as progress:
            task = progress.add_task("slides", total=count)
            written = write_sample_data(
                config, on_slide=lambda done, total: progress.update(task, completed=done))
        if json_output:
            _print_json(written)
        else:
            cohort = (f" and {written.cohort_csv} ({patients} patients)"
                      if written.cohort_csv else "")
            console.print(f"wrote {written.slides} slides, {written.train_csv} and "
                          f"{written.val_csv}{cohort}")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    app(args=argv if argv is not None else sys.argv[1:])

