"""polysemanticity lab — command line.

Parses and validates options, then delegates: `pipeline/` trains and measures, `tracking/` records and
queries. Every command checks its input before it touches the tracking store, so bad input (exit code 2)
leaves no experiment or run behind.
"""

from __future__ import annotations

import os
import sys

import click

from pipeline.config import AblationConfig, DataConfig, NetworkConfig, SAEConfig, preset_configs
from pipeline.configuration import ConfigError

HEADLINE_COLUMNS = (
    "macs",
    "interference",
    "neuron_polysemantic",
    "latent_polysemantic",
    "feature_mcc",
    "sae_fvu",
    "val_mse",
)

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
  python cli.py sweep --preset strategic --seeds 10          # the 8 published configurations
  python cli.py sweep --preset factorial --seeds 10          # all 16 cells of the 2^4 design
  python cli.py sweep --preset factorial --seeds 3 --epochs 200 --sae-epochs 100   # a quick look
Re-running a sweep reuses every configuration that already has a FINISHED run with the same config,
seeds and code version; --force trains them again.
"""


def _fail_usage(message: str) -> None:
    raise click.UsageError(message)


def _store(tracking_uri: str | None):
    from tracking.store import TrackingError, open_store

    try:
        return open_store(tracking_uri)
    except TrackingError as error:
        _fail_usage(str(error))


def model_options(function):
    """The numeric settings shared by `ablate` and `sweep` (defaults: the published protocol)."""
    defaults_network, defaults_sae, defaults_data = NetworkConfig(), SAEConfig(), DataConfig()
    options = [
        click.option(
            "--seeds",
            type=click.IntRange(min=1),
            default=10,
            show_default=True,
            help="Seeds per configuration (trained together in one batched pass).",
        ),
        click.option(
            "--first-seed",
            type=click.IntRange(min=0),
            default=0,
            show_default=True,
            help="Seeds are first-seed … first-seed+seeds−1.",
        ),
        click.option(
            "--epochs",
            type=click.IntRange(min=1),
            default=defaults_network.epochs,
            show_default=True,
            help="Network training epochs (full batch).",
        ),
        click.option(
            "--sae-epochs",
            type=click.IntRange(min=1),
            default=defaults_sae.epochs,
            show_default=True,
            help="SAE training epochs.",
        ),
        click.option(
            "--lambda-reg",
            type=click.FloatRange(min=0),
            default=defaults_network.lambda_reg,
            show_default=True,
            help="Regularization strength λ (L1 penalty or L2 decay/penalty).",
        ),
        click.option(
            "--l2-form",
            type=click.Choice(["decay", "penalty"]),
            default=defaults_network.l2_form,
            show_default=True,
            help="L2 as Adam's coupled weight decay on all parameters (published) or as λ·ΣW² on weight matrices (comparable with L1).",
        ),
        click.option(
            "--sigma",
            type=click.FloatRange(min=0),
            default=defaults_network.sigma,
            show_default=True,
            help="Noise scale σ on the last hidden layer.",
        ),
        click.option(
            "--hidden-dim",
            type=click.IntRange(min=1),
            default=defaults_network.hidden_dim,
            show_default=True,
            help="Width of each hidden layer.",
        ),
        click.option(
            "--hidden-layers",
            type=click.IntRange(min=1),
            default=defaults_network.hidden_layers,
            show_default=True,
            help="Number of hidden layers (activations).",
        ),
        click.option(
            "--lr",
            type=click.FloatRange(min=0, min_open=True),
            default=defaults_network.lr,
            show_default=True,
            help="Network Adam learning rate.",
        ),
        click.option(
            "--d-sae",
            type=click.IntRange(min=2),
            default=defaults_sae.d_sae,
            show_default=True,
            help="SAE latents.",
        ),
        click.option(
            "--sae-architecture",
            type=click.Choice(["leaky_relu", "relu"]),
            default=defaults_sae.architecture,
            show_default=True,
            help="SAE architecture (leaky_relu = the published one).",
        ),
        click.option(
            "--sae-l1",
            type=click.FloatRange(min=0),
            default=defaults_sae.l1_coefficient,
            show_default=True,
            help="SAE sparsity coefficient.",
        ),
        click.option(
            "--sae-lr",
            type=click.FloatRange(min=0, min_open=True),
            default=defaults_sae.lr,
            show_default=True,
            help="SAE Adam learning rate.",
        ),
        click.option(
            "--samples",
            type=click.IntRange(min=8),
            default=defaults_data.samples,
            show_default=True,
            help="Data set size (80 % train, 20 % validation).",
        ),
        click.option(
            "--device",
            type=click.Choice(["auto", "cpu", "cuda", "mps"]),
            default="cpu",
            show_default=True,
            help="Where to train; 'auto' picks CUDA, then MPS, then CPU.",
        ),
        click.option(
            "--batching",
            type=click.Choice(["shared", "per-config"]),
            default="shared",
            show_default=True,
            help="Train configurations that share shapes in one batched pass, or one pass per configuration.",
        ),
        click.option(
            "--experiment",
            default=None,
            help="MLflow experiment name [default: the one `mlflow run` hands over, else 'taming'].",
        ),
        click.option(
            "--tracking-uri",
            default=None,
            help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db].",
        ),
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


def build_base_config(options: dict) -> AblationConfig:
    """AblationConfig from CLI options (factors left at the baseline); ConfigError → usage error."""
    try:
        return AblationConfig(
            data=DataConfig(samples=options["samples"]),
            network=NetworkConfig(
                epochs=options["epochs"],
                lambda_reg=options["lambda_reg"],
                l2_form=options["l2_form"],
                sigma=options["sigma"],
                hidden_dim=options["hidden_dim"],
                hidden_layers=options["hidden_layers"],
                lr=options["lr"],
            ),
            sae=SAEConfig(
                architecture=options["sae_architecture"],
                d_sae=options["d_sae"],
                l1_coefficient=options["sae_l1"],
                lr=options["sae_lr"],
                epochs=options["sae_epochs"],
            ),
        )
    except ConfigError as error:
        _fail_usage(str(error))


def _adopted_run(store):
    """The run `mlflow run` created for this process (MLFLOW_RUN_ID), if any and if not yet used."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return None
    run = store.client.get_run(run_id)
    return None if run.data.tags.get("kind") else run


