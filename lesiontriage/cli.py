"""`lesiontriage` console script. Grammar mirrors the Python API: `lesiontriage <task> <verb>`.

Each sub-command is a thin wrapper: parse options, call one library function, print a rich
table. Errors the user can fix are printed as one line on stderr (no traceback), exit code 1.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="lesiontriage: skin-lesion triage (research use only)")
data_app = typer.Typer(no_args_is_help=True, help="Build the data manifest and synthetic scenes.")
app.add_typer(data_app, name="data")
console = Console()
err_console = Console(stderr=True)


def _warn_stale_closeup_rule(models_dir: Optional[Path] = None) -> None:
    """One warning line on stderr when the shipped close-up rule is not `train closeup-rule`'s choice for the shipped
    models (the rule chain hybrid -> closeup-rule -> tiers was broken off); silent when metadata cannot be read."""
    from lesiontriage.errors import LesionTriageError
    from lesiontriage.paths import MODELS_DIR
    from lesiontriage.train.closeup_rule import stale_closeup_rule
    from lesiontriage.weights import read_metadata

    try:
        reason = stale_closeup_rule(read_metadata(models_dir or MODELS_DIR))
    except (LesionTriageError, OSError, ValueError, KeyError, TypeError):
        return  # the command itself reports an unreadable model folder
    if reason:
        err_console.print(f"[yellow]warning:[/yellow] close-up rule out of date: {reason}", highlight=False)


def _fail(message: str) -> None:
    # soft_wrap: one line whatever the terminal width, so scripts can grep it.
    err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=1)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


# ---- data -------------------------------------------------------------------------------------
@data_app.command("build")
def data_build(
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Shared data folder (default $LESIONTRIAGE_DATA or ../shared/data)"),
    out: Path = typer.Option(Path("runs/data"), "--out", help="Output folder for manifest.parquet and data_report.json"),
    report_copy: Optional[Path] = typer.Option(Path("models/reports/data_report.json"), "--report-copy", help="Also write the report here ('' to skip)"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Read every data set, unify labels, split leakage-free, write manifest + report."""
    from lesiontriage.data.manifest import build_manifest
    from lesiontriage.errors import DataError

    try:
        result = build_manifest(data_root=data_root, out_dir=out, seed=seed, report_copy=report_copy if str(report_copy or "") else None)
    except DataError as exc:
        _fail(str(exc))
    from lesiontriage.data.manifest import counts_table

    console.print(counts_table(result.manifest))
    console.print(f"manifest: {result.manifest_path}  ({len(result.manifest)} rows, sha256 {result.manifest_hash[:12]})")


