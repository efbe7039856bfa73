"""The `ssl-bench` command line. Bad input → one line on stderr, exit code 2, no traceback."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import Interrupted, UserError

DATA_HELP = "LA data root (the folder with train.list); default: $SSL_BENCH_DATA"


def _patch(value):
    if value is None:
        return None
    try:
        parts = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise UserError(f"--patch must look like 112,112,80, got {value!r}") from None
    if len(parts) != 3:
        raise UserError(f"--patch needs three sizes like 112,112,80, got {value!r}")
    return parts


def _options(pairs) -> dict:
    """KEY=VALUE pairs; values are parsed as JSON numbers/booleans where they look like one, else kept as text."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--option must look like KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _default_out(method: str, labeled: int, seed: int, protocol: str, profile: str, precision: str = "tf32") -> Path:
    from .experiments import run_name  # the experiments' cell IDs use the same name

    return Path("runs") / run_name(method, labeled, seed, protocol, profile, precision)


PRECISION_HELP = ("numerics (docs/methods.md Decision 7): tf32 = the references' fp32 with TF32 convolutions on CUDA (default), "
                  "fp32 = TF32 off too, bf16/fp16 = autocast (opt-in fast modes; fp16 needs CUDA)")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ssl-bench", prog_name="ssl-bench")
def cli():
    """Semi-supervised left-atrium segmentation benchmark (V-Net, UA-MT, SASSNet, DTC, SS-Net, BCP, OMF)."""


@cli.command()
@click.option("--method", required=True, help="registered method name (see `ssl-bench methods`)")
@click.option("--labeled", type=int, default=8, show_default=True, help="labeled cases: the first N of train.list")
@click.option("--data", "data_dir", default=None, help=DATA_HELP)
@click.option("--seed", type=int, default=1337, show_default=True)
@click.option("--iterations", type=int, default=None, help="override every stage's iteration count")
@click.option("--schedule-scale", type=float, default=None,
              help="scale every constant each method counts in iterations: stage lengths, lr steps, ramps, selection "
                   "(the CPU track; default 1 = the paper's schedules)")
@click.option("--patch", default=None, help="training/eval patch X,Y,Z (default 112,112,80)")
@click.option("--n-filters", type=int, default=None, help="V-Net base width (default 16)")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--protocol", type=click.Choice(["honest", "literature", "val"]), default="honest", show_default=True,
              help="honest: evaluate the last checkpoint; literature: best-on-test where the reference does it; "
                   "val: best on the validation cases (the last --val-cases of train.list) in every stage")
@click.option("--val-cases", type=int, default=None,
              help="--protocol val: how many of train.list's last cases select the checkpoint (default 8); they stay "
                   "in the unlabeled pool")
@click.option("--selection-every", type=int, default=None,
              help="iterations between selections under literature/val (default: the reference's 200)")
@click.option("--profile", type=click.Choice(["paper", "smoke", "demo", "cpu"]), default="paper", show_default=True,
              help="paper: the published schedules; cpu: the CPU track (use it with `data derive` data); "
                   "smoke/demo: wiring checks")
@click.option("--checkpoint-every", type=int, default=None)
@click.option("--eval-cases", type=int, default=None, help="evaluate only the first N test cases")
@click.option("--empty-policy", type=click.Choice(["penalty", "zero"]), default=None,
              help="metrics of an empty prediction (default penalty: Dice 0, distances = volume diagonal)")
@click.option("--precision", type=click.Choice(["fp32", "tf32", "bf16", "fp16"]), default=None, help=PRECISION_HELP)
@click.option("--units", type=click.Choice(["voxel", "mm"]), default=None,
              help="95HD/ASD units (default: the data set's, voxels for LA as in its literature; mm needs stored spacings)")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="a method's named option (repeatable), e.g. ssnet_memory_weights=mean")
@click.option("--teacher", type=click.Path(path_type=Path), default=None,
              help="reuse stage 1 of this run folder instead of training it (multi-stage methods)")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="run folder (default runs/<method>-L<n>-s<seed>-<protocol>)")