def _progress_bar(total: int, description: str):
    from tqdm import tqdm

    return tqdm(
        total=total, desc=description, unit="epoch", unit_scale=True, dynamic_ncols=True, mininterval=0.5
    )


def _run_sweep(configs, options, preset, adopt_as):
    from pipeline.experiments.taming import run_ablations, total_work
    from pipeline.tables import markdown_table, mean_plus_minus
    from pipeline.train import resolve_device
    from tracking.taming import run_tracked_sweep, summary_frame

    try:
        resolve_device(options["device"])
    except ValueError as error:
        _fail_usage(f"--device: {error}")
    store = _store(options["tracking_uri"])
    adopted = _adopted_run(store)
    if adopted is not None and options["experiment"] is None:
        experiment_id = adopted.info.experiment_id
    else:
        from tracking.store import TrackingError

        try:
            experiment_id = store.experiment_id(options["experiment"])
        except TrackingError as error:
            _fail_usage(str(error))
    seeds = list(range(options["first_seed"], options["first_seed"] + options["seeds"]))
    share = options["batching"] == "shared"
    bar = None
    reused: list[str] = []

    def plan(pending) -> None:
        nonlocal bar
        if pending:
            bar = _progress_bar(
                total_work(pending, seeds, share), f"{len(pending)} config(s) × {len(seeds)} seeds"
            )

    def trainer(group, seed_list, share_passes, progress):
        return run_ablations(
            group, seed_list, share_passes=share_passes, progress=progress, device=options["device"]
        )

    def progress(count: int) -> None:
        bar.update(count)

    try:
        sweep_id, outcomes = run_tracked_sweep(
            store,
            experiment_id,
            configs,
            seeds,
            trainer=trainer,
            preset=preset,
            force=options["force"],
            adopted_run_id=adopted.info.run_id if adopted is not None else None,
            adopt_as=adopt_as,
            share_passes=share,
            artifacts=not options["no_artifacts"],
            progress=progress,
            on_reuse=lambda config, run_id: reused.append(f"{config.name} (run {run_id})"),
            on_plan=plan,
        )
    finally:
        if bar is not None:
            bar.close()
    if reused:
        click.echo(
            f"Reused {len(reused)} FINISHED configuration(s) with the same identity (use --force to retrain):"
        )
        for line in reused:
            click.echo(f"  {line}")
    frame = summary_frame(outcomes, HEADLINE_COLUMNS)
    for metric in HEADLINE_COLUMNS:
        frame[metric] = [
            mean_plus_minus(m, s) for m, s in zip(frame[metric], frame.pop(f"{metric}_std"), strict=True)
        ]
    click.echo(
        f"\nSweep {sweep_id} in experiment {experiment_id} at {store.uri} (mean ± std over finished seeds):\n"
    )
    click.echo(markdown_table(frame))
    failed = [outcome for outcome in outcomes if outcome.status == "failed"]
    if failed:
        for outcome in failed:
            click.echo(f"FAILED {outcome.config.name}: {outcome.failure}", err=True)
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def cli():
    """polysemanticity lab: where do polysemantic neurons come from, and which training choices prevent them?

    \b
    Taming study (SCIENCE.md §1): an MLP trained under four binary factors, an SAE on its last hidden
    layer, entanglement metrics per seed, every run recorded in MLflow.
      ablate    one configuration, N seeds          sweep     the 8 published or all 16 configurations
      inspect   check a logged run from its checkpoint
    Runs go to $MLFLOW_TRACKING_URI or sqlite:///mlflow.db; browse them with
      mlflow ui --backend-store-uri sqlite:///mlflow.db
    """


