"""Declarative experiment files (``experiments/<name>.toml``) and their expansion into run cells.

An experiment is a grid of runs: methods × labeled counts × seeds × protocols, one or more
``[[grid]]`` blocks, each expanded on its own. Seeds and protocols are axes like the others; a
block may override the file's defaults. Example (the keys are all the format has)::

    title = "Table 1 of the OMF paper"
    paper = "table1"              # published numbers beside ours (ssl_bench/published.py), optional
    compare_to = "omf"            # reference of the paired Wilcoxon tests in the report
    profile = "paper"             # ssl_bench.config.PROFILES
    seeds = [1337, 1338, 1339]
    protocols = ["honest", "literature", "val"]   # val: selection on the validation cases (Decision 8)
    precision = "tf32"            # or a list, e.g. ["tf32", "bf16"]: an axis (docs/methods.md Decision 7; default tf32)
    [run]                         # RunConfig settings for every cell (e.g. iterations = 2; val_cases = 8 counts
                                  # for the val cells only, so it never changes an honest or literature cell's ID)
    [[grid]]
    methods = ["vnet", "omf"]
    labeled = [8, 16]
    protocols = ["honest"]        # optional per-block override of seeds/protocols/precision/profile/run
    [occlusion]                   # only for occlusion sweeps (paper Fig. 3, §3.7.8)
    variant = "volume"            # ssl-bench occlusion --variant: volume (B, primary) or code (A)
    ratios = [0, 0.05, 0.1]
    repeats = 5

A cell is one run folder, named by a stable ID built from what defines the run (the same name
``ssl-bench run`` uses by default, plus a short hash of any [run] overrides), so experiments that
share a cell (Table 1 and Table 2 both have V-Net and OMF) share its run folder. A precision other than
the default ``tf32`` is part of the ID (``-bf16``), as in ``ssl-bench run``'s default folder name.

Multi-stage methods share their stage 1 with the matching one-stage method instead of retraining
it (``STAGE1_PROVIDERS``): an ``omf`` cell takes ``--teacher`` from the ``omf-s1-orgloss`` cell with
the same labeled count, seed, protocol and settings, which is added to the plan when the
experiment does not list it (an "implicit" cell: trained, not tabulated).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

try:  # the standard library from Python 3.11; the same parser as the `tomli` package before
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 with tomli installed
    import tomli as tomllib

from .errors import UserError
from .runs import PROJECT_ROOT
from .precision import DEFAULT_PRECISION, PRECISIONS  # noqa: F401  (torch-free)
# run identity and the settings themselves live in the torch-free config module (re-exported for callers)
from .config import ADDED_DEFAULTS, NON_DEFINING, PROFILES, PROTOCOLS, build_config, same_run  # noqa: F401

#: the shipped experiment files: inside the installed package (setup.cfg maps the top-level experiments/ folder to
#: ssl_bench.experiment_files), or the source tree's experiments/ in a checkout and an editable install
_PACKAGED = Path(__file__).resolve().parent / "experiment_files"
EXPERIMENTS_DIR = _PACKAGED if _PACKAGED.is_dir() else PROJECT_ROOT / "experiments"
LA_TRAIN_CASES = 80  # train.list of the LA release (§1.2); a labeled count must lie in 1..80
PAPER_TABLES = ("table1", "table2")
#: `ssl-bench occlusion --variant` names (§3.7.8): "volume" = variant B (primary), "code" = variant A
OCCLUSION_VARIANTS = ("volume", "code")

#: multi-stage method -> the one-stage method whose (only) stage is its stage 1 (§3.7.2, Table 2)
STAGE1_PROVIDERS = {"omf": "omf-s1-orgloss", "omf-s1-s2": "omf-s1"}

#: every method the project plans to register (validating the shipped files before all exist)
PLANNED_METHODS = ("vnet", "uamt", "sassnet", "dtc", "ssnet", "bcp", "omf", "omf-s1", "omf-s1-orgloss", "omf-s1-s2")

TOP_KEYS = {"title", "description", "paper", "order_against", "compare_to", "profile", "seeds", "protocols", "precision", "run", "grid",
            "occlusion"}
BLOCK_KEYS = {"methods", "labeled", "seeds", "protocols", "precision", "profile", "run"}
OCCLUSION_KEYS = {"variant", "ratios", "repeats"}
#: RunConfig settings a [run] table may set (method/labeled/seed/protocol/profile are axes; teacher is the sweep's)
RUN_KEYS = {"iterations", "schedule_scale", "patch", "n_filters", "device", "checkpoint_every", "log_every", "selection_every", "val_cases",
            "eval_stride_xy", "eval_stride_z", "eval_cases", "empty_policy", "units", "fast", "options"}


@dataclass(frozen=True)
class Occlusion:
    variant: str
    ratios: tuple[float, ...]
    repeats: int


@dataclass
class Cell:
    method: str
    labeled: int
    seed: int
    protocol: str
    profile: str = "paper"
    overrides: dict = field(default_factory=dict)
    teacher: str | None = None  # ID of the cell whose stage 1 this one reuses
    implicit: bool = False  # added as a stage-1 provider, not listed in the experiment
    precision: str = DEFAULT_PRECISION  # defines the run (Decision 7); not the default -> in the ID

    @property
    def id(self) -> str:
        return run_name(self.method, self.labeled, self.seed, self.protocol, self.profile, self.precision) + \
            override_tag(self.overrides)

    def run_dir(self, runs_dir: Path) -> Path:
        return Path(runs_dir) / self.id

    def config(self, dataset_defaults: dict | None = None, **extra):
        """The RunConfig this cell trains with (``extra``: device, teacher path) on a data set whose own
        settings are ``dataset_defaults`` (``LAData.run_defaults()``; None or {} for LA)."""
        values = dict(self.overrides)
        if "patch" in values:
            values["patch"] = tuple(values["patch"])
        values.update(extra)
        return build_config(self.method, self.profile, dataset_defaults=dataset_defaults, labeled=self.labeled,
                            seed=self.seed, protocol=self.protocol, precision=self.precision, **values)


def run_name(method: str, labeled: int, seed: int, protocol: str, profile: str = "paper",
             precision: str = DEFAULT_PRECISION) -> str:
    """A run folder's default name (``ssl-bench run`` and the cell IDs): profile and precision tagged when not the default."""
    tag = "" if profile == "paper" else f"-{profile}"
    prec = "" if precision == DEFAULT_PRECISION else f"-{precision}"
    return f"{method}-L{labeled}-s{seed}-{protocol}{tag}{prec}"


