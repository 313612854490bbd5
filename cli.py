"""polysemanticity lab — command line.

Parses and validates options, then delegates: `pipeline/` trains and measures, `tracking/` records and
queries. Every command checks its input before it touches the tracking store, so bad input (exit code 2)
leaves no experiment or run behind.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys

import click

from pipeline.config_tools import ConfigError
from pipeline.experiments.incidental_defaults import COLLISIONS, DYNAMICS, NOISE

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


def _fail_usage(message: str) -> None:
    raise click.UsageError(message)


def tracking_uri_option():
    return click.option(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db].",
    )


def experiment_option(study_default: str):
    return click.option(
        "--experiment",
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
                type=click.IntRange(min=100),
                default=9999,
                show_default=True,
                help="Bootstrap resamples for the CI of each difference.",
            ),
            click.option(
                "--out",
                "out_dir",
                type=click.Path(file_okay=False),
                default=None,
                help=f"Folder for {files} [default: {default_folder}].",
            ),
            click.option(
                "--no-log", is_flag=True, help="Write the report files only; do not log an analysis run."
            ),
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
            help=f"{spec.help} [{spec.path}; default: {format_value(spec.default)}]",
        )(function)
    return function


def run_options(function):
    """Seeds, where to train and where to record: shared by `ablate` and `sweep`."""
    options = [
        click.option(
            "--seeds",
            type=click.IntRange(min=1),
            default=None,
            help="Seeds per configuration, trained together in one batched pass [default: the design's, else 10].",
        ),
        click.option(
            "--first-seed",
            type=click.IntRange(min=0),
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
    """A DesignError/ConfigError as one sentence, naming the option when the value came from one."""
    from pipeline.design import field_specs

    message = str(error)
    for path, spec in field_specs().items():
        position = message.find(f"{path} must")
        if position >= 0 and path in option_paths:
            # A value given by option (or --set): the option, then the field's own sentence.
            _fail_usage(f"{spec.option}: {message[position:]}")
    _fail_usage(message)


def _build_design(design_source, preset, grid_texts, set_texts, settings):
    """The sweep's Design: a shipped or given design (default: strategic, unless only --grid/--set are
    given), with --set and the config options as fixed settings and --grid as more axes."""
    from pipeline.design import Design, DesignError, grid_axis, load_design, split_assignment, split_values

    try:
        if design_source and preset:
            raise DesignError("give --design or --preset, not both")
        if design_source or preset:
            design = load_design(design_source or preset)
        elif grid_texts:
            # Axes of their own: the configurations are the grid's, not the strategic 8 crossed with it.
            design = Design(name="custom")
        else:
            design = load_design("strategic")
        grid = {}
        for text in grid_texts:
            path, values = split_assignment(text, "--grid")
            if path in grid:
                raise DesignError(f"--grid {path} is given twice; list every value in one --grid")
            grid[path] = grid_axis(path, split_values(values), "--grid")
        from pipeline.design import coerce_value, field_specs

        fixed = dict(settings)
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
        _design_problem(error, settings)


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
    from orchestration.taming import InputError, StoreUnavailable, SweepRequest, run_sweep, summary_table
    from pipeline.design import configuration_labels
    from pipeline.metrics import HEADLINE_METRICS
    from pipeline.tables import markdown_table

    seeds = options["seeds"] or design.seeds or 10
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
    if result.reused:
        click.echo(
            f"Reused {len(result.reused)} FINISHED configuration(s) with the same identity (use --force to retrain):"
        )
        for line in result.reused:
            click.echo(f"  {line}")
    frame = summary_table(result, (*HEADLINE_METRICS, TASK_LOSS_COLUMN))
    click.echo(
        f"\nSweep {result.sweep_id} ({design.name}) in experiment '{result.experiment_name}' at "
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
    Taming study (SCIENCE.md §1): an MLP trained under four binary factors, an SAE on its last hidden
    layer, entanglement metrics per seed, every run recorded in MLflow.
      ablate    one configuration, N seeds          sweep     every configuration of a design (presets,
      report    statistics from the store                     --grid axes over any setting, design files)
      inspect   check a logged run from its checkpoint
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
    design, configs = _build_design_from(Design(name="ablate").with_overrides(settings), settings)
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
    multiple=True,
    metavar="FIELD=V1,V2,...",
    help="Another axis, crossed with the design's (repeatable), e.g. --grid network.lambda_reg=1e-5,1e-4,1e-3.",
)
@click.option(
    "--set",
    "set_texts",
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
    default=None,
    metavar="ADDRESS",
    help="Dask scheduler to use, e.g. tcp://10.0.0.5:8786 [default: start a LocalCluster of --workers processes].",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
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


@cli.command()
@click.argument("run_id")
@tracking_uri_option()
def inspect(run_id, tracking_uri):
    """Check a logged run against its stored artifacts.

    \b
    A seed run: loads its checkpoint from the store, regenerates its data from the stored config and
    seed, recomputes every metric and compares it with the logged value (exit 1 on a mismatch).
    An ablation run: prints its per-seed metrics table.
    """
    from orchestration.inspect import inspect_run
    from orchestration.taming import InputError
    from pipeline.tables import markdown_table

    try:
        inspection = inspect_run(tracking_uri, run_id)
    except InputError as error:
        _fail_usage(str(error))
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
    default=None,
    help="Analyse only the ablations of this sweep ('latest' = the newest sweep run).",
)
@click.option(
    "--filter",
    "filter_string",
    default=None,
    help="Extra MLflow search filter on the seed runs, e.g. \"tags.reg = 'l2'\".",
)
@click.option(
    "--baseline",
    default=None,
    help="Configuration every other is compared with [default: random·bipolar·l1·relu when present, else "
    "the configuration closest to the published defaults].",
)
@click.option(
    "--metric",
    "metrics",
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
    from orchestration.taming import InputError

    request = ReportRequest(
        tracking_uri=tracking_uri,
        experiment=experiment,
        sweep_id=sweep_id,
        filter_string=filter_string,
        baseline=baseline,
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
    click.echo(result.report.markdown())
    click.echo(f"\nReport files in {result.folder}/ (open report.html in a browser).")
    if result.run_id is not None:
        click.echo(f"Logged as analysis run {result.run_id} in experiment '{result.experiment_name}'.")


# ------------------------------------------------------------------------------------------------------------
# Incidental polysemanticity (SCIENCE.md §2)


class _ListOf(click.ParamType):
    """Comma-separated values of `item` ("64,128,256"); integer lists also take START:STOP:STEP (inclusive).

    Use with multiple=True, so that both `--m 64 --m 128` and `--m 64,128` work (MLproject passes one string).
    Each value is checked by `item`, so an error names the option ("Invalid value for '--m': ...").
    """

    def __init__(self, item: click.ParamType, ranges: bool = False) -> None:
        self.item = item
        self.ranges = ranges
        self.name = f"{item.name}[,...]"

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
                values.extend(
                    self.item.convert(str(item), param, ctx) for item in range(start, stop + 1, step)
                )
            else:
                values.append(self.item.convert(text, param, ctx))
        return tuple(values)


def _flat(groups) -> list:
    """The values of a multiple=True `_ListOf` option, in order, duplicates dropped."""
    return list(dict.fromkeys(value for group in groups for value in group))


def _study_store_options(function):
    return experiment_option("incidental")(tracking_uri_option()(function))


def _training_options(*, instances: int, steps: int, optimizer: str, lr: float):
    """Settings shared by `incidental collisions` and `incidental noise`; defaults differ per experiment."""

    def decorate(function):
        options = [
            click.option(
                "--instances",
                type=click.IntRange(min=1),
                default=instances,
                show_default=True,
                help="Independent models per point (trained together in one batched pass).",
            ),
            click.option(
                "--steps",
                type=click.IntRange(min=1),
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
                type=click.FloatRange(min=0, min_open=True),
                default=lr,
                show_default=True,
                help="Learning rate.",
            ),
            click.option(
                "--weight-decay",
                type=click.FloatRange(min=0),
                default=None,
                help="AdamW's decoupled weight decay [default: 0.01 (torch's, active in the published run) "
                "with adamw, 0 with sgd].",
            ),
            click.option(
                "--seed",
                type=click.IntRange(min=0),
                default=0,
                show_default=True,
                help="Base seed; instance k draws its init and noise from (seed, k).",
            ),
            click.option(
                "--curve-every",
                type=click.IntRange(min=1),
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
        ]
        for option in reversed(options):
            function = option(function)
        return _study_store_options(function)

    return decorate


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
        # ConfigError messages start with the config field, which is the option's name with dashes.
        field, _, rest = str(error).partition(" ")
        _fail_usage(f"--{field.replace('_', '-')} {rest}")
    try:
        resolve_device(configs[0].device)
    except ValueError as error:
        _fail_usage(f"--device: {error}")
    return configs


def _track_points(command: str, configs, options: dict, sweep_params: dict):
    """Train and record the points (orchestration.incidental); say what was reused and where it went."""
    from orchestration.incidental import train_and_track_points
    from orchestration.taming import InputError

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

EXAMPLES_INCIDENTAL_REPORT = """
\b
Examples:
  python cli.py incidental report                           # newest finished sweep of each command
  python cli.py incidental report --sweep-id 1a2b3c4d5e6f --out reports/incidental
  python cli.py incidental report --baseline bipolar --paired --resamples 2000 --no-log