@cli.command(epilog=EXAMPLES_ABLATE)
@click.option(
    "--init",
    type=click.Choice(["random", "orthogonal"]),
    default="random",
    show_default=True,
    help="Weight initialization.",
)
@click.option(
    "--noise",
    type=click.Choice(["none", "bipolar", "positive_kurtosis", "gaussian"]),
    default="bipolar",
    show_default=True,
    help="Noise on the last hidden layer during training.",
)
@click.option(
    "--reg", type=click.Choice(["none", "l1", "l2"]), default="l1", show_default=True, help="Regularization."
)
@click.option(
    "--act", type=click.Choice(["relu", "gelu"]), default="relu", show_default=True, help="Hidden activation."
)
@model_options
def ablate(init, noise, reg, act, **options):
    """Train one configuration for N seeds (one batched pass) and record it as one MLflow run.

    The run holds every config field as a param, the seed summary (mean, std, sem, 95 % CI) as metrics,
    a per-seed table and the grid of overlap heatmaps; each seed is a nested run with its metrics,
    training curves, overlap heatmap and checkpoint.
    """
    base = build_base_config(options)
    try:
        config = base.with_factors(init, noise, reg, act)
    except ConfigError as error:
        _fail_usage(str(error))
    _run_sweep([config], options, preset=None, adopt_as="ablation")


@cli.command(epilog=EXAMPLES_SWEEP)
@click.option(
    "--preset",
    type=click.Choice(["strategic", "factorial"]),
    default="strategic",
    show_default=True,
    help="strategic = the 8 published configurations; factorial = all 16 (2^4).",
)
@model_options
def sweep(preset, **options):
    """Train every configuration of a preset, N seeds each, one MLflow run per configuration.

    Finished configurations are reused on a re-run (same config, seeds and code version), so a sweep
    that died halfway picks up where it stopped. A summary table is printed at the end.
    """
    base = build_base_config(options)
    _run_sweep(preset_configs(preset, base), options, preset=preset, adopt_as="sweep")


@cli.command()
@click.argument("run_id")
@click.option(
    "--tracking-uri",
    default=None,
    help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db].",
)
def inspect(run_id, tracking_uri):
    """Check a logged run against its stored artifacts.

    \b
    A seed run: loads its checkpoint from the store, regenerates its data from the stored config and
    seed, recomputes every metric and compares it with the logged value (exit 1 on a mismatch).
    An ablation run: prints its per-seed metrics table.
    """
    import io

    import pandas as pd
    from mlflow.exceptions import MlflowException

    from pipeline.evaluation import reevaluate
    from pipeline.tables import markdown_table
    from tracking.query import load_seed_checkpoint, logged_metrics

    store = _store(tracking_uri)
    try:
        run = store.client.get_run(run_id)
    except MlflowException as error:
        _fail_usage(f"RUN_ID {run_id!r} was not found in {store.uri}: {error.message.splitlines()[0]}")
    kind = run.data.tags.get("kind")
    name = run.data.tags.get("mlflow.runName", run_id)
    click.echo(f"{kind or 'run'} {name} ({run.info.status})")
    if kind == "seed":
        if run.info.status != "FINISHED":
            click.echo(f"failure reason: {run.data.tags.get('failure_reason', 'unknown')}")
            sys.exit(1)
        recomputed = reevaluate(load_seed_checkpoint(store, run_id))
        logged = logged_metrics(run)
        rows, mismatches = [], 0
        for metric, value in recomputed.items():
            stored = logged.get(metric, float("nan"))
            equal = abs(stored - value) <= 1e-9 * max(1.0, abs(value))
            mismatches += not equal
            rows.append(
                {"metric": metric, "logged": stored, "recomputed": value, "match": "yes" if equal else "NO"}
            )
        click.echo(markdown_table(pd.DataFrame(rows), digits=8))
        click.echo(f"\n{len(rows) - mismatches}/{len(rows)} metrics reproduced from the checkpoint.")
        sys.exit(1 if mismatches else 0)
    if kind == "ablation":
        text = store.client.download_artifacts(run_id, "seeds.csv")
        with open(text) as handle:
            click.echo(markdown_table(pd.read_csv(io.StringIO(handle.read()))))
        return
    click.echo(markdown_table(pd.DataFrame(sorted(run.data.metrics.items()), columns=["metric", "value"])))