def override_tag(overrides: dict) -> str:
    defining = {k: v for k, v in overrides.items() if k not in NON_DEFINING}
    if not defining:
        return ""
    digest = hashlib.sha1(json.dumps(defining, sort_keys=True).encode()).hexdigest()
    return "-" + digest[:8]


@dataclass
class Experiment:
    name: str
    path: Path
    title: str
    description: str
    paper: str | None
    compare_to: str | None
    cells: list[Cell]  # the listed cells, in file order (what the report tabulates)
    occlusion: Occlusion | None = None
    #: a paper table whose method ORDER the report sets beside ours (Kendall's τ; its numbers are not shown)
    order_against: str | None = None

    def plan(self, registry_stages: dict[str, list[str]] | None = None) -> list[Cell]:
        """Every cell to train, stage-1 providers first where a cell reuses one (see STAGE1_PROVIDERS).

        ``registry_stages`` maps method name -> its stage class names (default: the live registry);
        a provider is used only when its stage class is the multi-stage method's stage 1, since the
        trainer refuses any other teacher.
        """
        stages = registry_stages if registry_stages is not None else _registry_stages()
        by_id = {c.id: c for c in self.cells}
        planned: list[Cell] = []
        for cell in self.cells:
            provider = STAGE1_PROVIDERS.get(cell.method)
            cell.teacher = None
            if provider is None or cell.method not in stages or provider not in stages:
                continue
            if len(stages[cell.method]) < 2 or stages[provider] != stages[cell.method][:1]:
                continue
            dep = Cell(provider, cell.labeled, cell.seed, cell.protocol, cell.profile, dict(cell.overrides),
                       precision=cell.precision)
            if dep.id not in by_id:
                dep.implicit = True
                by_id[dep.id] = dep
                planned.append(dep)
            cell.teacher = dep.id
        return waves(planned + list(self.cells))


def waves(cells: list[Cell]) -> list[Cell]:
    """Cells ordered so that every teacher comes before the cells that reuse it (stable otherwise)."""
    ids = {c.id for c in cells}
    done: set[str] = set()
    ordered: list[Cell] = []
    pending = list(cells)
    while pending:
        ready = [c for c in pending if c.teacher is None or c.teacher in done or c.teacher not in ids]
        if not ready:
            raise UserError(f"circular stage-1 dependency between cells: {', '.join(c.id for c in pending)}")
        ordered.extend(ready)
        done.update(c.id for c in ready)
        pending = [c for c in pending if c.id not in done]
    return ordered


