"""What defines a run: its settings (`RunConfig`), the profiles, and the rules of run identity. Torch-free.

Everything here is plain data and checks, importable without torch by the experiment files' parser,
the sweep planner and the reports. Nothing in it imports back from the modules that use it.

- :class:`RunConfig`: every setting of one run, validated; stored as config.json's ``config`` section.
- :data:`PROFILES`: named presets (paper, smoke, demo, cpu) applied by :func:`build_config`.
- Run identity: :data:`NON_DEFINING` (settings that do not change what is computed), :data:`ADDED_DEFAULTS`
  (settings added since older folders were written, at the value those folders computed with), :func:`same_run`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .errors import UserError
from .precision import DEFAULT_PRECISION, FP16_ON_CPU, PRECISIONS, with_precision
from . import selection as _selection

PROTOCOLS = ("honest", "literature", "val")  # ssl_bench/selection.py: what each selects
UNITS = ("voxel", "mm")

#: settings that do not change what a run computes: a sweep resumes, a report accepts, a cell id ignores them
NON_DEFINING = {"device", "fast", "teacher", "log_every", "checkpoint_every", "requested_precision"}
#: settings added after run folders existed, at the value those older folders computed with
ADDED_DEFAULTS = {"units": "voxel", "schedule_scale": 1.0, "requested_precision": None}


@dataclass
class RunConfig:
    method: str
    labeled: int = 8
    seed: int = 1337
    iterations: int | None = None  # None: each stage's own default; otherwise applied to every stage
    #: Decision 10: every constant a method counts in iterations follows it (lengths, lr steps, ramps, selection)
    schedule_scale: float = 1.0
    patch: tuple[int, int, int] = (112, 112, 80)
    n_filters: int = 16
    device: str = "auto"
    profile: str = "paper"
    protocol: str = "honest"
    checkpoint_every: int = 1000
    log_every: int = 20
    selection_every: int | None = None  # None: the reference's 200
    val_cases: int | None = None  # `val` only (None there: 8, Decision 8); None under honest/literature, not their identity
    eval_stride_xy: int = 18
    eval_stride_z: int = 4
    eval_cases: int | None = None  # None: every case of test.list
    empty_policy: str = "penalty"
    units: str = "voxel"  # hd95/asd in voxels (the LA literature) or "mm" from an imported data set's spacing
    precision: str = DEFAULT_PRECISION  # PRECISIONS; part of what defines a run (Decision 7)
    fast: bool = True  # CUDA fast-path switches besides precision: data on the GPU, channels_last_3d, cudnn.benchmark
    teacher: str | None = None  # a run folder whose stage 1 is reused instead of trained (multi-stage methods)
    #: what was asked for when it differs from ``precision`` (bf16 on a CPU without bf16: fp32, said on stderr)
    requested_precision: str | None = None
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.protocol == "val" and self.val_cases is None:
            self.val_cases = _selection.DEFAULT_VAL_CASES

    def validate(self) -> None:
        """Types first (a stored config.json may have been edited), then ranges; one UserError each."""
        self._check_types()
        if self.protocol not in PROTOCOLS:
            raise UserError(f"unknown protocol {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if self.val_cases is not None and self.protocol != "val":
            raise UserError(f"--val-cases applies to --protocol val only (this run's protocol is {self.protocol})")
        if self.val_cases is not None and self.val_cases < 1:
            raise UserError(f"--val-cases must be at least 1, got {self.val_cases}")
        if self.selection_every is not None and self.selection_every < 1:
            raise UserError(f"--selection-every must be at least 1, got {self.selection_every}")
        if self.iterations is not None and self.iterations < 1:
            raise UserError(f"--iterations must be at least 1, got {self.iterations}")
        if isinstance(self.schedule_scale, bool) or not isinstance(self.schedule_scale, (int, float)) \
                or not 0.001 <= self.schedule_scale <= 10:
            raise UserError(f"--schedule-scale must be a number from 0.001 to 10, got {self.schedule_scale!r}")
        self.schedule_scale = float(self.schedule_scale)
        if len(self.patch) != 3 or any(p < 16 or p % 16 for p in self.patch):
            raise UserError(f"--patch needs three sizes, each a multiple of 16 (the V-Net halves 4 times), got {self.patch}")
        if self.patch[0] * self.patch[1] * self.patch[2] > MAX_PATCH_VOXELS:
            raise UserError(f"--patch {self.patch} has more than {MAX_PATCH_VOXELS} voxels (256³), more than any "
                            f"GPU trains a batch of; choose a smaller patch")
        if self.n_filters < 1:
            raise UserError(f"--n-filters must be positive, got {self.n_filters}")
        if self.eval_stride_xy < 1 or self.eval_stride_z < 1:
            raise UserError(f"evaluation strides must be positive, got {self.eval_stride_xy} and {self.eval_stride_z}")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise UserError("checkpoint and log intervals must be positive")
        if self.empty_policy not in ("penalty", "zero"):
            raise UserError(f"unknown empty-prediction policy {self.empty_policy!r}; choose penalty or zero")
        if self.eval_cases is not None and self.eval_cases < 1:
            raise UserError(f"--eval-cases must be at least 1, got {self.eval_cases}")
        if self.units not in UNITS:
            raise UserError(f"unknown units {self.units!r}; choose one of {', '.join(UNITS)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.precision == "fp16" and self.device == "cpu":
            raise UserError(FP16_ON_CPU)

    def _check_types(self) -> None:
        for f in fields(self):
            value, kind = getattr(self, f.name), _KINDS.get(f.name)
            if kind is None or (value is None and f.name in _OPTIONAL):
                continue
            ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is int)
            if not ok:
                raise UserError(f"setting {f.name!r} must be {_KIND_NAMES[kind]}, got {value!r}")
        if not isinstance(self.patch, (tuple, list)) or not all(isinstance(p, int) and not isinstance(p, bool)
                                                                for p in self.patch):
            raise UserError(f"setting 'patch' must be three whole numbers, got {self.patch!r}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["patch"] = list(self.patch)
        return d

    @classmethod
    def from_json(cls, d: dict, ran_on: str | None = None) -> "RunConfig":
        """A stored config; one made before precision was recorded gets what it computed (recorded_precision)."""
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in with_precision(d, ran_on).items() if k in known}
        d["patch"] = tuple(d["patch"])
        return cls(**d)


#: the largest training/evaluation patch accepted (a bound on what an edited config.json can make us allocate)
MAX_PATCH_VOXELS = 256 ** 3
#: the type each setting must have (schedule_scale and patch are checked by value; options is a dict)
_KINDS = {"method": str, "labeled": int, "seed": int, "iterations": int, "n_filters": int, "device": str,
          "profile": str, "protocol": str, "checkpoint_every": int, "log_every": int, "selection_every": int,
          "val_cases": int, "eval_stride_xy": int, "eval_stride_z": int, "eval_cases": int, "empty_policy": str,
          "units": str, "precision": str, "fast": bool, "teacher": str, "requested_precision": str, "options": dict}
_OPTIONAL = {"iterations", "selection_every", "val_cases", "eval_cases", "teacher", "requested_precision"}
_KIND_NAMES = {str: "a string", int: "a whole number", bool: "true or false", dict: "a table"}

#: the CPU track's schedule scale s (docs: the CPU track, Decision 10): chosen so the one-seed Table 1 grid fits 4 hours
CPU_SCHEDULE_SCALE = 0.04

PROFILES = {
    "paper": {},
    # tiny preset: finishes on 2 CPU cores in well under a minute on the real data
    "smoke": {"patch": (48, 48, 32), "n_filters": 4, "iterations": 12, "checkpoint_every": 6, "log_every": 3,
              "eval_stride_xy": 48, "eval_stride_z": 20, "eval_cases": 2, "selection_every": 6},
    # the README's main job on the built-in demo data: a few minutes on 2 CPU cores
    "demo": {"patch": (48, 48, 32), "n_filters": 4, "iterations": 200, "checkpoint_every": 100, "log_every": 10,
             "eval_stride_xy": 24, "eval_stride_z": 12, "selection_every": 50},
    # the CPU track (docs/methods.md Decision 10; experiments/cpu.toml): on `ssl-bench data derive --zoom 0.5` data, whose
    # record sets the patch (64,64,32) and strides; every method's schedule scaled by one factor, fp32 (measured)
    # sliding window at half-patch strides (32/16 on the 64×64×32 patch: 8 windows a case instead of the 56 of the
    # paper's strides × 0.5), since the val protocol evaluates 8 cases at every selection point
    "cpu": {"n_filters": 8, "schedule_scale": CPU_SCHEDULE_SCALE, "precision": "fp32", "eval_stride_xy": 32,
            "eval_stride_z": 16, "checkpoint_every": 50, "log_every": 10},
}


def build_config(method: str, profile: str = "paper", dataset_defaults: dict | None = None, **overrides) -> RunConfig:
    """The data set's own settings (``LAData.run_defaults()``: an imported set's patch and strides; {} for LA),
    then the profile's, then every explicitly given (non-None) override."""
    if profile not in PROFILES:
        raise UserError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    values = {"method": method, "profile": profile, **(dataset_defaults or {}), **PROFILES[profile]}
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = RunConfig(**values)
    cfg.validate()
    return cfg


def same_run(stored: dict, wanted: dict) -> str | None:
    """The first setting that differs between a run folder's stored config and a cell's, or None.

    Only settings that change what is computed count (not device, the fast-path switches besides
    precision, teacher folder, log or checkpoint intervals). Precision counts. A folder made before
    precision was recorded has no ``precision`` key: its folder name is its only identity there, so it is
    taken as its cell's (the report labels it with what it computed, ssl_bench.report.legacy_note)."""
    for key, value in wanted.items():
        if key in NON_DEFINING or (key == "precision" and "precision" not in stored):
            continue
        theirs = stored.get(key, ADDED_DEFAULTS.get(key))
        if theirs != value:
            return f"{key} is {theirs!r} there, the experiment asks for {value!r}"
    return None