# ---- evaluate (owner: evaluation; lesiontriage/evaluate/run.py) --------------------------------
@app.command("evaluate")
def evaluate_cmd(
    models: Optional[Path] = typer.Option(None, "--models", help="Models folder (default: the shipped models/)"),
    out: Optional[Path] = typer.Option(None, "--out", help="Report folder, JSON + parquet (default: models/reports/)"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Shared data folder"),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="Manifest parquet (default runs/data/manifest.parquet)"),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Images per split (seeded sample) for a quick run"),
    seed: int = typer.Option(0, "--seed", help="Seed for sampling, bootstrap and the embedding map"),
    n_boot: int = typer.Option(1000, "--n-boot", min=0, help="Bootstrap replicates for the CIs"),
    workers: int = typer.Option(2, "--workers", min=1, help="Inference processes, 1 thread each (1 = one process, all threads)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="Ignore and do not write runs/eval_cache/"),
) -> None:
    """Evaluate the shipped models on every test split; write models/reports/ (JSON + parquet)."""
    from lesiontriage.errors import LesionTriageError
    from lesiontriage.evaluate.run import EvalSettings, evaluate
    from lesiontriage.paths import MODELS_DIR, REPORTS_DIR, RUNS_DIR

    settings = EvalSettings(models_dir=models or MODELS_DIR, out_dir=out or REPORTS_DIR, data_root=data_root, manifest=manifest, limit=limit, seed=seed,
                            n_boot=n_boot, n_boot_paired=2 * n_boot, workers=workers,
                            cache_dir=None if no_cache else RUNS_DIR / "eval_cache",
                            command=" ".join(["lesiontriage", *sys.argv[1:]]))
    _warn_stale_closeup_rule(settings.models_dir)
    try:
        res = evaluate(settings)
    except LesionTriageError as exc:
        _fail(str(exc))
    from rich.table import Table

    table = Table(title=f"lesiontriage evaluate: {res.n_images} images ({res.n_computed} computed) in {res.seconds['total']:.0f} s")
    for col in ("metric", "value", "95% CI", "n", "split / status"):
        table.add_column(col)
    for key, m in res.summary.items():
        if not isinstance(m, dict) or "value" not in m:
            continue
        v = m.get("value")
        ci = f"{m['ci_low']:.3f}-{m['ci_high']:.3f}" if m.get("ci_low") is not None and m.get("ci_high") is not None else ""
        where = str(m.get("status") or m.get("split") or "")
        table.add_row(key, f"{v:.3f}" if isinstance(v, (int, float)) else "-", ci, str(m.get("n") or ""),
                      where if len(where) <= 60 else where[:57] + "...")
    console.print(table)
    console.print(f"reports: {res.out_dir}")


# ---- data scenes (owner: scenes; lesiontriage/data/scenes.py) ---------------------------------
@data_app.command("scenes")
def data_scenes(
    n: int = typer.Option(..., "--n", min=1, help="Number of scenes"),
    seed: int = typer.Option(0, "--seed", help="Scene i of (split, seed) is always the same image"),
    split: str = typer.Option("train", "--split", help="train | val | test: lesions and backgrounds from this manifest split only"),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default runs/scenes/<split>/)"),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="Manifest parquet (default runs/data/manifest.parquet)"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Shared data folder"),
    long_side: int = typer.Option(2048, "--long-side", min=256, help="Nominal long side in px (each scene x0.8-1.3)"),
    workers: int = typer.Option(2, "--workers", min=1, help="Processes (run under `nice` next to training)"),
) -> None:
    """Generate SYNTHETIC wide-field phone photos: real lesions pasted onto real skin, with boxes and labels."""
    from rich.progress import Progress

    from lesiontriage.data.scenes import generate_scenes
    from lesiontriage.errors import DataError

    if split not in ("train", "val", "test"):
        _fail(f"--split {split!r}: choose train, val or test")
    try:
        with Progress(console=err_console, transient=True) as bar:
            task = bar.add_task(f"SYNTHETIC {split} scenes", total=n)
            res = generate_scenes(n, seed=seed, split=split, out_dir=out, manifest=manifest, data_root=data_root,
                                  long_side=long_side, workers=workers, command=" ".join(["lesiontriage", *sys.argv[1:]]),
                                  progress=lambda done, total: bar.update(task, completed=done))
    except DataError as exc:
        _fail(str(exc))
    idx = res.index
    n_mal = int(sum(sum(1 for m in v if m == 1) for v in idx["box_malignant"]))
    n_pasted = int(idx["n_pasted"].sum())
    console.print(f"{len(idx)} SYNTHETIC {split} scenes in {res.seconds:.1f} s ({res.workers} workers): "
                  f"{n_pasted} pasted lesions ({n_mal} malignant), {int(idx['n_background_moles'].sum())} background moles")
    console.print(f"index: {res.index_path}")


