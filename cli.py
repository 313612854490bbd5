"""polysemanticity lab — command line.

Parses and validates options, then delegates: `pipeline/` trains and measures, `tracking/` records and
queries. Every command checks its input before it touches the tracking store, so bad input (exit code 2)
leaves no experiment or run behind.
"""

from __future__ import annotations

import atexit
import gc
import math
import os
import re
import sys

import click

from pipeline.config_tools import (
    DYNAMICS_MAX_M,
    DYNAMICS_MAX_STEPS,
    INCIDENTAL_MAXIMA,
    OVERRIDE_FLAG,
    ConfigError,
    size_limits_lifted,
)
from pipeline.design import DESIGN_MAX_SEEDS
from pipeline.experiments.incidental_defaults import (
    COLLISIONS,
    COOCCURRENCE,
    COOCCURRENCE_MAX_BATCH,
    DYNAMICS,
    NOISE,
    SPLITTING,
)

# The sweep summary shows the headline metrics and the task loss beside them.
TASK_LOSS_COLUMN = "val_mse"

EXAMPLES_ABLATE = """
\b
Examples:
  python cli.py ablate --init random --noise bipolar --reg l1 --act relu --seeds 10
  python cli.py ablate --init orthogonal --noise positive_kurtosis --reg l2 --act gelu --seeds 10
  python cli.py ablate --reg l2 --l2-form penalty --lambda-reg 1e-3 --seeds 5 --experiment l2-forms
"""

EXAMPLES_SWEEP = """
\b
Examples:
  python cli.py sweep --design strategic --seeds 10          # the 8 published configurations (= --preset)
  python cli.py sweep --design factorial --seeds 10          # all 16 cells of the 2^4 design
  python cli.py sweep --grid network.lambda_reg=1e-5,1e-4,1e-3 --grid network.reg=l1,l2 --seeds 3
  python cli.py sweep --design factorial --grid network.hidden_dim=9,12 --set sae.d_sae=32
  python cli.py sweep --design my_study.toml                 # your own design file (see designs/)
  python cli.py sweep --design factorial --seeds 3 --epochs 200 --sae-epochs 100   # a quick look
  python cli.py sweep --workers 2                            # each pass split by seed over 2 processes
  python cli.py sweep --executor dask --tracking-uri http://127.0.0.1:5000          # a local Dask cluster
Re-running a sweep reuses every configuration that already has a FINISHED run with the same config,
seeds and code version; --force trains them again.
"""

EXAMPLES_DECOMPOSE = """
\b
Examples:
  python cli.py decompose --grid sae.architecture=topk,batch_topk,jumprelu,gated   # the latest sweep
  python cli.py decompose --sweep-id 3f2a9c0d1e4b --set sae.d_sae=32 --grid sae.k=2,4,8 --set sae.architecture=topk
  python cli.py report --sweep-id latest        # the decomposition is a sweep: report it like one
Only sae.* settings can change: the networks are the sweep's stored ones (its seed runs' checkpoints).
"""


def _fail_usage(message: str) -> None:
    raise click.UsageError(message)


# ------------------------------------------------------------------------------------------------------------
# Checked option types: every value is refused at parse time with one sentence naming the option (click
# prefixes "Invalid value for '--x'") and exit code 2, before any command touches the tracking store.

# ctx.meta key set by OVERRIDE_FLAG (an eager option, so it is known before any other value is converted).
_LIMITS_LIFTED = "polylab.limits_lifted"
# MLflow's own limit on experiment names is far above this; 250 keeps names usable in the UI and in paths.
NAME_MAX_LENGTH = 250
URI_MAX_LENGTH = 2000
# Worker processes: more than 4 per core (or 64) only adds start-up time and memory.
MAX_WORKERS = min(64, 4 * (os.cpu_count() or 1))
# The largest seed index a generator is seeded with (numpy and torch both take 32-bit seeds comfortably).
MAX_SEED = 2**31 - 1
# Values one list option (--m, --l1, --sigma, --noise) may expand to: each is a point that trains.
MAX_LIST_ITEMS = 1000


def _lift_limits(ctx: click.Context, _param, value: bool) -> bool:
    if value:
        ctx.meta[_LIMITS_LIFTED] = True
        # Lifted for this command only (the context closes it), also inside the config dataclasses.
        ctx.with_resource(size_limits_lifted())
    return value


def override_option():
    return click.option(
        OVERRIDE_FLAG,
        is_flag=True,
        is_eager=True,
        expose_value=False,
        callback=_lift_limits,
        help="Lift the documented maxima of the numeric options (the upper ends of their ranges) and of "
        "the sweep's total size, which keep a run within memory and time on a 2-core, 24 GB machine.",
    )


class _Limited:
    """A click IntRange/FloatRange whose maximum OVERRIDE_FLAG lifts and which refuses NaN and ±inf.

    The range shows in --help (click prints it beside the default). Values are parsed first and compared
    after, so a 30-digit integer is refused by its range instead of overflowing later.
    """

    def convert(self, value, param, ctx):
        number = self._parse(value, param, ctx)
        if isinstance(number, float) and not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number; allowed: {self._describe_range()}", param, ctx)
        lifted = ctx is not None and ctx.meta.get(_LIMITS_LIFTED, False)
        low = self.min is not None and (number <= self.min if self.min_open else number < self.min)
        high = (
            not lifted
            and self.max is not None
            and (number >= self.max if self.max_open else number > self.max)
        )
        if low or high:
            hint = f" ({OVERRIDE_FLAG} lifts the maximum)" if high else ""
            self.fail(f"{number} is not in the range {self._describe_range()}{hint}", param, ctx)
        return number


class LimitedInt(_Limited, click.IntRange):
    def _parse(self, value, param, ctx):
        return click.INT.convert(value, param, ctx)


class LimitedFloat(_Limited, click.FloatRange):
    def _parse(self, value, param, ctx):
        return click.FLOAT.convert(value, param, ctx)


class Text(click.ParamType):
    """A string that must not be empty or only whitespace, and at most `max_length` characters.

    allow_empty: '' itself is accepted and means "the default" (documented where used: MLproject passes
    an empty parameter for a default); whitespace-only is still refused.
    """

    name = "text"

    def __init__(self, what: str = "a value", max_length: int = NAME_MAX_LENGTH, allow_empty: bool = False):
        self.what, self.max_length, self.allow_empty = what, max_length, allow_empty

    def convert(self, value, param, ctx):
        value = str(value)
        if value == "" and self.allow_empty:
            return value
        if not value.strip():
            self.fail(f"{value!r} is empty; give {self.what}", param, ctx)
        if len(value) > self.max_length:
            self.fail(
                f"{self.what} of {len(value)} characters; at most {self.max_length} allowed", param, ctx
            )
        return value


class OutFolder(Text):
    """A folder to write into: not empty, not under an existing file, and inside a writable folder.

    Checked at parse time, so the report's statistics are never computed only to fail at the write.
    """

    def __init__(self) -> None:
        super().__init__("a folder path", max_length=4096)

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        path = os.path.abspath(value)
        if os.path.exists(path) and not os.path.isdir(path):
            self.fail(f"{value!r} is an existing file; give a folder", param, ctx)
        existing = path
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            self.fail(f"{value!r} lies under the file {existing}; give a folder", param, ctx)
        if not os.access(existing, os.W_OK | os.X_OK):
            self.fail(f"{value!r}: the folder {existing} is not writable", param, ctx)
        return value


class SweepId(click.ParamType):
    """A sweep id: 12 hexadecimal characters (as printed by sweep), or 'latest' where allowed."""

    name = "sweep_id"

    def __init__(self, latest: bool = True) -> None:
        self.latest = latest

    def convert(self, value, param, ctx):
        if (self.latest and value == "latest") or re.fullmatch(r"[0-9a-f]{12}", str(value)):
            return value
        allowed = "12 hexadecimal characters" + (" or 'latest'" if self.latest else "")
        self.fail(f"{value!r} is not a sweep id ({allowed}, as printed by the sweep)", param, ctx)


class SearchFilter(Text):
    """An MLflow search filter, parsed by MLflow's own parser so a malformed one stops before any query."""

    def __init__(self) -> None:
        super().__init__("a search filter", max_length=URI_MAX_LENGTH)

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        from mlflow.exceptions import MlflowException
        from mlflow.utils.search_utils import SearchUtils

        try:
            SearchUtils.parse_search_filter(value)
        except MlflowException as error:
            self.fail(
                f"{value!r} is not a valid MLflow search filter: {error.message.splitlines()[0]}", param, ctx
            )
        return value


class MetricName(click.Choice):
    """A taming metric (pipeline.evaluation.METRIC_NAMES), read on first use: that module imports torch."""

    def __init__(self) -> None:
        self.case_sensitive = True

    @property
    def choices(self):  # type: ignore[override]
        from pipeline.evaluation import METRIC_NAMES

        return METRIC_NAMES


class RunId(click.ParamType):
    """An MLflow run id: what MLflow itself accepts (letters, digits, _ and -, starting alphanumeric)."""

    name = "run_id"

    def convert(self, value, param, ctx):
        if not re.fullmatch(r"[a-zA-Z0-9][\w\-]{0,255}", str(value)):
            self.fail(
                f"{value!r} is not an MLflow run id (32 hexadecimal characters, as the UI shows)", param, ctx
            )
        return value