def wave_index(cells: list[Cell]) -> dict[str, int]:
    """Depth of each cell in the teacher graph: 0 = needs no other cell's stage 1."""
    by_id = {c.id: c for c in cells}
    depth: dict[str, int] = {}

    def _d(c: Cell) -> int:
        if c.id not in depth:
            t = by_id.get(c.teacher) if c.teacher else None
            depth[c.id] = 0 if t is None else _d(t) + 1
        return depth[c.id]

    for c in cells:
        _d(c)
    return depth


def _registry_stages() -> dict[str, list[str]]:
    from .method import registry

    return {name: [s.__name__ for s in spec.stages] for name, spec in registry().items()}


# -- loading and validation --------------------------------------------------------------------

def available() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.toml"))


def resolve(name_or_path) -> Path:
    """A path to a .toml file, or a name looked up in ./experiments/ and then in the project's experiments/."""
    p = Path(name_or_path)
    if p.is_file():
        return p.resolve()
    for folder in (Path.cwd() / "experiments", EXPERIMENTS_DIR):
        cand = folder / f"{name_or_path}.toml"
        if cand.is_file():
            return cand.resolve()
    raise UserError(f"no experiment {str(name_or_path)!r}: not a file, and not one of {', '.join(available()) or 'none'} "
                    f"in {EXPERIMENTS_DIR}")


def load_experiment(name_or_path, methods=None) -> Experiment:
    """Parse and validate an experiment file; ``methods``: the known method names (default: the registry)."""
    path = resolve(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path.name}: not valid TOML ({exc})") from None
    if methods is None:
        from .method import registry

        methods = registry()
    return parse_experiment(raw, path, set(methods))