# ---- data pseudo-boxes (lesiontriage/data/pseudo_boxes.py) ------------------------------------
@data_app.command("pseudo-boxes")
def data_pseudo_boxes(
    sources: str = typer.Option("derm7pt,sd198_tumour_subset", "--sources", help="Comma-separated box-less sets"),
    splits: str = typer.Option("train,val", "--splits", help="Comma-separated manifest splits (never test for training)"),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="Manifest parquet (default runs/data/manifest.parquet)"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Shared data folder"),
) -> None:
    """The shipped detector's largest kept box for every photo of box-less sets (cached in runs/data/)."""
    from lesiontriage.data.manifest import load_manifest
    from lesiontriage.data.pseudo_boxes import build_pseudo_boxes, pipeline_cache_path
    from lesiontriage.errors import LesionTriageError
    from lesiontriage.pipeline import TriagePipeline

    try:
        m = load_manifest(manifest)
        rows = m[m["source"].isin(sources.split(",")) & m["split"].isin(splits.split(","))]
        if rows.empty:
            _fail(f"no manifest rows of {sources} in splits {splits}")
        pipe = TriagePipeline.from_dir(load_image_classifier=False)
        cache = pipeline_cache_path(pipe)
        table = build_pseudo_boxes(pipe, rows, cache, data_root)
    except (LesionTriageError, FileNotFoundError) as exc:
        _fail(str(exc))
    boxed = table["box"].notna()
    console.print(f"{int(boxed.sum())} of {len(table)} photos got a pseudo-box (median box fraction "
                  f"{table.loc[boxed, 'box_fraction'].median():.3f}); cache: {cache}")


# ---- more commands are registered below (scenes, train, predict, evaluate, bench) -------------

# ---- bench ------------------------------------------------------------------------------------
@app.command("research")
def research_cmd(
    studies: Optional[list[str]] = typer.Argument(None, help="clinical | management | ensemble | ablations (default: all)"),
    models: Optional[Path] = typer.Option(None, "--models", help="Models folder (default: the shipped models/)"),
    out: Optional[Path] = typer.Option(None, "--out", help="Report folder (default: models/reports/)"),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Shared data folder"),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="Manifest parquet (default runs/data/manifest.parquet)"),
    ensemble_run: list[str] = typer.Option(["classifier_lite2"], "--ensemble-run", help="runs/<name> (or shipped classifier_<name>) to ensemble with"),
    n_boot: int = typer.Option(1000, "--n-boot", min=1),
    seed: int = typer.Option(0, "--seed"),
    no_export: bool = typer.Option(False, "--no-export", help="Do not ship the combined clinical / management models"),
) -> None:
    """Seed extras, measured: clinical covariates, management (derm7pt), ensemble, ablations (threshold, CLAHE, imbalance)."""
    from lesiontriage.errors import LesionTriageError
    from lesiontriage.paths import MODELS_DIR
    from lesiontriage.research.run import STUDIES, ResearchSettings, run_research

    chosen = studies or list(STUDIES)
    unknown = [s for s in chosen if s not in STUDIES]
    if unknown:
        _fail(f"unknown study {unknown[0]!r}; choose from {', '.join(STUDIES)}")
    settings = ResearchSettings(models_dir=models or MODELS_DIR, out_dir=out, data_root=data_root, manifest=manifest,
                                ensemble_runs=tuple(ensemble_run), n_boot=n_boot, seed=seed,
                                command=" ".join(["lesiontriage", *sys.argv[1:]]), export_models=not no_export)
    try:
        written = run_research(settings, chosen)
    except (LesionTriageError, FileNotFoundError) as exc:
        _fail(str(exc))
    for name, path in written.items():
        console.print(f"{name:20s} {path}")