def tracking_uri_option():
    return click.option(
        "--tracking-uri",
        type=Text("a tracking URI", max_length=URI_MAX_LENGTH),
        default=None,
        help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db].",
    )


def experiment_option(study_default: str):
    return click.option(
        "--experiment",
        type=Text("an experiment name"),
        default=None,
        help=f"MLflow experiment name [default: the one `mlflow run` hands over, else '{study_default}'].",
    )


def device_option():
    return click.option(
        "--device",
        type=click.Choice(["auto", "cpu", "cuda", "mps"]),
        default="cpu",
        show_default=True,
        help="Where to train; 'auto' picks CUDA, then MPS, then CPU.",
    )


def report_output_options(files: str, default_folder: str):
    """--resamples, --out and --no-log, shared by the two report commands."""

    def decorate(function):
        options = [
            click.option(
                "--resamples",
                type=LimitedInt(min=100, max=100_000),
                default=9999,
                show_default=True,
                help="Bootstrap resamples for the CI of each difference.",
            ),
            click.option(
                "--out",
                "out_dir",
                type=OutFolder(),
                default=None,
                help=f"Folder for {files} [default: {default_folder}].",
            ),
            click.option(
                "--no-log", is_flag=True, help="Write the report files only; do not log an analysis run."
            ),
            override_option(),
        ]
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


def _field_destination(path: str) -> str:
    return "setting__" + path.replace(".", "__")


class _LazyChoice(click.Choice):
    """click.Choice over a field's allowed values, read on first use (see FieldSpec.choices)."""

    def __init__(self, spec) -> None:
        self.spec = spec
        self.case_sensitive = True

    @property
    def choices(self):  # type: ignore[override]
        return self.spec.choices


def config_options(function):
    """One option per config field, derived from the dataclasses (pipeline.design.field_specs): the
    flag, help, choices and default all come from the field's `setting(...)`, so a new field is one line
    there. Every option is optional: only the ones given override the design."""
    from pipeline.design import field_specs, format_value

    python_types = {int: click.INT, float: click.FLOAT, str: click.STRING}
    for spec in reversed(list(field_specs().values())):
        if spec.hint not in python_types:
            continue  # list-valued fields (data.group_sizes) are set with --set or in a design file
        kind = _LazyChoice(spec) if spec.choice_source is not None else python_types[spec.hint]
        function = click.option(
            spec.option,
            _field_destination(spec.path),
            type=kind,
            multiple=True,  # so that a repeated flag is an error instead of silently keeping the last one
            metavar=None if spec.choice_source is not None else spec.hint.__name__.upper(),
            help=f"{spec.help} [{spec.path}; default: {format_value(spec.default)}{_range_text(spec)}]",
        )(function)
    return function


def _range_text(spec) -> str:
    """'; range: 1 to 1024' from the field's setting(minimum=..., maximum=...): the dataclass enforces
    both (the maximum unless OVERRIDE_FLAG is given), so --help states what a value may be."""
    from pipeline.config import AblationConfig
    from pipeline.config_tools import leaf_fields

    metadata = leaf_fields(AblationConfig)[spec.path][0].metadata
    low, high = metadata.get("minimum"), metadata.get("maximum")
    if low is None and high is None:
        return ""
    if high is None:
        return f"; range: >= {low:g}"
    return f"; range: {low:g} to {high:g}" if low is not None else f"; range: <= {high:g}"