def parse_experiment(raw: dict, path: Path, methods: set[str]) -> Experiment:
    where = Path(path).name

    def fail(msg: str):
        raise UserError(f"{where}: {msg}")

    name = Path(path).stem  # names output folders (results/<name>): a plain name, never a path
    if not all(ch.isascii() and (ch.isalnum() or ch in "-_.") for ch in name) or not name.strip("."):
        fail(f"the experiment name {name!r} (the file name without .toml) is not a plain name: use letters, digits, "
             "'-', '_' and '.' (not only dots)")
    _check_keys(raw, TOP_KEYS, "", fail)
    title = _string(raw, "title", fail, default=Path(path).stem)
    description = _string(raw, "description", fail, default="")
    paper = _string(raw, "paper", fail, default=None)
    if paper is not None and paper not in PAPER_TABLES:
        fail(f"paper must be one of {', '.join(PAPER_TABLES)}, got {paper!r}")
    order_against = _string(raw, "order_against", fail, default=None)
    if order_against is not None and order_against not in PAPER_TABLES:
        fail(f"order_against must be one of {', '.join(PAPER_TABLES)}, got {order_against!r}")
    compare_to = _string(raw, "compare_to", fail, default=None)
    if compare_to is not None and compare_to not in methods:
        fail(f"compare_to: unknown method {compare_to!r}; known: {', '.join(sorted(methods))}")
    defaults = {
        "profile": _string(raw, "profile", fail, default="paper"),
        "seeds": _int_list(raw, "seeds", fail, "", default=[1337]),
        "protocols": _str_list(raw, "protocols", fail, "", default=["honest"]),
        "precision": _precisions(raw, fail, "", default=[DEFAULT_PRECISION]),
        "run": _run_table(raw.get("run", {}), fail, ""),
    }
    blocks = raw.get("grid")
    if not isinstance(blocks, list) or not blocks:
        fail("needs at least one [[grid]] block with methods and labeled")
    cells: list[Cell] = []
    seen: dict[str, str] = {}
    for i, block in enumerate(blocks):
        at = f"grid[{i}]"
        if not isinstance(block, dict):
            fail(f"{at} must be a table")
        _check_keys(block, BLOCK_KEYS, at + ": ", fail)
        for key in ("methods", "labeled"):
            if key not in block:
                fail(f"{at}: missing key {key!r}")
        names = _str_list(block, "methods", fail, at)
        labeled = _int_list(block, "labeled", fail, at)
        seeds = _int_list(block, "seeds", fail, at, default=defaults["seeds"])
        protocols = _str_list(block, "protocols", fail, at, default=defaults["protocols"])
        precisions = _precisions(block, fail, at, default=defaults["precision"])
        profile = _string(block, "profile", fail, default=defaults["profile"], at=at)
        run = {**defaults["run"], **_run_table(block.get("run", {}), fail, at)}
        for m in names:
            if m not in methods:
                fail(f"{at}: unknown method {m!r}; known: {', '.join(sorted(methods))}")
        for n in labeled:
            if not 1 <= n <= LA_TRAIN_CASES:
                fail(f"{at}: labeled {n} is out of range 1..{LA_TRAIN_CASES}")
        for p in protocols:
            if p not in PROTOCOLS:
                fail(f"{at}: unknown protocol {p!r}; choose from {', '.join(PROTOCOLS)}")
        if profile not in PROFILES:
            fail(f"{at}: unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
        for n in labeled:
            for m in names:
                for p in protocols:
                    for prec in precisions:
                        for s in seeds:
                            # val_cases defines only `val` cells: honest/literature cells keep their IDs
                            own = {k: v for k, v in run.items() if k != "val_cases" or p == "val"}
                            cell = Cell(m, n, s, p, profile, own, precision=prec)
                            if cell.id in seen:
                                fail(f"{at}: cell {cell.id} is already listed in {seen[cell.id]}")
                            seen[cell.id] = at
                            cells.append(cell)
        try:  # the settings themselves, as the trainer validates them (e.g. iterations >= 1)
            cells[-1].config()
        except (UserError, TypeError, ValueError) as exc:
            fail(f"{at}: bad [run] setting ({exc})")
    occlusion = None
    if "occlusion" in raw:
        occlusion = _occlusion(raw["occlusion"], fail)
    return Experiment(Path(path).stem, Path(path), title, description, paper, compare_to, cells, occlusion,
                      order_against)


def _check_keys(table: dict, allowed: set[str], at: str, fail) -> None:
    for key in table:
        if key not in allowed:
            fail(f"{at}unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")


def _string(table, key, fail, default=None, at=""):
    v = table.get(key, default)
    if v is not None and not isinstance(v, str):
        fail(f"{at + ': ' if at else ''}{key} must be a string, got {v!r}")
    return v


def _list(table, key, fail, at, kind, default):
    prefix = f"{at}: " if at else ""
    if key not in table:
        if default is None:
            fail(f"{prefix}missing key {key!r}")
        return list(default)
    v = table[key]
    if not isinstance(v, list):
        fail(f"{prefix}{key} must be a list, got {v!r}")
    if not v:
        fail(f"{prefix}{key} is empty")
    for x in v:
        if not isinstance(x, kind) or isinstance(x, bool):
            fail(f"{prefix}{key} must hold {kind.__name__} values, got {x!r}")
    if len(set(v)) != len(v):
        fail(f"{prefix}{key} lists a value twice: {v!r}")
    return list(v)


def _int_list(table, key, fail, at, default=None):
    return _list(table, key, fail, at, int, default)


def _str_list(table, key, fail, at, default=None):
    return _list(table, key, fail, at, str, default)


def _precisions(table, fail, at: str, default) -> list[str]:
    """``precision``: one name or a list of names (an axis), each one of PRECISIONS."""
    prefix = f"{at}: " if at else ""
    if isinstance(table.get("precision"), str):
        table = dict(table, precision=[table["precision"]])
    values = _str_list(table, "precision", fail, at, default=default)
    for v in values:
        if v not in PRECISIONS:
            fail(f"{prefix}unknown precision {v!r}; choose from {', '.join(PRECISIONS)}")
    return values


def _run_table(run, fail, at: str) -> dict:
    prefix = f"{at}: " if at else ""
    if not isinstance(run, dict):
        fail(f"{prefix}run must be a table of settings")
    if "precision" in run:
        fail(f"{prefix}precision is an axis, not a [run] setting: write `precision = {run['precision']!r}` at the top "
             "of the file or in a [[grid]] block")
    for key in run:
        if key not in RUN_KEYS:
            fail(f"{prefix}unknown [run] setting {key!r} (allowed: {', '.join(sorted(RUN_KEYS))})")
    return dict(run)


def _occlusion(occ, fail) -> Occlusion:
    if not isinstance(occ, dict):
        fail("occlusion must be a table")
    _check_keys(occ, OCCLUSION_KEYS, "occlusion: ", fail)
    for key in OCCLUSION_KEYS:
        if key not in occ:
            fail(f"occlusion: missing key {key!r}")
    if occ["variant"] not in OCCLUSION_VARIANTS:
        fail(f"occlusion: variant must be one of {', '.join(OCCLUSION_VARIANTS)}, got {occ['variant']!r}")
    ratios = occ["ratios"]
    if not isinstance(ratios, list) or not ratios:
        fail("occlusion: ratios must be a non-empty list")
    if any(isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1 for r in ratios):
        fail(f"occlusion: every ratio must be a number in [0, 1), got {ratios!r}")
    if sorted(set(ratios)) != list(ratios):
        fail(f"occlusion: ratios must be increasing without repeats, got {ratios!r}")
    repeats = occ["repeats"]
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        fail(f"occlusion: repeats must be a positive integer, got {repeats!r}")
    return Occlusion(occ["variant"], tuple(float(r) for r in ratios), repeats)