EXAMPLES_REPORT = """
\b
Examples:
  python cli.py report                                   # every finished seed run of experiment 'taming'
  python cli.py report --sweep-id latest                 # only the ablations of the latest sweep
  python cli.py report --metric macs --metric interference --baseline "random·bipolar·l2·relu"
  python cli.py report --filter "params.\\`network.epochs\\` = '2000'" --paired --out reports/full
"""


@cli.command(epilog=EXAMPLES_REPORT)
@click.option(
    "--experiment",
    default=None,
    help="MLflow experiment name [default: the one `mlflow run` hands over, else 'taming'].",
)
@click.option(
    "--tracking-uri",
    default=None,
    help="MLflow tracking URI [default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db].",
)
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
    help="Configuration every other is compared with [default: random·bipolar·l1·relu].",
)
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    help="Metric to compare (repeatable) [default: the headline metrics].",
)
@click.option(
    "--paired",
    is_flag=True,
    help="Paired t-tests on shared seeds (seed k of every configuration sees the same data).",
)
@click.option(
    "--resamples",
    type=click.IntRange(min=100),
    default=9999,
    show_default=True,
    help="Bootstrap resamples for the CI of each difference.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for the CSVs, report.md, report.html and PNGs [default: reports/report-<time>].",
)
@click.option("--no-log", is_flag=True, help="Write the report files only; do not log an analysis run.")
def report(
    experiment, tracking_uri, sweep_id, filter_string, baseline, metrics, paired, resamples, out_dir, no_log
):
    """Statistics from the tracking store: every configuration against a baseline, and the 2^4 factorial.

    Reads only FINISHED seed runs (failed ones are counted, never silently dropped), recomputes every
    statistic from the stored per-seed values (Welch or paired t, Cohen's d, Hedges' g, bootstrap CI,
    Holm and BH corrections; OLS/ANOVA for all 15 factorial effects when all 16 cells are present),
    prints Markdown tables, writes comparisons.csv, factorial.csv, report.md, report.html and figures,
    and logs them as an analysis run beside the runs it read.
    """
    import time
    from pathlib import Path

    from pipeline.analysis import BASELINE_NAME, DEFAULT_METRICS, build_report
    from tracking.analysis import log_report, select_seeds
    from tracking.store import TrackingError

    store = _store(tracking_uri)
    adopted = _adopted_run(store)
    try:
        if experiment is None and adopted is not None:
            experiment_id = adopted.info.experiment_id
        else:
            experiment_id = store.existing_experiment_id(experiment)
        frame, query = select_seeds(store, experiment_id, sweep_id=sweep_id, filter_string=filter_string)
    except TrackingError as error:
        _fail_usage(str(error))
    baseline = baseline or BASELINE_NAME
    try:
        built = build_report(
            frame,
            metrics=list(metrics) or list(DEFAULT_METRICS),
            baseline=baseline,
            paired=paired,
            n_resamples=resamples,
        )
    except ValueError as error:
        _fail_usage(f"--baseline/--metric: {error}")
    folder = Path(out_dir or f"reports/report-{time.strftime('%Y%m%d-%H%M%S')}")
    files = built.write(folder)
    click.echo(built.markdown())
    click.echo(f"\nReport files in {folder}/ (open report.html in a browser).")
    if not no_log:
        options = {
            "baseline": baseline,
            "metrics": ",".join(built.metrics),
            "paired": paired,
            "resamples": resamples,
            "sweep_id": sweep_id or "",
            "filter": filter_string or "",
        }
        run_id = log_report(
            store,
            experiment_id,
            files,
            description=built.headline(),
            query=query,
            options=options,
            adopted_run_id=adopted.info.run_id if adopted is not None else None,
        )
        click.echo(f"Logged as analysis run {run_id} in experiment {experiment_id}.")


def main() -> None:
    # MLflow's own download bars would interleave with ours.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    cli(prog_name="python cli.py")


if __name__ == "__main__":
    main()