def run_options(function):
    """Seeds, where to train and where to record: shared by `ablate` and `sweep`."""
    options = [
        click.option(
            "--seeds",
            type=LimitedInt(min=1, max=DESIGN_MAX_SEEDS),
            default=None,
            help="Seeds per configuration, trained together in one batched pass [default: the design's, else 10].",
        ),
        click.option(
            "--first-seed",
            type=LimitedInt(min=0, max=MAX_SEED - 1000),
            default=0,
            show_default=True,
            help="Seeds are first-seed … first-seed+seeds−1.",
        ),
        device_option(),
        click.option(
            "--batching",
            type=click.Choice(["shared", "per-config"]),
            default="shared",
            show_default=True,
            help="Train configurations that share shapes in one batched pass, or one pass per configuration.",
        ),
        experiment_option("taming"),
        tracking_uri_option(),
        click.option(
            "--force",
            is_flag=True,
            help="Train again even when a FINISHED run with the same identity exists (the old run is deleted).",
        ),
        click.option(
            "--no-artifacts",
            is_flag=True,
            help="Skip PNGs and checkpoints (metrics only); for quick looks and benchmarks.",
        ),
        override_option(),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _given_settings(options: dict, command: str = "sweep") -> dict:
    """{path: value} of the config options given on the command line (each at most once)."""
    from pipeline.design import coerce_value, field_specs

    settings = {}
    for path, spec in field_specs().items():
        values = options.pop(_field_destination(path), ())
        if len(values) > 1:
            _fail_usage(
                f"{spec.option} was given {len(values)} times; to train several values use "
                f"`sweep --grid {path}={','.join(map(str, values))}`"
                + (" instead of ablate" if command == "ablate" else "")
            )
        if values:
            try:
                settings[path] = coerce_value(path, values[0])
            except ValueError as error:
                _fail_usage(f"{spec.option}: {error}")
    return settings


def _design_problem(error: Exception, option_paths=()) -> None:
    """A DesignError/ConfigError as one sentence, naming the option when the value came from one.

    option_paths: the paths given on the command line; a mapping {path: option text} names --set/--grid
    for the paths they gave, a plain collection means the field's own option."""
    from pipeline.design import field_specs

    message = str(error)
    for path, spec in field_specs().items():
        # The field's own sentence starts at its path ("network.lr must …", "data.strength_low and
        # data.strength_high must …"); what precedes it names the design part, not what the user typed.
        position = message.find(f"{path} ")
        if position >= 0 and " must " in message[position:] and path in option_paths:
            # A value given by option (or --set): the option, then the field's own sentence.
            option = option_paths[path] if isinstance(option_paths, dict) else spec.option
            _fail_usage(f"{option}: {message[position:]}")
    _fail_usage(message)


def _build_design(design_source, preset, grid_texts, set_texts, settings):
    """The sweep's Design: a shipped or given design (default: strategic, unless only --grid/--set are
    given), with --set and the config options as fixed settings and --grid as more axes."""
    from pipeline.design import (
        Design,
        DesignError,
        coerce_value,
        field_specs,
        grid_axis,
        load_design,
        split_assignment,
        split_values,
    )

    grid, fixed = {}, dict(settings)  # before `try`: the error handler names where a value came from
    try:
        if design_source and preset:
            raise DesignError("give --design or --preset, not both")
        if design_source or preset:
            try:
                design = load_design(design_source or preset)
            except DesignError as error:
                _fail_usage(f"--design: {error}")
        elif grid_texts:
            # Axes of their own: the configurations are the grid's, not the strategic 8 crossed with it.
            design = Design(name="custom")
        else:
            design = load_design("strategic")
        for text in grid_texts:
            path, values = split_assignment(text, "--grid")
            if path in grid:
                raise DesignError(f"--grid {path} is given twice; list every value in one --grid")
            grid[path] = grid_axis(path, split_values(values), "--grid")
        for text in set_texts:
            path, value = split_assignment(text, "--set")
            value = coerce_value(path, value, "--set")
            if path in fixed and fixed[path] != value:
                raise DesignError(
                    f"--set {path}={value} contradicts {field_specs()[path].option} {fixed[path]} "
                    "(or an earlier --set); give the setting once"
                )
            fixed[path] = value
        design = design.with_overrides(fixed, grid)
        return design, design.configs()
    except (DesignError, ConfigError) as error:
        given = {path: field_specs()[path].option for path in settings}
        given |= {path: f"--set {path}" for path in fixed if path not in settings}
        given |= {path: f"--grid {path}" for path in grid}
        _design_problem(error, given)


def _browse_hint(store_uri: str, experiment_id: str) -> str:
    """Where to look at the runs. The link names the runs table and the UI's "Model training" view:
    from MLflow 3.10 the UI opens experiments on its GenAI pages unless the browser chose that view."""
    page = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if store_uri.startswith(("http://", "https://")):
        return f"Browse the runs: {store_uri.rstrip('/')}/{page}"
    return (
        f"Browse the runs: mlflow ui --backend-store-uri {store_uri}, then open http://127.0.0.1:5000/{page}"
    )


def _run_configs(
    design, configs, options, *, adopt_as, labels_from, executor="local", scheduler=None, workers=None
):
    """Hand the configurations to the orchestration layer and print what happened."""
    from orchestration.taming import InputError, StoreUnavailable, SweepRequest, run_sweep
    from pipeline.config import check_sweep_size
    from pipeline.design import configuration_labels

    seeds = options["seeds"] or design.seeds or 10
    try:
        check_sweep_size(configs, seeds)
    except ConfigError as error:
        _fail_usage(f"--seeds × the design's configurations: {error}")
    request = SweepRequest(
        configs=configs,
        labels=configuration_labels(configs, labels_from),
        axes=tuple(labels_from),
        design_name=design.name,
        design=design.to_dict(),
        seeds=list(range(options["first_seed"], options["first_seed"] + seeds)),
        tracking_uri=options["tracking_uri"],
        experiment=options["experiment"],
        device=options["device"],
        share_passes=options["batching"] == "shared",
        force=options["force"],
        artifacts=not options["no_artifacts"],
        executor=executor,
        scheduler=scheduler,
        workers=workers,
        adopt_as=adopt_as,
    )
    try:
        result = run_sweep(request)
    except InputError as error:
        _fail_usage(str(error))
    except StoreUnavailable as error:
        raise click.ClickException(str(error)) from error
    _print_sweep_result(result, design.name)


def _print_sweep_result(result, design_name: str) -> None:
    """What a sweep (or decomposition) did: reuse, retired runs, the summary table, failures (exit 1)."""
    from orchestration.taming import summary_table
    from pipeline.metrics import HEADLINE_METRICS
    from pipeline.tables import markdown_table

    if result.reused:
        click.echo(
            f"Reused {len(result.reused)} FINISHED configuration(s) with the same identity (use --force to retrain):"
        )
        for line in result.reused:
            click.echo(f"  {line}")
    if getattr(result, "retired", None):
        click.echo(
            f"Deleted {len(result.retired)} older ablation run(s) (and their seed runs) that --force replaced: "
            f"{', '.join(result.retired)}"
        )
    frame = summary_table(result, (*HEADLINE_METRICS, TASK_LOSS_COLUMN))
    click.echo(
        f"\nSweep {result.sweep_id} ({design_name}) in experiment '{result.experiment_name}' at "
        f"{result.store_uri} (mean ± std over finished seeds):\n"
    )
    click.echo(markdown_table(frame))
    click.echo(f"\n{_browse_hint(result.store_uri, result.experiment_id)}")
    for outcome in result.failed:
        click.echo(f"FAILED {outcome.name or outcome.config.name}: {outcome.failure}", err=True)
    if result.failed:
        click.echo(
            "Re-run the same command to resume: FINISHED configurations are reused, the rest trained.",
            err=True,
        )
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def cli():
    """polysemanticity lab: where do polysemantic neurons come from, and which training choices prevent them?

    \b
    Taming study (docs/science.md §1): an MLP trained under four binary factors, an SAE on its last hidden
    layer, entanglement metrics per seed, every run recorded in MLflow.
      ablate    one configuration, N seeds          sweep     every configuration of a design (presets,
      report    statistics from the store                     --grid axes over any setting, design files)
      inspect   check a logged run from its checkpoint
      decompose new SAEs on a stored sweep's networks (SAE architecture, width, sparsity), no retraining
    Runs go to $MLFLOW_TRACKING_URI or sqlite:///mlflow.db; browse them with
      mlflow ui --backend-store-uri sqlite:///mlflow.db
    """


@cli.command(epilog=EXAMPLES_ABLATE)
@config_options
@run_options
def ablate(**options):
    """Train one configuration for N seeds (one batched pass) and record it as one MLflow run.

    Every config field has an option (below, with its dotted path); the ones not given keep the
    published defaults. The run holds every config field as a param, the seed summary (mean, std, sem,
    95 % CI) as metrics, a per-seed table and the grid of overlap heatmaps; each seed is a nested run
    with the same params, its metrics, training curves, overlap heatmap and checkpoint. The run is named
    by the four factors and every other setting that differs from the published defaults (training
    lengths, data size, curve spacing and null draws aside), e.g. 'random·bipolar·l1·relu · λ=0.001'.
    """
    from pipeline.design import Design, label_paths

    settings = _given_settings(options, "ablate")
    design, configs = _build_design_from(Design(name="ablate").with_overrides(settings), list(settings))
    _run_configs(design, configs, options, adopt_as="ablation", labels_from=label_paths(configs))


def _build_design_from(design, option_paths=()):
    from pipeline.design import DesignError

    try:
        return design, design.configs()
    except (DesignError, ConfigError) as error:
        _design_problem(error, option_paths)


@cli.command(epilog=EXAMPLES_SWEEP)
@click.option(
    "--design",
    "design_source",
    type=Text("a design name or file"),
    default=None,
    metavar="NAME|FILE",
    help="A design: a shipped name (strategic, factorial, lambda: see designs/) or a .toml/.yaml file "
    "with fixed settings, cases, grid axes and seeds [default: strategic, or nothing but the --grid axes].",
)
@click.option(
    "--preset",
    type=click.Choice(["strategic", "factorial"]),
    default=None,
    help="Same as --design strategic|factorial: the 8 published configurations or all 16 (2^4).",
)
@click.option(
    "--grid",
    "grid_texts",
    type=Text("FIELD=V1,V2,...", max_length=URI_MAX_LENGTH),
    multiple=True,
    metavar="FIELD=V1,V2,...",
    help="Another axis, crossed with the design's (repeatable), e.g. --grid network.lambda_reg=1e-5,1e-4,1e-3.",
)
@click.option(
    "--set",
    "set_texts",
    type=Text("FIELD=VALUE", max_length=URI_MAX_LENGTH),
    multiple=True,
    metavar="FIELD=VALUE",
    help="Fix any config field for every configuration (repeatable), e.g. --set sae.d_sae=32.",
)
@config_options
@run_options
@click.option(
    "--executor",
    type=click.Choice(["local", "dask"]),
    default="local",
    show_default=True,
    help="local: this machine (--workers processes); dask: one Dask task per configuration, each worker "
    "logging straight to the tracking server (which must then be an http(s) MLflow server).",
)
@click.option(
    "--scheduler",
    type=Text("a scheduler address", max_length=URI_MAX_LENGTH),
    default=None,
    metavar="ADDRESS",
    help="Dask scheduler to use, e.g. tcp://10.0.0.5:8786 [default: start a LocalCluster of --workers processes].",
)
@click.option(
    "--workers",
    type=LimitedInt(min=1, max=MAX_WORKERS),
    default=None,
    help="Processes of one torch thread each: the local executor splits every batched pass by seed over "
    "them; the Dask LocalCluster gets that many workers [default: local, one per core when the sweep is "
    "big enough to repay starting them (the published strategic sweep is), else 1; dask, up to 4].",
)
def sweep(design_source, preset, grid_texts, set_texts, executor, scheduler, workers, **options):
    """Train every configuration of a design, N seeds each, one MLflow run per configuration.

    A design is a list of configurations written as data (designs/*.toml): the shipped strategic and
    factorial presets, the λ sweep, or your own file; --grid adds axes and --set or any config option
    fixes a setting. Runs are named by the four factors and the settings that vary in the design, with
    a tag per axis. Finished configurations are reused on a re-run (same config, seeds and code
    version), so a sweep that died halfway picks up where it stopped. A summary table is printed at the end.
    """
    from pipeline.design import label_paths

    settings = _given_settings(options)
    design, configs = _build_design(design_source, preset, grid_texts, set_texts, settings)
    _run_configs(
        design,
        configs,
        options,
        adopt_as="sweep",
        labels_from=label_paths(configs),
        executor=executor,
        scheduler=scheduler,
        workers=workers,
    )


@cli.command(epilog=EXAMPLES_DECOMPOSE)
@click.option(
    "--sweep-id",
    type=SweepId(latest=True),
    default="latest",
    show_default=True,
    help="The sweep whose stored networks get new SAEs: its 12-character id, or 'latest'.",
)
@click.option(
    "--grid",
    "grid_texts",
    type=Text("FIELD=V1,V2,...", max_length=URI_MAX_LENGTH),
    multiple=True,
    metavar="sae.FIELD=V1,V2,...",
    help="An SAE axis crossed with every configuration of the sweep (repeatable), e.g. "
    "--grid sae.architecture=topk,batch_topk,jumprelu,gated.",
)
@click.option(
    "--set",
    "set_texts",
    type=Text("FIELD=VALUE", max_length=URI_MAX_LENGTH),
    multiple=True,
    metavar="sae.FIELD=VALUE",
    help="Fix an SAE setting for every decomposition (repeatable), e.g. --set sae.d_sae=32.",
)
@experiment_option("taming")
@tracking_uri_option()
@device_option()
@click.option(
    "--force", is_flag=True, help="Train the SAEs again even where a FINISHED run has the same identity."
)
@click.option(
    "--no-artifacts",
    is_flag=True,
    help="Skip checkpoints and heatmaps (faster; `inspect` then has nothing to check).",
)
def decompose(sweep_id, grid_texts, set_texts, experiment, tracking_uri, device, force, no_artifacts):
    """Train new SAEs on the networks a sweep stored, without training any network again.

    Every configuration of the sweep is crossed with the SAE settings given (--grid and --set over sae.*
    fields only); each seed's network is loaded from its seed run's checkpoint and every SAE of a pass
    trains in one batch. The result is a sweep of its own, recorded like any other (same metrics, report,
    resume), whose runs carry tags linking them to the runs that trained their networks: source_sweep_id,
    source_run_id (ablation) and network_run_id (seed), with trained = "sae only". A run with the same
    identity (config, seeds, code version) from an earlier sweep or decomposition is reused.
    """
    from orchestration.decompose import DecomposeRequest, run_decomposition
    from orchestration.taming import InputError, StoreUnavailable
    from pipeline.design import DesignError, coerce_value, grid_axis, split_assignment, split_values

    grid, fixed = {}, {}
    try:
        for text in grid_texts:
            path, values = split_assignment(text, "--grid")
            if path in grid:
                raise DesignError(f"--grid {path} is given twice; list every value in one --grid")
            grid[path] = grid_axis(path, split_values(values), "--grid")
        for text in set_texts:
            path, value = split_assignment(text, "--set")
            fixed[path] = coerce_value(path, value, "--set")
    except (DesignError, ConfigError) as error:
        _fail_usage(str(error))
    request = DecomposeRequest(
        sweep_id=sweep_id,
        fixed=fixed,
        grid=grid,
        tracking_uri=tracking_uri,
        experiment=experiment,
        device=device,
        force=force,
        artifacts=not no_artifacts,
    )
    try:
        result = run_decomposition(request)
    except InputError as error:
        _fail_usage(str(error))
    except StoreUnavailable as error:
        raise click.ClickException(str(error)) from error
    _print_sweep_result(result, "decomposition")


EXAMPLES_SPLIT = """
\b
Examples:
  python cli.py split                                               # the latest sweep, ε 0,0.01,0.1,0.3, +200 and +1000 epochs
  python cli.py split --sweep-id latest --epsilon 0,0.01,0.1 --epochs 200,1000
  python cli.py split --sweep-id 3f2a9c0d1e4b --report-only --out reports/split   # from stored runs only
Re-running skips every (network, arm, epochs) that already has a FINISHED split run; --force recomputes.
"""


class _NumberList(click.ParamType):
    """Comma-separated numbers, each checked by `item` (a LimitedInt or LimitedFloat); no repeats."""

    def __init__(self, item: click.ParamType) -> None:
        self.item = item
        self.name = f"{item.name}[,...]"

    def get_metavar(self, param, ctx):
        kind = "INTEGER" if isinstance(self.item, click.IntRange) else "FLOAT"
        return f"{kind}[,...] ({self.item._describe_range()})"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        texts = [text.strip() for text in str(value).split(",")]
        if any(not text for text in texts):
            self.fail(f"empty item in {value!r}; give comma-separated numbers", param, ctx)
        if len(texts) > MAX_LIST_ITEMS:
            self.fail(f"more than {MAX_LIST_ITEMS} values in {value!r}", param, ctx)
        values = tuple(self.item.convert(text, param, ctx) for text in texts)
        if len(set(values)) != len(values):
            self.fail(f"{value!r} repeats a value; give each once", param, ctx)
        return values


@cli.command(epilog=EXAMPLES_SPLIT)
@click.option(
    "--sweep-id",
    type=SweepId(latest=True),
    default="latest",
    show_default=True,
    help="The taming sweep whose stored networks are split: its 12-character id, or 'latest'.",
)
@click.option(
    "--epsilon",
    "epsilons",
    type=_NumberList(LimitedFloat(min=0, max=10)),
    default="0,0.01,0.1,0.3",
    show_default=True,
    help="Noise scales ε of the copies' incoming weights, as a fraction of the split row's norm.",
)
@click.option(
    "--epochs",
    type=_NumberList(LimitedInt(min=1, max=100_000)),
    default="200,1000",
    show_default=True,
    help="Fine-tuning lengths E after the split (the no-split baseline is fine-tuned as long).",
)
@experiment_option("taming")
@tracking_uri_option()
@click.option(
    "--force", is_flag=True, help="Recompute even where FINISHED split runs have the same identity."
)
@click.option(
    "--report-only",
    is_flag=True,
    help="Train nothing: rebuild the table and figures from the stored split runs of the sweep.",
)
@click.option(
    "--out",
    "out_dir",
    type=OutFolder(),
    default=None,
    help="Folder for splitting.csv, per_configuration.csv, splitting.md and PNGs [default: reports/split-<time>].",
)
@override_option()
def split(sweep_id, epsilons, epochs, experiment, tracking_uri, force, report_only, out_dir):
    """The splitting remedy on a stored sweep's networks: split, fine-tune, compare with no split.

    \b
    For every stored network (seed run checkpoint) of the sweep: the polysemantic neurons of the last
    hidden layer (the ground-truth definition behind neuron_polysemantic) are each duplicated, the
    outgoing weights of both copies halved (the network computes exactly the same function), each copy's
    incoming weights perturbed by Gaussian noise of scale ε·‖row‖, and the widened network fine-tuned for E
    epochs with its training objective (MSE, its regularization, its noise; Adam at its lr). The same
    network fine-tuned E epochs without splitting is the baseline. One run per (network, arm, E), kind
    "split", tagged with the network's seed run id (network_run_id) and source_sweep_id. The table compares
    each (ε, E) with the baseline, paired on (configuration, seed), differences averaged over configurations
    within seed, t-intervals across seeds.
    """
    from orchestration.taming import InputError, StoreUnavailable
    from orchestration.taming_splitting import SplitRequest, run_split
    from pipeline.tables import markdown_table

    request = SplitRequest(
        sweep_id=sweep_id,
        epsilons=epsilons,
        epochs=epochs,
        tracking_uri=tracking_uri,
        experiment=experiment,
        force=force,
        report_only=report_only,
        out_dir=out_dir,
    )
    try:
        result = run_split(request, on_status=lambda text: click.echo(text, err=True))
    except InputError as error:
        _fail_usage(str(error))
    except StoreUnavailable as error:
        raise click.ClickException(str(error)) from error
    if result.table is not None:
        from pipeline.taming_splitting import TERMINAL_COLUMNS

        click.echo(markdown_table(result.table, list(TERMINAL_COLUMNS)))
        click.echo("")
    for line in result.readings:
        click.echo(line)
    if not report_only:
        click.echo(
            f"\nRecorded {result.recorded} split run(s), reused {result.reused}, under run {result.run_id} in "
            f"experiment '{result.experiment_name}' ({result.wall_s:.0f} s)."
        )
    if result.folder is not None:
        click.echo(f"Files in {result.folder}/.")


@cli.command()
@click.argument("run_id", type=RunId())
@tracking_uri_option()
def inspect(run_id, tracking_uri):
    """Check a logged run against its stored artifacts.

    \b
    A seed run: loads its checkpoint from the store, regenerates its data from the stored config and
    seed, recomputes every metric and compares it with the logged value (exit 1 on a mismatch).
    An ablation run: prints its per-seed metrics table.
    """
    from orchestration.inspect import inspect_run
    from orchestration.taming import InputError, StoreUnavailable
    from pipeline.evaluation import CheckpointError
    from pipeline.tables import markdown_table

    try:
        inspection = inspect_run(tracking_uri, run_id)
    except InputError as error:
        _fail_usage(str(error))
    except StoreUnavailable as error:
        raise click.ClickException(str(error)) from error
    except CheckpointError as error:
        # A stored checkpoint that fails verification is a failed check (exit 1), like a metric that does
        # not reproduce; exit 2 stays for bad usage.
        click.echo(f"Error: {error}", err=True)
        sys.exit(1)
    click.echo(f"{inspection.kind} {inspection.name} ({inspection.status})")
    if inspection.failure is not None:
        click.echo(f"failure reason: {inspection.failure}")
        sys.exit(1)
    if inspection.kind == "seed":
        click.echo(markdown_table(inspection.table, digits=8))
        rows = len(inspection.table)
        click.echo(f"\n{rows - inspection.mismatches}/{rows} metrics reproduced from the checkpoint.")
        sys.exit(0 if inspection.reproduced else 1)
    click.echo(markdown_table(inspection.table))


EXAMPLES_REPORT = """
\b
Examples:
  python cli.py report                                   # every finished seed run of experiment 'taming'
  python cli.py report --sweep-id latest                 # only the ablations of the latest sweep
  python cli.py report --metric macs --metric interference --baseline "random·bipolar·l2·relu"
  python cli.py report --filter "params.\\`network.epochs\\` = '2000'" --test welch --out reports/full
"""


@cli.command(epilog=EXAMPLES_REPORT)
@experiment_option("taming")
@tracking_uri_option()
@click.option(
    "--sweep-id",
    type=SweepId(latest=True),
    default=None,
    help="Analyse only the ablations of this sweep: its 12-character id, or 'latest' (the newest sweep run).",
)
@click.option(
    "--filter",
    "filter_string",
    type=SearchFilter(),
    default=None,
    help="Extra MLflow search filter on the seed runs, e.g. \"tags.reg = 'l2'\".",
)
@click.option(
    "--baseline",
    type=Text("a configuration name", allow_empty=True),
    default=None,
    help="Configuration every other is compared with [default (also when given as '', as MLproject does): "
    "random·bipolar·l1·relu when present, else the configuration closest to the published defaults].",
)
@click.option(
    "--metric",
    "metrics",
    type=MetricName(),
    multiple=True,
    help="Metric to compare (repeatable) [default: the headline metrics].",
)
@click.option(
    "--test",
    "pairing",
    type=click.Choice(["auto", "paired", "welch"]),
    default="auto",
    show_default=True,
    help="auto: paired t-test on the seeds a configuration shares with the baseline (seed k of every "
    "configuration sees the same data, inits and noise), Welch where they share none; paired: always; "
    "welch: never pair.",
)
@click.option(
    "--paired", "paired_flag", is_flag=True, hidden=True, help="Same as --test paired (older flag)."
)
@click.option(
    "--published-ladder",
    is_flag=True,
    help="Also train the published SAE with and without each of its two defects (tied encoder, raw "
    "inputs) on the baseline's stored networks, and show published code → ours one fix at a time.",
)
@report_output_options("the CSVs, report.md, report.html and PNGs", "reports/report-<time>")
def report(
    experiment,
    tracking_uri,
    sweep_id,
    filter_string,
    baseline,
    metrics,
    pairing,
    paired_flag,
    published_ladder,
    resamples,
    out_dir,
    no_log,
):
    """Statistics from the tracking store: every configuration against a baseline, and the 2^4 factorial.

    Reads only FINISHED seed runs (failed ones are counted, never silently dropped) and recomputes every
    statistic from the stored per-seed values, treating the seed as the unit of replication: comparisons
    paired on shared seeds (d_z), all 15 factorial effects from per-seed contrasts tested across seeds when
    all 16 cells are present, bootstrap CIs over seeds, Holm and BH corrections. It states a conclusion per
    factor (or configuration) and headline metric, with caveats derived from the design (confounded
    factors, thin data, failed runs, non-published settings), prints Markdown, writes CSVs, report.md,
    report.html and figures, and logs them as an analysis run beside the runs it read.
    """
    from orchestration.report import ReportRequest, build_and_log_report
    from orchestration.taming import InputError, StoreUnavailable

    request = ReportRequest(
        tracking_uri=tracking_uri,
        experiment=experiment,
        sweep_id=sweep_id,
        filter_string=filter_string,
        baseline=baseline or None,  # '' is the documented "default" (MLproject passes it empty)
        metrics=metrics,
        test="paired" if paired_flag else pairing,
        published_ladder=published_ladder,
        resamples=resamples,
        out_dir=out_dir,
        log=not no_log,
    )
    try:
        result = build_and_log_report(request, on_status=lambda text: click.echo(text, err=True))
    except InputError as error:
        _fail_usage(str(error))
    except StoreUnavailable as error:
        raise click.ClickException(str(error)) from error
    click.echo(result.report.markdown())
    click.echo(f"\nReport files in {result.folder}/ (open report.html in a browser).")
    if result.run_id is not None:
        click.echo(f"Logged as analysis run {result.run_id} in experiment '{result.experiment_name}'.")


# ------------------------------------------------------------------------------------------------------------
# Incidental polysemanticity (docs/science.md §2)


class _ListOf(click.ParamType):
    """Comma-separated values of `item` ("64,128,256"); integer lists also take START:STOP:STEP (inclusive).

    Use with multiple=True, so that both `--m 64 --m 128` and `--m 64,128` work (MLproject passes one string).
    Each value is checked by `item`, so an error names the option ("Invalid value for '--m': ...").
    """

    def __init__(self, item: click.ParamType, ranges: bool = False) -> None:
        self.item = item
        self.ranges = ranges
        self.name = f"{item.name}[,...]"

    def get_metavar(self, param, ctx):
        # click shows a range type's range in --help, but not one wrapped in a list: show it here.
        describe = getattr(self.item, "_describe_range", None)
        kind = "INTEGER" if isinstance(self.item, click.IntRange) else "FLOAT"
        return f"{kind}[,...] ({describe()})" if describe else None

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        values = []
        for text in str(value).split(","):
            text = text.strip()
            if not text:
                self.fail(f"empty item in {value!r}", param, ctx)
            if self.ranges and text.count(":") == 2:
                try:
                    start, stop, step = (int(part) for part in text.split(":"))
                except ValueError:
                    self.fail(f"{text!r} is not an integer range START:STOP:STEP", param, ctx)
                if step < 1 or stop < start:
                    self.fail(f"{text!r} needs STEP >= 1 and STOP >= START", param, ctx)
                # Both ends and the count are checked before the range is expanded: 1:100000000:1 must
                # be refused at once, not after building a hundred million values.
                self.item.convert(str(start), param, ctx)
                self.item.convert(str(stop), param, ctx)
                if (stop - start) // step + 1 + len(values) > MAX_LIST_ITEMS:
                    self.fail(f"{text!r} gives more than {MAX_LIST_ITEMS} values", param, ctx)
                values.extend(
                    self.item.convert(str(item), param, ctx) for item in range(start, stop + 1, step)
                )
            else:
                values.append(self.item.convert(text, param, ctx))
            if len(values) > MAX_LIST_ITEMS:
                self.fail(f"more than {MAX_LIST_ITEMS} values in {value!r}", param, ctx)
        return tuple(values)


def _flat(groups) -> list:
    """The values of a multiple=True `_ListOf` option, in order, duplicates dropped."""
    return list(dict.fromkeys(value for group in groups for value in group))


def _check_dynamics_steps(l1_values, t_max_times_l1: float, dt: float) -> None:
    """The ODE integrates t_max_times_l1 / λ / dt Euler steps per λ: refuse more than DYNAMICS_MAX_STEPS
    (unless OVERRIDE_FLAG), naming the options that set it."""
    if click.get_current_context().meta.get(_LIMITS_LIFTED):
        return
    for l1 in l1_values:
        steps = math.ceil(t_max_times_l1 / l1 / dt)
        if steps > DYNAMICS_MAX_STEPS:
            _fail_usage(
                f"--l1/--dt/--t-max-times-l1: λ = {l1:g} with --dt {dt:g} and --t-max-times-l1 "
                f"{t_max_times_l1:g} needs {steps:.3g} Euler steps, more than the documented "
                f"{DYNAMICS_MAX_STEPS:g}; raise λ or --dt, or give {OVERRIDE_FLAG}"
            )


def _study_store_options(function):
    return experiment_option("incidental")(tracking_uri_option()(function))


def _training_options(*, instances: int, steps: int, optimizer: str, lr: float):
    """Settings shared by `incidental collisions` and `incidental noise`; defaults differ per experiment."""

    def decorate(function):
        options = [
            click.option(
                "--instances",
                type=LimitedInt(min=1, max=INCIDENTAL_MAXIMA["instances"]),
                default=instances,
                show_default=True,
                help="Independent models per point (trained together in one batched pass).",
            ),
            click.option(
                "--steps",
                type=LimitedInt(min=1, max=INCIDENTAL_MAXIMA["steps"]),
                default=steps,
                show_default=True,
                help="Training steps.",
            ),
            click.option(
                "--optimizer",
                type=click.Choice(["adamw", "sgd"]),
                default=optimizer,
                show_default=True,
                help="Optimizer (full batch: the n basis vectors).",
            ),
            click.option(
                "--lr",
                type=LimitedFloat(min=0, min_open=True, max=INCIDENTAL_MAXIMA["lr"]),
                default=lr,
                show_default=True,
                help="Learning rate.",
            ),
            click.option(
                "--weight-decay",
                type=LimitedFloat(min=0, max=INCIDENTAL_MAXIMA["weight_decay"]),
                default=None,
                help="AdamW's decoupled weight decay [default: 0.01 (torch's, active in the published run) "
                "with adamw, 0 with sgd].",
            ),
            click.option(
                "--seed",
                type=LimitedInt(min=0, max=MAX_SEED),
                default=0,
                show_default=True,
                help="Base seed; instance k draws its init and noise from (seed, k).",
            ),
            click.option(
                "--curve-every",
                type=LimitedInt(min=1, max=INCIDENTAL_MAXIMA["curve_every"]),
                default=100,
                show_default=True,
                help="Steps between recorded curve points.",
            ),
            device_option(),
            click.option(
                "--force",
                is_flag=True,
                help="Retrain every point, even one with a FINISHED run of the same config and code version "
                "(reused otherwise); the older run is deleted once the new one has finished.",
            ),
            override_option(),
        ]
        for option in reversed(options):
            function = option(function)
        return _study_store_options(function)

    return decorate


# IncidentalConfig fields that are also options of `incidental collisions`/`noise` (first_instance and the
# polysemantic thresholds are not).
_INCIDENTAL_OPTION_FIELDS = [
    "n",
    "m",
    "instances",
    "steps",
    "l1",
    "noise",
    "sigma",
    "nu",
    "noise_sharing",
    "optimizer",
    "lr",
    "weight_decay",
    "seed",
    "curve_every",
    "device",
    "p",
    "batch_size",
    "epsilon",
    "extra_steps",
    "measure_every",
]


def _training_settings(options: dict) -> dict:
    """IncidentalConfig fields from the shared training options."""
    weight_decay = options["weight_decay"]
    if weight_decay is None:
        weight_decay = 0.01 if options["optimizer"] == "adamw" else 0.0
    return {
        "instances": options["instances"],
        "steps": options["steps"],
        "optimizer": options["optimizer"],
        "lr": options["lr"],
        "weight_decay": weight_decay,
        "seed": options["seed"],
        "curve_every": options["curve_every"],
        "device": options["device"],
    }


def _checked_configs(build):
    """Build the configs and check the device; any invalid setting is a usage error (exit 2)."""
    from pipeline.incidental import resolve_device

    try:
        configs = build()
    except ConfigError as error:
        # A ConfigError message that starts with a config field names the option with the same name (with
        # dashes); the others (the total size, instances × n × m) name their options themselves.
        field, _, rest = str(error).partition(" ")
        if field in _INCIDENTAL_OPTION_FIELDS:
            _fail_usage(f"--{field.replace('_', '-')}: {field} {rest}")
        _fail_usage(str(error).replace("instances × n × m", "--instances × --n × --m", 1))
    try:
        # A splitting arm carries its device on its base config.
        resolve_device(getattr(configs[0], "base", configs[0]).device)
    except ValueError as error:
        _fail_usage(f"--device: {error}")
    return configs


def _track_points(command: str, configs, options: dict, sweep_params: dict):
    """Train and record the points (orchestration.incidental); say what was reused and where it went."""
    from orchestration.incidental import train_and_track_points
    from orchestration.taming import InputError, StoreUnavailable

    try:
        recorded = train_and_track_points(
            command,
            configs,
            tracking_uri=options["tracking_uri"],
            experiment=options["experiment"],
            force=options["force"],
            sweep_params=sweep_params,
        )
    except InputError as error:
        _fail_usage(str(error))
    except StoreUnavailable as error:
        raise click.ClickException(str(error)) from error
    tracked = recorded.tracked
    if tracked.reused:
        click.echo(
            f"\nReused {len(tracked.reused)} of {len(configs)} point(s) already FINISHED with the same config "
            f"and code version (--force retrains them): {', '.join(tracked.reused)}."
        )
    if tracked.retired:
        click.echo(f"\nDeleted {len(tracked.retired)} older point run(s) that --force retrained.")
    click.echo(
        f"\nSweep {tracked.sweep_id} ({command}) in experiment '{recorded.experiment_name}' at "
        f"{recorded.store_uri}; sweep run {tracked.sweep_run_id}.\n"
    )
    return tracked


EXAMPLES_COLLISIONS = """
\b
Examples:
  python cli.py incidental collisions                       # n = 64, m = 64…512, λ = 1e-3, 12k steps (~2 min on CPU)
  python cli.py incidental collisions --m 64,128 --l1 1e-3 --l1 1e-2 --instances 8
  python cli.py incidental collisions --n 256 --m 256:4096:256 --l1 1e-3,1e-2,1e-1 --device auto   # published
  python cli.py incidental collisions --force               # retrain points that already have a FINISHED run
"""

EXAMPLES_NOISE = """
\b
Examples:
  python cli.py incidental noise                            # 4 noise types × σ ∈ {0.07, 0.1, 0.15}, 20k steps
  python cli.py incidental noise --noise bipolar,gaussian --sigma 0.1 --steps 5000
  python cli.py incidental noise --steps 100000 --noise-sharing per_step   # the published run and sharing
"""

EXAMPLES_DYNAMICS = """
\b
Examples:
  python cli.py incidental dynamics                         # m = 10^4, λ ∈ {1e-3, 1e-4}, about a second
  python cli.py incidental dynamics --m 100000 --l1 1e-5 --t-max-times-l1 2.5   # the published simulation
"""

EXAMPLES_COOCCURRENCE = """
\b
Examples:
  python cli.py incidental cooccurrence          # n = 32, m ∈ {16,24,32,64,128}, 7 values of p, 12 instances (~2 min)
  python cli.py incidental cooccurrence --m 32,64 --p 0,0.01,0.1 --instances 4 --steps 2000
"""

EXAMPLES_SPLITTING = """
\b
Examples:
  python cli.py incidental splitting             # n = 32, m = 64, 32 instances, 6 values of ε + baseline (~1 min)
  python cli.py incidental splitting --epsilon 0.01,0.1 --extra-steps 8000 --instances 32
"""

EXAMPLES_INCIDENTAL_REPORT = """
\b
Examples:
  python cli.py incidental report                           # newest finished sweep of each command
  python cli.py incidental report --sweep-id 1a2b3c4d5e6f --out reports/incidental
  python cli.py incidental report --baseline bipolar --paired --resamples 2000 --no-log
"""


@cli.group()
def incidental():
    """Incidental polysemanticity (docs/science.md §2): a tied ReLU-output autoencoder on basis vectors.

    \b
      collisions  polysemantic neurons vs m against the n²/(4m) law (L1 as the winner-take-all force)
      noise       fourth norm under hidden-layer noise of negative, zero and positive excess kurtosis
      dynamics    the one-encoding sparsification ODE against ‖w‖₁ ≈ 1/(1/√m + λt)
      cooccurrence  polysemantic neurons when each feature is on independently with probability p
      splitting   the splitting remedy: split polysemantic neurons into two copies and train on
      report      tables, t-tests, the fitted slope and figures from the tracking store
    Each point is an MLflow run (tags study=incidental, kind=point) nested under one sweep run per command
    invocation (kind=sweep, with its sweep_id), in experiment 'incidental' unless --experiment says otherwise.
    Re-running collisions, noise, cooccurrence or splitting resumes: a point with a FINISHED run of the same
    config hash and code version is reused, not retrained (--force retrains it and deletes the older run).
    """


@incidental.command("collisions", epilog=EXAMPLES_COLLISIONS)
@click.option(
    "--n",
    type=LimitedInt(min=1, max=INCIDENTAL_MAXIMA["n"]),
    default=COLLISIONS["n"],
    show_default=True,
    help="Features.",
)
@click.option(
    "--m",
    "ms",
    type=_ListOf(LimitedInt(min=1, max=INCIDENTAL_MAXIMA["m"]), ranges=True),
    multiple=True,
    default=list(COLLISIONS["ms"]),
    show_default=True,
    help="Hidden neurons, one point each (repeat, comma-separate, or START:STOP:STEP).",
)
@click.option(
    "--l1",
    "l1_values",
    type=_ListOf(LimitedFloat(min=0, max=INCIDENTAL_MAXIMA["l1"])),
    multiple=True,
    default=list(COLLISIONS["l1_values"]),
    show_default=True,
    help="L1 strengths λ (repeat or comma-separate); every m is trained at every λ.",
)
@_training_options(
    instances=COLLISIONS["instances"],
    steps=COLLISIONS["steps"],
    optimizer="adamw",
    lr=1e-3,
)
def incidental_collisions(n, ms, l1_values, **options):
    """Count polysemantic neurons against m and compare with the n²/(4m) prediction.

    One point run per (λ, m): params = the full config, metrics polysemantic_neurons (mean over instances),
    polysemantic_neurons_std, predicted_polysemantic_neurons, fourth_norm, initial_collisions,
    winner_was_initial_argmax, …, per_instance.csv, curves as step series (curve.loss, curve.fourth_norm,
    curve.polysemantic_neurons). The sweep run holds collisions.csv, the log–log plot with the prediction
    line (error bars: 95 % CI of the mean across instances) and the fitted slope (theory −1).

    A point is unconverged when its encodings have not sparsified yet (some instance has mean direction
    fourth norm Σ_j W_ij⁴ / (Σ_j W_ij²)² below 0.98; one-hot encodings give 1): it is named in the output,
    tagged convergence=unconverged with metric converged=0, and left out of the slope fit, with a hint to
    rerun with more --steps.
    """
    from pipeline.experiments.incidental import collisions_points
    from pipeline.incidental_analysis import (
        collisions_display,
        collisions_table,
        slope_sentence,
        slope_table,
        unconverged_notes,
    )
    from pipeline.tables import markdown_table

    ms, l1_values = _flat(ms), _flat(l1_values)
    settings = _training_settings(options)
    configs = _checked_configs(
        lambda: collisions_points(
            n=n,
            ms=ms,
            l1_values=l1_values,
            **settings,
        )
    )
    sweep_params = {
        "n": n,
        "m": ",".join(map(str, ms)),
        "l1": ",".join(f"{value:g}" for value in l1_values),
        **settings,
    }
    tracked = _track_points("collisions", configs, options, sweep_params)
    table = collisions_table(tracked.results)
    click.echo(markdown_table(collisions_display(table)))
    notes = unconverged_notes(table)
    if notes:
        click.echo("")
    for note in notes:
        click.echo(note[0].upper() + note[1:] + ".")
    for row in slope_table(table).itertuples():
        click.echo(f"\n{slope_sentence(row)}.")


@incidental.command("noise", epilog=EXAMPLES_NOISE)
@click.option(
    "--n",
    type=LimitedInt(min=1, max=INCIDENTAL_MAXIMA["n"]),
    default=NOISE["n"],
    show_default=True,
    help="Features.",
)
@click.option(
    "--m",
    type=LimitedInt(min=1, max=INCIDENTAL_MAXIMA["m"]),
    default=NOISE["m"],
    show_default=True,
    help="Hidden neurons.",
)
@click.option(
    "--noise",
    "noise_types",
    type=_ListOf(click.Choice(["bipolar", "gaussian", "laplace", "student_t"])),
    multiple=True,
    default=list(NOISE["noise_types"]),
    show_default=True,
    help="Noise types on the hidden layer (repeat or comma-separate); excess kurtosis −2, 0, +3, 6/(ν−4).",
)
@click.option(
    "--sigma",
    "sigmas",
    type=_ListOf(LimitedFloat(min=0, min_open=True, max=INCIDENTAL_MAXIMA["sigma"])),
    multiple=True,
    default=list(NOISE["sigmas"]),
    show_default=True,
    help="Noise standard deviations σ (repeat or comma-separate); every type is run at every σ.",
)
@click.option(
    "--nu",
    type=LimitedFloat(min=2, min_open=True, max=INCIDENTAL_MAXIMA["nu"]),
    default=5.0,
    show_default=True,
    help="Student-t degrees of freedom (κ = 6/(ν−4) for ν > 4).",
)
@click.option(
    "--noise-sharing",
    type=click.Choice(["per_sample", "per_step"]),
    default="per_sample",
    show_default=True,
    help="A fresh ξ per sample (the model as written) or one per step shared by the batch (the published code).",
)
@click.option(
    "--l1",
    type=LimitedFloat(min=0, max=INCIDENTAL_MAXIMA["l1"]),
    default=NOISE["l1"],
    show_default=True,
    help="L1 strength λ (0: noise is the only winner-take-all force).",
)
@_training_options(
    instances=NOISE["instances"],
    steps=NOISE["steps"],
    optimizer=NOISE["optimizer"],
    lr=NOISE["lr"],
)
def incidental_noise(n, m, noise_types, sigmas, nu, noise_sharing, l1, **options):
    """Track the fourth norm Σ_j W_ij⁴ over training for each noise type and σ.

    One point run per (noise type, σ), logged like a collisions point (curve.fourth_norm is the published
    curve). The sweep run holds noise.csv and the published figure with the positive-kurtosis (Laplace,
    Student-t) curves added; the final polysemantic counts per noise type are printed.
    """
    from pipeline.experiments.incidental import noise_points
    from pipeline.tables import markdown_table

    settings = _training_settings(options)
    configs = _checked_configs(
        lambda: noise_points(
            n=n,
            m=m,
            sigmas=_flat(sigmas),
            noise_types=_flat(noise_types),
            l1=l1,
            nu=nu,
            noise_sharing=noise_sharing,
            **settings,
        )
    )
    sweep_params = {
        "n": n,
        "m": m,
        "noise": ",".join(_flat(noise_types)),
        "sigma": ",".join(f"{value:g}" for value in _flat(sigmas)),
        "nu": nu,
        "noise_sharing": noise_sharing,
        "l1": l1,
        **settings,
    }
    tracked = _track_points("noise", configs, options, sweep_params)
    rows = [
        {
            "noise": point.config.noise,
            "σ": point.config.sigma,
            "fourth norm": point.metrics["fourth_norm"],
            "at init": point.per_instance["fourth_norm_initial"].mean(),
            "polysemantic (mean)": point.metrics["polysemantic_neurons"],
            "winner was initial argmax": point.metrics["winner_was_initial_argmax"],
        }
        for point in tracked.results
    ]
    import pandas as pd

    click.echo(markdown_table(pd.DataFrame(rows)))
    click.echo(f"\n3/(m+2) = {3 / (m + 2):.4f} (isotropic unit encoding); 1 = one-hot.")


@incidental.command("dynamics", epilog=EXAMPLES_DYNAMICS)
@click.option(
    "--m",
    type=LimitedInt(min=1, max=DYNAMICS_MAX_M),
    default=DYNAMICS["m"],
    show_default=True,
    help="Length of the encoding w.",
)
@click.option(
    "--l1",
    "l1_values",
    type=_ListOf(LimitedFloat(min=0, min_open=True, max=INCIDENTAL_MAXIMA["l1"])),
    multiple=True,
    default=list(DYNAMICS["l1_values"]),
    show_default=True,
    help="L1 strengths λ of the ODE (repeat or comma-separate).",
)
@click.option(
    "--t-max-times-l1",
    type=LimitedFloat(min=1, max=1000),
    default=DYNAMICS["t_max_times_l1"],
    show_default=True,
    help="Simulate up to t = this / λ (≥ 1 so the comparison window t·λ ∈ [0.05, 1] is covered).",
)
@click.option(
    "--dt",
    type=LimitedFloat(min=0, min_open=True, max=1),
    default=DYNAMICS["dt"],
    show_default=True,
    help=f"Euler step (with --t-max-times-l1 / λ / dt at most {DYNAMICS_MAX_STEPS:g} steps per λ).",
)
@click.option(
    "--seed",
    type=LimitedInt(min=0, max=MAX_SEED),
    default=0,
    show_default=True,
    help="Seed of the initial w.",
)
@_study_store_options
@override_option()
def incidental_dynamics(m, l1_values, t_max_times_l1, dt, seed, experiment, tracking_uri):
    """Integrate dw/dt = (1 − ‖w‖²)·w − λ·sign(w) and compare with ‖w‖₁ ≈ 1/(1/√m + λt), m′ ≈ ‖w‖₁².

    One point run per λ: metrics completion_time_times_l1 (documented 1.6–2), nonzeros_ratio_median/min/max
    (documented 2–2.7), l1_norm_ratio_median; trajectories as step series (step = t/dt) and simulation.csv.
    The sweep run holds dynamics.csv and the log–log plot.
    """
    import pandas as pd

    from orchestration.incidental import simulate_and_track_dynamics
    from orchestration.taming import InputError, StoreUnavailable
    from pipeline.tables import markdown_table

    _check_dynamics_steps(_flat(l1_values), t_max_times_l1, dt)
    try:
        recorded = simulate_and_track_dynamics(
            m=m,
            l1_values=_flat(l1_values),
            t_max_times_l1=t_max_times_l1,
            dt=dt,
            seed=seed,
            tracking_uri=tracking_uri,
            experiment=experiment,
        )
    except InputError as error:
        _fail_usage(str(error))
    except StoreUnavailable as error:
        raise click.ClickException(str(error)) from error
    tracked = recorded.tracked
    click.echo(
        f"\nSweep {tracked.sweep_id} (dynamics) in experiment '{recorded.experiment_name}' at "
        f"{recorded.store_uri}; sweep run {tracked.sweep_run_id}.\n"
    )
    columns = ["m", "l1", "completion_time_times_l1", "nonzeros_ratio_median", "nonzeros_ratio_min"]
    columns += ["nonzeros_ratio_max", "l1_norm_ratio_median"]
    click.echo(markdown_table(pd.DataFrame([p.params | p.metrics for p in tracked.results]), columns))
    click.echo("\nDocumented (docs/science.md §2.4): completion at t·λ ≈ 1.6–2, m′/prediction ≈ 2–2.7.")


@incidental.command("cooccurrence", epilog=EXAMPLES_COOCCURRENCE)
@click.option(
    "--n",
    type=LimitedInt(min=1, max=INCIDENTAL_MAXIMA["n"]),
    default=COOCCURRENCE["n"],
    show_default=True,
    help="Features.",
)
@click.option(
    "--m",
    "ms",
    type=_ListOf(LimitedInt(min=1, max=INCIDENTAL_MAXIMA["m"]), ranges=True),
    multiple=True,
    default=list(COOCCURRENCE["ms"]),
    show_default=True,
    help="Hidden neurons (repeat, comma-separate, or START:STOP:STEP); below n is superposition.",
)
@click.option(
    "--p",
    "p_values",
    type=_ListOf(LimitedFloat(min=0, max=1)),
    multiple=True,
    default=list(COOCCURRENCE["p_values"]),
    show_default=True,
    help="Probabilities that each feature is on (repeat or comma-separate); 0 = one feature per input.",
)
@click.option(
    "--l1",
    type=LimitedFloat(min=0, max=INCIDENTAL_MAXIMA["l1"]),
    default=COOCCURRENCE["l1"],
    show_default=True,
    help="L1 strength λ on the hidden activations.",
)
@click.option(
    "--batch-size",
    type=LimitedInt(min=1, max=COOCCURRENCE_MAX_BATCH),
    default=COOCCURRENCE["batch_size"],
    show_default=True,
    help="Non-empty inputs drawn per step (fresh every step).",
)
@_training_options(
    instances=COOCCURRENCE["instances"],
    steps=COOCCURRENCE["steps"],
    optimizer="adamw",
    lr=COOCCURRENCE["lr"],
)
def incidental_cooccurrence(n, ms, p_values, l1, batch_size, **options):
    """Count polysemantic neurons when features co-occur, for m below and above n.

    Each of the n features is on independently with probability p, at value 1 like a basis vector (empty
    inputs are left out: they carry no loss or gradient); p = 0 is one feature per input. The loss is
    normalised per feature occurrence, so its p → 0 limit is the basis-data loss of `collisions`. One
    point run per (m, p), logged like a collisions point plus data_loss, features_per_neuron,
    features_represented; instance k starts from the same weights and draws the same uniforms at every p,
    so points that differ in p are paired on the instance. The sweep run holds cooccurrence.csv and
    cooccurrence.png; `incidental report` adds the paired tests against p = 0 and the crossover table.
    """
    import pandas as pd

    from pipeline.experiments.incidental import cooccurrence_points
    from pipeline.incidental_analysis import cooccurrence_summary
    from pipeline.tables import markdown_table

    ms, p_values = _flat(ms), _flat(p_values)
    settings = _training_settings(options)
    configs = _checked_configs(
        lambda: cooccurrence_points(n=n, ms=ms, p_values=p_values, l1=l1, batch_size=batch_size, **settings)
    )
    sweep_params = {
        "n": n,
        "m": ",".join(map(str, ms)),
        "p": ",".join(f"{value:g}" for value in p_values),
        "l1": l1,
        "batch_size": batch_size,
        **settings,
    }
    tracked = _track_points("cooccurrence", configs, options, sweep_params)
    per_instance = pd.concat(
        [
            point.per_instance.assign(n=point.config.n, m=point.config.m, p=point.config.p)
            for point in tracked.results
        ],
        ignore_index=True,
    )
    summary = cooccurrence_summary(per_instance)
    columns = ["m", "p", "instances", "polysemantic_neurons", "ci_low", "ci_high", "features_per_neuron"]
    columns += ["features_represented", "predicted_incidental"]
    click.echo(markdown_table(summary, [column for column in columns if column in summary]))


@incidental.command("splitting", epilog=EXAMPLES_SPLITTING)
@click.option(
    "--n",
    type=LimitedInt(min=1, max=INCIDENTAL_MAXIMA["n"]),
    default=SPLITTING["n"],
    show_default=True,
    help="Features.",
)
@click.option(
    "--m",
    type=LimitedInt(min=1, max=INCIDENTAL_MAXIMA["m"]),
    default=SPLITTING["m"],
    show_default=True,
    help="Hidden neurons of the base model.",
)
@click.option(
    "--l1",
    type=LimitedFloat(min=0, max=INCIDENTAL_MAXIMA["l1"]),
    default=SPLITTING["l1"],
    show_default=True,
    help="L1 strength λ (base training and training on).",
)
@click.option(
    "--epsilon",
    "epsilons",
    type=_ListOf(LimitedFloat(min=0, max=10)),
    multiple=True,
    default=list(SPLITTING["epsilons"]),
    show_default=True,
    help="Noise scales ε of the copies, one arm each (repeat or comma-separate); per weight, N(0, ε²).",
)
@click.option(
    "--extra-steps",
    type=LimitedInt(min=1, max=INCIDENTAL_MAXIMA["steps"]),
    default=SPLITTING["extra_steps"],
    show_default=True,
    help="Steps trained after the split (a fresh optimizer, the base's settings).",
)
@click.option(
    "--measure-every",
    type=LimitedInt(min=1, max=INCIDENTAL_MAXIMA["steps"]),
    default=SPLITTING["measure_every"],
    show_default=True,
    help="Extra steps between recorded outcome counts.",
)
@click.option(
    "--no-baseline",
    is_flag=True,
    help="Leave out the baseline arm (the same extra steps without splitting).",
)
@_training_options(
    instances=SPLITTING["instances"],
    steps=SPLITTING["steps"],
    optimizer="adamw",
    lr=SPLITTING["lr"],
)
def incidental_splitting(n, m, l1, epsilons, extra_steps, measure_every, no_baseline, **options):
    """Split every polysemantic neuron into two copies w/√2 + ε·z and train on; count what resolves.

    The base is a collisions point (basis data, L1), trained once and shared by every arm. Each arm is a
    point run: the baseline (the same extra steps, unsplit) and one per ε; metrics resolved_fraction (each
    copy carries one of the neuron's former features, a different one), recollided_fraction,
    other_fraction, separated_fraction, polysemantic_before/after, loss_before/at_split/after; curves
    curve.resolved_fraction, curve.polysemantic_neurons, curve.loss over the extra steps; per_instance.csv,
    checkpoints.csv and splits.csv, from which `incidental report` redraws the before/after figure.
    """
    from pipeline.experiments.incidental_splitting import splitting_points
    from pipeline.incidental import IncidentalConfig
    from pipeline.tables import markdown_table

    settings = _training_settings(options)
    configs = _checked_configs(
        lambda: splitting_points(
            IncidentalConfig(n=n, m=m, l1=l1, **settings),
            epsilons=_flat(epsilons),
            extra_steps=extra_steps,
            measure_every=measure_every,
            baseline=not no_baseline,
        )
    )
    sweep_params = {
        "n": n,
        "m": m,
        "l1": l1,
        "epsilon": ",".join(f"{value:g}" for value in _flat(epsilons)),
        "extra_steps": extra_steps,
        "measure_every": measure_every,
        "baseline": not no_baseline,
        **settings,
    }
    tracked = _track_splitting(configs, options, sweep_params)
    columns = ["arm", "polysemantic_before", "split_neurons", "resolved_fraction", "resolved_ci_low"]
    columns += ["resolved_ci_high", "recollided_fraction", "separated_fraction", "polysemantic_after"]
    columns += ["mixed_after"]
    columns += ["loss_before", "loss_after"]
    click.echo(markdown_table(tracked.table, [column for column in columns if column in tracked.table]))


def _track_splitting(configs, options: dict, sweep_params: dict):
    """Train and record the splitting arms (orchestration.incidental); say what was reused."""
    from orchestration.incidental import train_and_track_splitting
    from orchestration.taming import InputError, StoreUnavailable

    try:
        recorded = train_and_track_splitting(
            configs,
            tracking_uri=options["tracking_uri"],
            experiment=options["experiment"],
            force=options["force"],
            sweep_params=sweep_params,
        )
    except InputError as error:
        _fail_usage(str(error))
    except StoreUnavailable as error:
        raise click.ClickException(str(error)) from error
    tracked = recorded.tracked
    if tracked.reused:
        click.echo(
            f"\nReused {len(tracked.reused)} of {len(configs)} arm(s) already FINISHED (--force retrains them)."
        )
    if tracked.retired:
        click.echo(f"\nDeleted {len(tracked.retired)} older arm run(s) that --force retrained.")
    click.echo(
        f"\nSweep {tracked.sweep_id} (splitting) in experiment '{recorded.experiment_name}' at "
        f"{recorded.store_uri}; sweep run {tracked.sweep_run_id}.\n"
    )
    return tracked


@incidental.command("report", epilog=EXAMPLES_INCIDENTAL_REPORT)
@_study_store_options
@click.option(
    "--sweep-id",
    "sweep_ids",
    type=SweepId(latest=False),
    multiple=True,
    help="Sweep(s) to read (repeatable) [default: the newest finished sweep of each command].",
)
@click.option(
    "--baseline",
    type=click.Choice(["bipolar", "gaussian", "laplace", "student_t"]),
    default="gaussian",
    show_default=True,
    help="Noise type every other is compared with at the same σ (Gaussian: no privileged basis).",
)
@click.option(
    "--paired",
    is_flag=True,
    help="Paired t-tests on instances (instance k of every noise type starts from the same weights).",
)
@report_output_options("report.md, the CSVs and PNGs", "reports/incidental-<time>")
def incidental_report(experiment, tracking_uri, sweep_ids, baseline, paired, resamples, out_dir, no_log):
    """Observed vs predicted counts with CIs, the fitted log–log slope, noise t-tests and figures.

    Reads the FINISHED point runs of the chosen sweeps and recomputes everything from their per-instance
    tables: mean count and 95 % CI per m beside n²/(4m), the OLS slope of log count on log m with its CI
    (theory −1), each noise type against the baseline at the same σ (Welch or paired t, bootstrap CI, Holm
    and BH), the ODE against its prediction. Writes report.md, CSVs and PNGs to --out and logs them as an
    analysis run (kind=analysis, study=incidental).
    """
    from orchestration.incidental import build_and_log_incidental_report
    from orchestration.taming import InputError, StoreUnavailable

    try:
        result = build_and_log_incidental_report(
            tracking_uri=tracking_uri,
            experiment=experiment,
            sweep_ids=sweep_ids,
            baseline=baseline,
            paired=paired,
            resamples=resamples,
            out_dir=out_dir,
            log=not no_log,
        )
    except InputError as error:
        _fail_usage(str(error))
    except StoreUnavailable as error:
        raise click.ClickException(str(error)) from error
    click.echo(result.report.markdown())
    click.echo(f"\nReport files in {result.folder}/.")
    if result.run_id is not None:
        click.echo(f"Logged as analysis run {result.run_id} in experiment '{result.experiment_name}'.")


def main() -> None:
    # MLflow's own download bars would interleave with ours.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Over HTTP MLflow prints a "View run … at" line per closed run: dozens per sweep, hiding the summary.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # At exit Python garbage-collects every object torch, MLflow and matplotlib created at import: about
    # 1.5 s after a sweep, during which the shell waits. Frozen objects are skipped by that collection;
    # everything is still released by reference counting and atexit handlers still run.
    atexit.register(gc.freeze)
    # Help and errors show the command as it was typed: `python cli.py …` or the installed `polylab …`.
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "polylab"
    from orchestration.signals import run_cli

    sys.exit(run_cli(cli, "python cli.py" if program == "cli.py" else program))


if __name__ == "__main__":
    main()