@app.command("bench")
def bench(
    models: Optional[Path] = typer.Option(None, "--models", help="Models folder (default: shipped models/)"),
    repeats: int = typer.Option(7, "--repeats", help="Predictions per image kind"),
    seed_config: bool = typer.Option(True, "--seed-config/--no-seed-config", help="Also time the seed paper's ResNet-50 setup"),
    out: Path = typer.Option(Path("models/reports/bench.json"), "--out"),
) -> None:
    """Per-stage latency, throughput, load time and memory; side by side with the seed configuration."""
    from rich.table import Table

    from lesiontriage.bench import run_bench
    from lesiontriage.errors import LesionTriageError
    from lesiontriage.train.common import command_line

    try:
        rep = run_bench(models, repeats=repeats, seed_config=seed_config, out=out, command=command_line())
    except LesionTriageError as exc:
        _fail(str(exc))
    table = Table(title="lesiontriage bench (ms: median / p95)")
    for col in ("config", "image", "stage", "median ms", "p95 ms", "n"):
        table.add_column(col)
    for config, block in (("lesiontriage", rep.stages), ("seed R50-FPN", rep.seed_config)):
        for kind, stages in block.items():
            for stage, st in stages.items():
                table.add_row(config, kind, stage, f"{st.median_ms:.1f}", f"{st.p95_ms:.1f}", str(st.n))
    console.print(table)
    console.print(f"model load: {rep.load_s}  throughput: {rep.throughput_images_per_s}  peak RSS MB: {rep.peak_rss_mb}")
    console.print(f"speed ratio (seed / ours, end-to-end median): {rep.speed_ratio_end_to_end}  -> {out}")



# ---- predict ----------------------------------------------------------------------------------
@app.command("predict")
def predict(
    inputs: list[Path] = typer.Argument(..., help="Image files and/or folders"),
    out: Path = typer.Option(Path("results.csv"), "--out", help="CSV with one row per image"),
    aggregate: Optional[str] = typer.Option(None, "--aggregate", help="mean | max | noisy_or (default: the one chosen on validation, see metadata.json)"),
    whole_image: bool = typer.Option(False, "--whole-image", help="Direct whole-image classifier instead of two-stage"),
    as_json: bool = typer.Option(False, "--json", help="Also print one JSON result per image to stdout"),
    models: Optional[Path] = typer.Option(None, "--models", help="Models folder (default: shipped models/)"),
    ensemble: Optional[bool] = typer.Option(None, "--ensemble/--no-ensemble", help="Average classifier + classifier_2 (default: metadata.json's setting)"),
) -> None:
    """Triage photos: CSV row per image (image, status, image_score, tier, n_lesions, lesions)."""
    import csv

    from rich.progress import track

    from lesiontriage.aggregation import AGGREGATORS
    from lesiontriage.batch import CSV_COLUMNS, expand_inputs, run_batch
    from lesiontriage.errors import LesionTriageError
    from lesiontriage.pipeline import TriagePipeline

    if aggregate is not None and aggregate not in AGGREGATORS:
        _fail(f"--aggregate {aggregate!r}: choose one of {', '.join(AGGREGATORS)}")
    paths = expand_inputs(inputs)
    if not paths:
        _fail("no image files found in the given inputs")
    try:
        pipe = TriagePipeline.from_dir(models, ensemble=ensemble)
    except LesionTriageError as exc:
        _fail(str(exc))
    aggregate = aggregate or pipe.settings.default_aggregate
    n_err = 0
    rows = run_batch(pipe, paths, aggregate, whole_image=whole_image)
    if len(paths) > 1:
        rows = track(rows, total=len(paths), description="triage", console=err_console)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(row.csv_row())
            if row.result is None:
                n_err += 1
                err_console.print(f"error: {row.image}: {row.status[len('error: '):]}", highlight=False, markup=False,
                                  soft_wrap=True)
            elif as_json:
                sys.stdout.write(row.result.to_json() + "\n")
    if not as_json:
        console.print(f"{len(paths) - n_err} ok, {n_err} failed -> {out}")
    if n_err:
        raise typer.Exit(code=1)



# ---- train ------------------------------------------------------------------------------------
def _print_table(rows: list[dict]) -> None:
    """A validation study's candidate table, one line per candidate."""
    for row in rows:
        console.print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


_TRAIN_DEFAULTS = {"detector": "detector", "classifier": "classifier", "image-classifier": "image_classifier"}