@click.option("--resume", is_flag=True, help="continue the run in --out from its last checkpoint")
@click.option("--overwrite", is_flag=True, help="replace an existing run folder")
@click.option("--quiet", is_flag=True, help="no progress line")
def run(method, labeled, data_dir, seed, iterations, schedule_scale, patch, n_filters, device, protocol, val_cases, selection_every,
        profile, checkpoint_every,
        eval_cases, empty_policy, precision, units, options, teacher, out, resume, overwrite, quiet):
    """Train METHOD, evaluate it on the test set and write a self-describing run folder."""
    from .data import LAData
    from .trainer import build_config, run_training

    given = dict(labeled=labeled, seed=seed, iterations=iterations, schedule_scale=schedule_scale,
                 patch=_patch(patch), n_filters=n_filters,
                 device=device, protocol=protocol, val_cases=val_cases, selection_every=selection_every,
                 checkpoint_every=checkpoint_every, eval_cases=eval_cases, empty_policy=empty_policy,
                 precision=precision, units=units, teacher=str(teacher.resolve()) if teacher else None,
                 options=_options(options))
    build_config(method, profile, **given)  # the options' own errors first, before the data is looked for
    # an imported data set's own patch, strides and units are its defaults
    cfg = build_config(method, profile, dataset_defaults=LAData(data_dir).run_defaults(), **given)
    cfg = _cpu_precision(cfg)
    out = out or _default_out(method, labeled, seed, protocol, profile, cfg.precision)
    summary = run_training(cfg, out, data_dir, resume=resume, overwrite=overwrite, progress=not quiet)
    _print_summary(summary, out)


def _cpu_precision(cfg):
    """bf16 on a CPU without bf16 instructions: one line on stderr, fp32 instead, recorded (requested_precision)."""
    from dataclasses import replace

    from .precision import CPU_BF16_FALLBACK, cpu_bf16_supported
    from .trainer import resolve_device

    if cfg.precision == "bf16" and resolve_device(cfg.device).type == "cpu" and not cpu_bf16_supported():
        click.echo(f"ssl-bench: {CPU_BF16_FALLBACK}", err=True)
        return replace(cfg, precision="fp32", requested_precision="bf16")
    return cfg


def _print_summary(summary: dict, out: Path) -> None:
    unit = summary.get("units") or "voxel"  # of 95HD and ASD (--units; a folder from before it: voxels)
    for post, m in summary["metrics"].items():
        mark = " (method's own default)" if post == summary["paper_post"] else ""
        click.echo(f"{summary['method']} L={summary['labeled']} seed={summary['seed']} {summary['protocol']} [{post}{mark}]: "
                   f"Dice {100 * m['dice']:.2f}  Jaccard {100 * m['jaccard']:.2f}  95HD {m['hd95']:.2f} {unit}  "
                   f"ASD {m['asd']:.2f} {unit}  empty {m['n_empty']}/{m['n_cases']}")
    click.echo(f"run folder: {out}")


@cli.command("eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--data", "data_dir", default=None, help="data root (default: the one recorded in the run)")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None)
@click.option("--quiet", is_flag=True)
def eval_cmd(run_dir, data_dir, device, quiet):
    """Re-evaluate a finished run folder (rewrites metrics_per_case.csv and summary.json atomically)."""
    from .trainer import evaluate_run

    _print_summary(evaluate_run(run_dir, data_dir, device, progress=not quiet), run_dir)


@cli.command("methods")
def methods_cmd():
    """List the registered methods: stages, where each comes from (built-in or plugin), summary. A plugin that
    fails to load does not hide the others: they are listed, and it is named in one line (exit 2)."""
    from .method import registry
    from .plugins import collecting_failures

    with collecting_failures() as failures:
        methods = registry()
    for name, spec in sorted(methods.items()):
        stages = " -> ".join(s.__name__ for s in spec.stages)
        click.echo(f"{name:16s} [{spec.origin}]  {len(spec.stages)} stage(s): {stages}  {spec.summary}".rstrip())
    if failures:
        more = f" (and {len(failures) - 1} more broken plugin(s))" if len(failures) > 1 else ""
        raise UserError(f"{failures[0]}{more}")


