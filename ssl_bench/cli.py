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


def _default_out(method: str, labeled: int, seed: int, protocol: str, profile: str) -> Path:
    tag = "" if profile == "paper" else f"-{profile}"
    return Path("runs") / f"{method}-L{labeled}-s{seed}-{protocol}{tag}"


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
@click.option("--patch", default=None, help="training/eval patch X,Y,Z (default 112,112,80)")
@click.option("--n-filters", type=int, default=None, help="V-Net base width (default 16)")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--protocol", type=click.Choice(["honest", "literature"]), default="honest", show_default=True,
              help="honest: evaluate the last checkpoint; literature: best-on-test where the reference does it")
@click.option("--profile", type=click.Choice(["paper", "smoke", "demo"]), default="paper", show_default=True)
@click.option("--checkpoint-every", type=int, default=None)
@click.option("--eval-cases", type=int, default=None, help="evaluate only the first N test cases")
@click.option("--empty-policy", type=click.Choice(["penalty", "zero"]), default=None,
              help="metrics of an empty prediction (default penalty: Dice 0, distances = volume diagonal)")
@click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
              help="a method's named option (repeatable), e.g. ssnet_memory_weights=mean")
@click.option("--teacher", type=click.Path(path_type=Path), default=None,
              help="reuse stage 1 of this run folder instead of training it (multi-stage methods)")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="run folder (default runs/<method>-L<n>-s<seed>-<protocol>)")
@click.option("--resume", is_flag=True, help="continue the run in --out from its last checkpoint")
@click.option("--overwrite", is_flag=True, help="replace an existing run folder")
@click.option("--quiet", is_flag=True, help="no progress line")
def run(method, labeled, data_dir, seed, iterations, patch, n_filters, device, protocol, profile, checkpoint_every,
        eval_cases, empty_policy, options, teacher, out, resume, overwrite, quiet):
    """Train METHOD, evaluate it on the test set and write a self-describing run folder."""
    from .trainer import build_config, run_training

    cfg = build_config(method, profile, labeled=labeled, seed=seed, iterations=iterations, patch=_patch(patch),
                       n_filters=n_filters, device=device, protocol=protocol, checkpoint_every=checkpoint_every,
                       eval_cases=eval_cases, empty_policy=empty_policy,
                       teacher=str(teacher.resolve()) if teacher else None, options=_options(options))
    out = out or _default_out(method, labeled, seed, protocol, profile)
    summary = run_training(cfg, out, data_dir, resume=resume, overwrite=overwrite, progress=not quiet)
    _print_summary(summary, out)


def _print_summary(summary: dict, out: Path) -> None:
    for post, m in summary["metrics"].items():
        mark = " (method's own default)" if post == summary["paper_post"] else ""
        click.echo(f"{summary['method']} L={summary['labeled']} seed={summary['seed']} {summary['protocol']} [{post}{mark}]: "
                   f"Dice {100 * m['dice']:.2f}  Jaccard {100 * m['jaccard']:.2f}  95HD {m['hd95']:.2f}  "
                   f"ASD {m['asd']:.2f}  empty {m['n_empty']}/{m['n_cases']}")
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
    """List the registered methods."""
    from .method import registry

    for name, spec in sorted(registry().items()):
        click.echo(f"{name:16s} {len(spec.stages)} stage(s)  {spec.summary}")


@cli.group()
def data():
    """Check the LA data or make the built-in demo data set."""


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


@cli.command()
@click.option("--method", default="vnet", show_default=True)
@click.option("--data", "data_dir", default=None, help=DATA_HELP)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--profile", type=click.Choice(["paper", "smoke", "demo"]), default="paper", show_default=True)
@click.option("--iterations", type=int, default=None, help="timed iterations per path (default 50 on CUDA, 3 on CPU)")
@click.option("--eval-cases", type=int, default=None, help="test cases timed per path (default 20 on CUDA, 1 on CPU)")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="also write the measurement as JSON here")
def bench(method, data_dir, device, profile, iterations, eval_cases, out):
    """Time training it/s and evaluation s/case: fast path vs reference-style path, same process."""
    from .bench import run_bench

    run_bench(method, data_dir, device, profile, iterations, eval_cases, out)


from .occlusion import occlusion_command  # noqa: E402
cli.add_command(occlusion_command)
from .sweep import sweep_command  # noqa: E402
from .report import report_command  # noqa: E402
cli.add_command(sweep_command)
cli.add_command(report_command)


def main(argv=None) -> int:
    try:
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