def _train_soup(runs: Optional[str], name: str, *, uniform: bool, export: bool, manifest: Optional[Path],
                data_root: Optional[Path]) -> None:
    """`train soup`: greedy weight soup of finished runs, exported only when it beats the best single run
    (``--uniform``: the average of every run, always exported; `train hybrid` then judges it)."""
    from lesiontriage.train.common import command_line
    from lesiontriage.train.export import export_run
    from lesiontriage.train.soup import make_soup

    specs = [s.strip() for s in (runs or "").split(",") if s.strip()]
    try:
        record, out = make_soup(specs, name, command=command_line(), manifest_path=manifest, data_root=data_root,
                                uniform=uniform)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    console.print(f"soup members: {', '.join(record.members)}; val macro {record.soup_val_auc['macro']:.4f} "
                  f"(best single {record.best_single} {record.best_single_macro:.4f}, logit ensemble of all candidates "
                  f"{record.ensemble_val_auc['macro']:.4f}); {record.reason}")
    if export and record.ship:
        kind = "classifier" if out["config"]["mode"] == "crop" else "image-classifier"
        path = export_run(kind, out, data_root=data_root, manifest_path=manifest)
        console.print(f"exported to {path} (run `lesiontriage train hybrid`, `train tiers` and `evaluate` next)")