def _load_plugins(argv) -> None:
    """Import the plugin methods before any command runs (a broken plugin: one line, exit 2); `methods` loads them
    itself, so that it can list the methods of the plugins that work."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or any(a in ("-h", "--help", "--version") for a in args) or args[0] == "methods":
        return
    from .method import registry

    registry()


@cli.group()
def data():
    """Check the LA data, make the built-in demo data set, or import your own (nnU-Net v2 raw layout)."""


@data.command("verify")
@click.option("--data", "data_dir", default=None, help=DATA_HELP)
def data_verify(data_dir):
    """Check every listed case: checksum, readable h5, image/label shapes, label values in {0,1}."""
    from .data import LAData, verify

    ds = LAData(data_dir)
    lines, problems = verify(ds)
    click.echo(f"data: {ds.root}")
    for line in lines:
        click.echo(line)
    for p in problems:
        click.echo(f"problem: {p}")
    if problems:
        raise UserError(f"{len(problems)} problem(s) found in {ds.root}")
    click.echo("ok")


@data.command("demo")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
def data_demo(out, seed):
    """Write the built-in synthetic LA-like data set (16 train, 4 test cases) to OUT."""
    from .demo import make_demo

    make_demo(out, seed=seed)
    click.echo(f"demo data written to {out}")


@data.command("import")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["nnunet"]), required=True,
              help="source layout: nnunet = nnU-Net v2 raw (dataset.json, imagesTr, labelsTr[, imagesTs, labelsTs])")
@click.option("--label", default=None, metavar="VALUE",
              help="foreground label value (or name from dataset.json); default: every nonzero label (binary)")
@click.option("--test-fraction", type=float, default=None, help="share of imagesTr held out as test (default 0.2)")
@click.option("--test-list", type=click.Path(path_type=Path), default=None, help="file with the test case ids, one a line")
@click.option("--test-from", type=click.Choice(["imagesTs"]), default=None,
              help="use the data set's own imagesTs/labelsTs as the test set")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the shuffle that orders train.list (and draws the test set)")
@click.option("--spacing", default=None, metavar="X,Y,Z", help="resample to this voxel spacing in mm (default: keep)")
@click.option("--crop-around-label", default=None, metavar="MX,MY,MZ",
              help="crop every case (TEST CASES INCLUDED) to its label box plus this margin in voxels: uses the "
                   "ground truth, as the LA release did; recorded as such")
@click.option("--channel", type=int, default=0, show_default=True, help="which image channel (<case>_000C) to read")
@click.option("--patch", default=None, metavar="X,Y,Z", help="training patch recorded for this data set (default 112,112,80)")
@click.option("--stride-xy", type=int, default=None, help="sliding-window stride in x/y recorded for this data set (default 18)")
@click.option("--stride-z", type=int, default=None, help="sliding-window stride in z recorded for this data set (default 4)")
def data_import(src, out, fmt, label, test_fraction, test_list, test_from, seed, spacing, crop_around_label, channel,
                patch, stride_xy, stride_z):
    """Import SRC (another data set) into OUT in the layout ssl-bench reads; OUT appears only when complete."""
    from .importer import RECORD_NAME, import_nnunet

    record = import_nnunet(src, out, label=label, test_fraction=test_fraction, test_list=test_list,
                           test_from_imagests=test_from == "imagesTs", seed=seed, spacing=spacing,
                           crop_around_label=crop_around_label, channel=channel, patch=patch,
                           stride_xy=stride_xy, stride_z=stride_z, command={k: (str(v) if isinstance(v, Path) else v)
                                                            for k, v in click.get_current_context().params.items()})
    if any(step.get("uses_ground_truth") for step in record["preprocessing"]):
        click.echo("warning: --crop-around-label crops test cases with their ground truth (recorded in "
                   f"{RECORD_NAME})", err=True)
    for w in record["warnings"]:
        click.echo(f"warning: {w}", err=True)
    click.echo(f"imported {len(record['split']['train'])} train and {len(record['split']['test'])} test cases "
               f"from {src} to {out} ({record['split']['method']}); record: {out / RECORD_NAME}")


@data.command("derive")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--zoom", default="0.5", show_default=True, metavar="Z|ZX,ZY,ZZ",
              help="resampling factor per axis (0.1 to 1): image trilinear, label by the 50%% rule")
@click.option("--patch", default=None, metavar="X,Y,Z",
              help="training patch recorded for the derived set (default: 112,112,80 times the zoom, to multiples of 16)")
@click.option("--stride-xy", type=int, default=None, help="sliding-window stride in x/y (default: 18 times the zoom)")
@click.option("--stride-z", type=int, default=None, help="sliding-window stride in z (default: 4 times the zoom)")
def data_derive(src, out, zoom, patch, stride_xy, stride_z):
    """Write the LA data set at SRC at reduced resolution to OUT (the CPU track's data): same cases and lists,
    a record of the source checksums, zoom and rules; OUT appears only when complete."""
    from .derive import derive

    def progress(done, total, cid):  # on a terminal only: an error line must stay one line of its own
        click.echo(f"\rderive: {done}/{total} cases ({cid})", nl=done == total, err=True)

    record = derive(src, out, zoom=zoom, patch=patch, stride_xy=stride_xy, stride_z=stride_z,
                    progress=progress if sys.stderr.isatty() else None,
                    command={k: (str(v) if isinstance(v, Path) else v)  # not OUT: the record moves with the folder
                             for k, v in click.get_current_context().params.items() if k != "out"})
    s = record["settings"]
    click.echo(f"derived {len(record['split']['train'])} train and {len(record['split']['test'])} test cases at zoom "
               f"{record['preprocessing'][0]['zoom']} to {out}; patch {tuple(s['patch'])}, strides "
               f"{s['eval_stride_xy']}/{s['eval_stride_z']}")


@cli.command()
@click.option("--method", "methods", multiple=True, default=("vnet",), show_default=True,
              help="method to bench (repeatable; `all` = vnet uamt sassnet dtc ssnet bcp omf), after one preload")
@click.option("--data", "data_dir", default=None, help=DATA_HELP)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--profile", type=click.Choice(["paper", "smoke", "demo", "cpu"]), default="paper", show_default=True)
@click.option("--labeled", type=int, default=8, show_default=True, help="labeled cases of the split the streams draw from")
@click.option("--iterations", type=int, default=None, help="timed iterations per stage and path (default 50 on CUDA, 3 on CPU)")
@click.option("--warmup", type=int, default=None, help="untimed iterations before them (default 5 on CUDA, 1 on CPU)")
@click.option("--eval-cases", type=int, default=None, help="test cases timed per path (default 20 on CUDA, 1 on CPU)")
@click.option("--precision", "precisions", type=click.Choice(["fp32", "tf32", "bf16", "fp16"]), multiple=True,
              default=("tf32",), show_default=True,
              help="the fast path's precision (repeatable: the fast path is timed at each); " + PRECISION_HELP)
@click.option("--reference-precision", type=click.Choice(["fp32", "tf32"]), default="tf32", show_default=True,
              help="the reference-style path's numerics: tf32 = the references' float32 on current GPUs, fp32 = TF32 off")
@click.option("--path", "paths", type=click.Choice(["fast", "reference"]), multiple=True, default=("fast", "reference"),
              show_default=True, help="which paths to time (repeatable)")
@click.option("--window-batch", "window_batches", type=int, multiple=True,
              help="also time the fast evaluation at this many windows per forward (repeatable; the run default is 8)")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="also write the measurement as JSON here (rewritten after each method)")
def bench(methods, data_dir, device, profile, labeled, iterations, warmup, eval_cases, precisions, reference_precision,
          paths, window_batches, out):
    """Time training it/s, host ms/iteration and evaluation s/case (inference and LCC+metrics apart), peak
    device memory: fast path vs reference-style path, same process, every case loaded before any timing."""
    from .bench import run_bench

    run_bench(list(methods), data_dir, device, profile, iterations, eval_cases, out, precisions=list(precisions),
              reference_precision=reference_precision, paths=list(paths), warmup=warmup, labeled=labeled,
              window_batches=tuple(window_batches))


from .occlusion import occlusion_command  # noqa: E402
cli.add_command(occlusion_command)
from .sweep import sweep_command  # noqa: E402
from .report import report_command  # noqa: E402
cli.add_command(sweep_command)
cli.add_command(report_command)
from .curves import curves_command  # noqa: E402
cli.add_command(curves_command)


def main(argv=None) -> int:
    try:
        _load_plugins(argv)
        cli.main(args=argv, prog_name="ssl-bench", standalone_mode=False)
    except UserError as exc:
        click.echo(f"ssl-bench: error: {exc}", err=True)
        return 2
    except click.exceptions.UsageError as exc:
        click.echo(f"ssl-bench: error: {exc.format_message()}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("ssl-bench: aborted", err=True)
        return 130
    except Interrupted as exc:
        click.echo(f"ssl-bench: {exc}", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("ssl-bench: interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