"""


@cli.group()
def incidental():
    """Incidental polysemanticity (SCIENCE.md §2): a tied ReLU-output autoencoder on basis vectors.

    \b
      collisions  polysemantic neurons vs m against the n²/(4m) law (L1 as the winner-take-all force)
      noise       fourth norm under hidden-layer noise of negative, zero and positive excess kurtosis
      dynamics    the one-encoding sparsification ODE against ‖w‖₁ ≈ 1/(1/√m + λt)
      report      tables, t-tests, the fitted slope and figures from the tracking store
    Each point is an MLflow run (tags study=incidental, kind=point) nested under one sweep run per command
    invocation (kind=sweep, with its sweep_id), in experiment 'incidental' unless --experiment says otherwise.
    Re-running collisions or noise resumes: a point with a FINISHED run of the same config hash and code
    version is reused, not retrained (--force retrains it and deletes the older run).
    """


@incidental.command("collisions", epilog=EXAMPLES_COLLISIONS)
@click.option(
    "--n",
    type=click.IntRange(min=1),
    default=COLLISIONS["n"],
    show_default=True,
    help="Features.",
)
@click.option(
    "--m",
    "ms",
    type=_ListOf(click.IntRange(min=1), ranges=True),
    multiple=True,
    default=list(COLLISIONS["ms"]),
    show_default=True,
    help="Hidden neurons, one point each (repeat, comma-separate, or START:STOP:STEP).",
)
@click.option(
    "--l1",
    "l1_values",
    type=_ListOf(click.FloatRange(min=0)),
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
    type=click.IntRange(min=1),
    default=NOISE["n"],
    show_default=True,
    help="Features.",
)
@click.option(
    "--m",
    type=click.IntRange(min=1),
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
    type=_ListOf(click.FloatRange(min=0, min_open=True)),
    multiple=True,
    default=list(NOISE["sigmas"]),
    show_default=True,
    help="Noise standard deviations σ (repeat or comma-separate); every type is run at every σ.",
)
@click.option(
    "--nu",
    type=click.FloatRange(min=2, min_open=True),
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
    type=click.FloatRange(min=0),
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
    type=click.IntRange(min=1),
    default=DYNAMICS["m"],
    show_default=True,
    help="Length of the encoding w.",
)
@click.option(
    "--l1",
    "l1_values",
    type=_ListOf(click.FloatRange(min=0, min_open=True)),
    multiple=True,
    default=list(DYNAMICS["l1_values"]),
    show_default=True,
    help="L1 strengths λ of the ODE (repeat or comma-separate).",
)
@click.option(
    "--t-max-times-l1",
    type=click.FloatRange(min=1),
    default=DYNAMICS["t_max_times_l1"],
    show_default=True,
    help="Simulate up to t = this / λ (≥ 1 so the comparison window t·λ ∈ [0.05, 1] is covered).",
)
@click.option(
    "--dt",
    type=click.FloatRange(min=0, min_open=True),
    default=DYNAMICS["dt"],
    show_default=True,
    help="Euler step.",
)
@click.option(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the initial w."
)
@_study_store_options
def incidental_dynamics(m, l1_values, t_max_times_l1, dt, seed, experiment, tracking_uri):
    """Integrate dw/dt = (1 − ‖w‖²)·w − λ·sign(w) and compare with ‖w‖₁ ≈ 1/(1/√m + λt), m′ ≈ ‖w‖₁².

    One point run per λ: metrics completion_time_times_l1 (documented 1.6–2), nonzeros_ratio_median/min/max
    (documented 2–2.7), l1_norm_ratio_median; trajectories as step series (step = t/dt) and simulation.csv.
    The sweep run holds dynamics.csv and the log–log plot.
    """
    import pandas as pd

    from orchestration.incidental import simulate_and_track_dynamics
    from orchestration.taming import InputError
    from pipeline.tables import markdown_table

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
    tracked = recorded.tracked
    click.echo(
        f"\nSweep {tracked.sweep_id} (dynamics) in experiment '{recorded.experiment_name}' at "
        f"{recorded.store_uri}; sweep run {tracked.sweep_run_id}.\n"
    )
    columns = ["m", "l1", "completion_time_times_l1", "nonzeros_ratio_median", "nonzeros_ratio_min"]
    columns += ["nonzeros_ratio_max", "l1_norm_ratio_median"]
    click.echo(markdown_table(pd.DataFrame([p.params | p.metrics for p in tracked.results]), columns))
    click.echo("\nDocumented (SCIENCE.md §2.4): completion at t·λ ≈ 1.6–2, m′/prediction ≈ 2–2.7.")


@incidental.command("report", epilog=EXAMPLES_INCIDENTAL_REPORT)
@_study_store_options
@click.option(
    "--sweep-id",
    "sweep_ids",
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
    from orchestration.taming import InputError

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
    cli(prog_name="python cli.py" if program == "cli.py" else program)


if __name__ == "__main__":
    main()