@app.command("train")
def train(
    model: str = typer.Argument(..., help="detector | classifier | image-classifier | soup | box-merge | box-rescorer | box-rule | widefield-rule | hybrid | closeup-rule | tiers (the last seven chosen on validation)"),
    config: Optional[str] = typer.Option(None, "--config", help="TOML config (default: the packaged one for MODEL)"),
    resume: bool = typer.Option(False, "--resume", help="Continue from runs/<name>/checkpoint.pt"),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="Manifest parquet (default runs/data/manifest.parquet)"),
    data_root: Optional[Path] = typer.Option(None, "--data-root"),
    export: bool = typer.Option(True, "--export/--no-export", help="Write the best weights + metadata to models/"),
    export_only: bool = typer.Option(False, "--export-only", help="Skip training; export the finished run in runs/<name>/"),
    export_weights: str = typer.Option("best.pt", "--export-weights",
                                       help="Which file of runs/<name>/ to export: best.pt (the run's own validation "
                                            "criterion) or checkpoint.pt (its last epoch)"),
    soup_runs: Optional[str] = typer.Option(None, "--runs", help="soup: comma-separated runs in runs/ that share a "
                                            "start point, each RUN or RUN:checkpoint.pt"),
    soup_name: str = typer.Option("soup", "--name", help="soup: the run folder runs/<name>/ the soup is written to"),
    whole_ensemble: Optional[bool] = typer.Option(None, "--whole-image-ensemble/--single-whole-image",
                                                  help="hybrid: choose the whole-image view among every set of the "
                                                       "installed image_classifier* models (or use image_classifier "
                                                       "alone) before choosing the blend; unset keeps the view's members"),
    keep_whole_view: bool = typer.Option(False, "--keep-whole-view",
                                         help="hybrid: keep the shipped whole-image view (skip step 0, ~25 min) and "
                                              "re-choose only the blend"),
    soup_uniform: bool = typer.Option(False, "--uniform", help="soup: average every run and export it (for a view "
                                      "judged on the product score by `train hybrid`) instead of the greedy soup"),
    check_product: bool = typer.Option(False, "--check-product",
                                       help="classifier: skip training; score the run's checkpoints on the product's "
                                            "validation score next to the shipped classifier (decides an export)"),
) -> None:
    """Train one model; checkpoints go to runs/<name>/, the best epoch is exported to models/."""
    if model == "tiers":
        from lesiontriage.train.common import command_line
        from lesiontriage.train.tiers import calibrate_tiers

        _warn_stale_closeup_rule()
        chosen = calibrate_tiers(manifest_path=manifest, data_root=data_root, command=command_line())
        for mode, entry in chosen.items():
            for agg, thr in entry["thresholds"].items():
                console.print(f"{mode:12s} {agg:9s} refer >= {thr['refer']:.3f}  urgent >= {thr['urgent']:.3f}")
        return
    if model == "soup":
        _train_soup(soup_runs, soup_name, uniform=soup_uniform, export=export, manifest=manifest, data_root=data_root)
        return
    if model == "box-rule":
        from lesiontriage.train.box_rule import choose_box_rule
        from lesiontriage.train.common import command_line

        record = choose_box_rule(manifest_path=manifest, data_root=data_root, command=command_line())
        _print_table(record["table"])
        console.print(f"chosen nested_containment = {record['nested_containment']}, flip_tta = {record['flip_tta']} "
                      "(run `lesiontriage train tiers` next)")
        return
    if model == "box-merge":
        from lesiontriage.train.box_merge import choose_box_merge
        from lesiontriage.train.common import command_line

        record = choose_box_merge(manifest_path=manifest, data_root=data_root, command=command_line())
        _print_table(record["table"])
        console.print(f"chosen merge_score = {record['merge_score']}, merge_iou = {record['merge_iou']}, "
                      f"merge_min_area = {record['merge_min_area']} "
                      "(run `lesiontriage train box-rule`, `train hybrid` and `train tiers` next)")
        return
    if model == "widefield-rule":
        from lesiontriage.train.common import command_line
        from lesiontriage.train.widefield_rule import choose_widefield_rule

        record = choose_widefield_rule(manifest_path=manifest, data_root=data_root, command=command_line())
        _print_table(record["table"])
        console.print(f"chosen widefield_score_threshold = {record['widefield_score_threshold']}, widefield_min_lesions = "
                      f"{record['widefield_min_lesions']} (run `lesiontriage train hybrid` and `train tiers` next)")
        return
    if model == "box-rescorer":
        from lesiontriage.train.box_rescorer import record_table, train_box_rescorer
        from lesiontriage.train.common import command_line

        record = train_box_rescorer(manifest_path=manifest, data_root=data_root, command=command_line())
        console.print(record_table(record).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        console.print(f"box rescorer {'shipped' if record['shipped'] else 'not shipped'}: {record['reason']}")
        return
    if model == "hybrid":
        from lesiontriage.train.common import command_line
        from lesiontriage.errors import LesionTriageError
        from lesiontriage.train.hybrid import choose_hybrid

        try:
            record = choose_hybrid(manifest_path=manifest, data_root=data_root, command=command_line(),
                                   whole_image_ensemble=whole_ensemble, keep_whole_view=keep_whole_view)
        except (LesionTriageError, FileNotFoundError) as exc:
            _fail(str(exc))
        _print_table(record["table"])
        score = record.get("whole_image_score") or {}
        if score:
            _print_table(score["table"])
            console.print(f"whole-image view: {' + '.join(score['members'])}, sub-type share = {score['subtype_weight']} "
                          f"(0 = the binary head alone), temperature = {score['temperature']:.3f}")
        console.print(f"chosen whole_image_weight = {record['whole_image_weight']}, full_frame_weight = "
                      f"{record['full_frame_weight']}, close-up gate = "
                      f"{record['closeup_min_box_fraction']}, soft gate from = {record.get('closeup_ramp_from')}, "
                      f"no-lesion photos scored by the views = {record.get('no_lesion_views', False)}, photos in the ramp "
                      f"scored on their main lesion = {record.get('closeup_ramp_primary_lesion', False)}, close-up crop "
                      f"margin = {record.get('closeup_crop_margin')} "
                      "(run `lesiontriage train closeup-rule`, then `train tiers` next: this reset the close-up rule)")
        for cand in record.get("soft_gate", {}).get("candidates", []):
            console.print("  soft gate " + "  ".join(f"{k}={v}" for k, v in cand.items()))
        check = record.get("main_lesion_confirmation")
        if check:
            console.print(f"  main lesion in the ramp, every labelled validation photo ({check['n_photos']}, "
                          f"{check['n_main_lesion']} scored on their main lesion): macro AUC {check['macro_without']} -> "
                          f"{check['macro_with']} ({'confirmed' if check['confirmed'] else 'not confirmed: off'})")
        return
    if model == "closeup-rule":
        from lesiontriage.errors import LesionTriageError
        from lesiontriage.train.closeup_rule import run_closeup_rule
        from lesiontriage.train.common import command_line

        try:
            choice = run_closeup_rule(manifest_path=manifest, data_root=data_root, command=command_line())
        except (LesionTriageError, FileNotFoundError) as exc:
            _fail(str(exc))
        _print_table(choice.top)
        gains = choice.oof_gains
        console.print(f"every labelled validation photo: current rule {choice.current_macro:.4f}, best of "
                      f"{choice.n_guarded} wide-field-safe rules {choice.best_macro:.4f}; out-of-fold gain of choosing "
                      f"it {sum(gains) / len(gains):+.4f} (min {min(gains):+.4f}); validation scenes' AUC {choice.scene_auc}")
        c = choice.chosen
        console.print(f"{'adopted' if choice.adopted else 'kept the current rule'}: whole_image_weight = {c.whole_image_weight}, "
                      f"full_frame_weight = {c.full_frame_weight}, close-up gate = {c.closeup_min_box_fraction}, soft gate "
                      f"from = {c.ramp_from}, main lesion in the ramp = {c.ramp_primary_lesion} "
                      "(run `lesiontriage train tiers` next)")
        return
    if model not in _TRAIN_DEFAULTS:
        _fail(f"unknown model {model!r}; choose one of {', '.join(_TRAIN_DEFAULTS)}, soup, box-merge, box-rescorer, box-rule, widefield-rule, hybrid, closeup-rule, tiers")
    cfg = config or _TRAIN_DEFAULTS[model]
    if export_weights not in ("best.pt", "checkpoint.pt"):  # checked before a run, not after it
        _fail(f"--export-weights must be best.pt or checkpoint.pt, got {export_weights!r}")
    if check_product:
        if model != "classifier":
            _fail("--check-product applies to the lesion classifier only")
        from lesiontriage.train.product_check import check_run

        try:
            record = check_run(cfg, manifest_path=manifest, data_root=data_root)
        except FileNotFoundError as exc:
            _fail(str(exc))
        for r in record["results"]:
            crop = f"{r['crop_macro_auc']:.4f}" if r["crop_macro_auc"] is not None else "-"
            console.print(f"{r['name']:14s} epoch {r['epoch']}  crop macro {crop}  frame view {r['frame_macro_auc']:.4f}  "
                          f"product {r['product_macro_auc']:.4f} (whole {r['whole_image_weight']}, frame "
                          f"{r['full_frame_weight']})  scene lesions {r['scene_lesion_auc']} (n {r['scene_lesions']})  "
                          f"{r['by_stratum']}")
        return
    if model == "detector":
        from lesiontriage.train.detector import run_training
    else:
        from lesiontriage.train.classifier import run_training
    if export_only:
        from lesiontriage.paths import RUNS_DIR
        from lesiontriage.train.common import load_result, load_toml

        raw = load_toml(cfg)
        out = load_result(RUNS_DIR / raw.get("name", _TRAIN_DEFAULTS[model]))
        if raw.get("export_key"):  # a config edited after its run may name where it ships
            out["config"]["export_key"] = raw["export_key"]
    else:
        out = run_training(cfg, resume=resume, manifest=manifest, data_root=data_root)
    console.print(f"best: {out['best']}")
    if export:
        from lesiontriage.train.export import export_run, start_point_unbeaten

        if start_point_unbeaten(out, export_weights):
            console.print(f"no epoch beat the start point ({out['config']['init_from']}): nothing exported "
                          "(--export-weights checkpoint.pt ships the last epoch on purpose)")
            return
        try:
            path = export_run(model, out, data_root=data_root, manifest_path=manifest, weights_file=export_weights)
        except (FileNotFoundError, ValueError) as exc:
            _fail(str(exc))
        console.print(f"exported to {path}")




def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
