"""Declared numerics (docs/methods.md Decision 7): the precisions a run may use and what each one sets.

fp32 (TF32 off), tf32 (the references' numerics on current GPUs: float32 tensors, TF32 convolutions and
matmuls), bf16 and fp16 autocast (opt-in fast modes; fp16 with a gradient scaler per optimiser phase). On
CPU tf32 computes exactly what fp32 computes; fp16 needs CUDA. Importing this module does not import torch
(experiment files are parsed without it).
"""
from __future__ import annotations

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
DEFAULT_PRECISION = "tf32"
FP16_ON_CPU = "--precision fp16 needs a CUDA GPU; on CPU use fp32, tf32 (the same numerics there) or bf16"
_AUTOCAST = {"bf16": "bfloat16", "fp16": "float16"}


def recorded_precision(stored: dict, ran_on: str | None = None) -> str:
    """The precision a stored config declares; for folders made before it was recorded, what they computed.

    Before ``precision`` existed, ``fast`` (default true) meant bf16 autocast on CUDA; a CPU run, or a CUDA
    run without the fast path, computed float32 with PyTorch's defaults (cuDNN TF32 on CUDA, same numerics
    as fp32 on CPU): ``tf32``. ``ran_on`` is the device the run used (summary.json's ``device``), when known.
    """
    if stored.get("precision") is not None:
        return stored["precision"]
    device = str(ran_on if ran_on is not None else stored.get("device", "auto"))
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "bf16" if device.startswith("cuda") and stored.get("fast", True) else DEFAULT_PRECISION


def with_precision(stored: dict, ran_on: str | None = None) -> dict:
    """``stored`` with its (recorded or inferred, see :func:`recorded_precision`) precision filled in."""
    return dict(stored, precision=recorded_precision(stored, ran_on))


def cpu_bf16_supported() -> bool:
    """Whether this CPU runs bf16 natively (AVX512-BF16 or AMX, as oneDNN reports it). Without it, bf16 autocast
    is emulated: measured 50× slower than fp32 on an AVX2 CPU (docs/methods.md, the CPU track)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


CPU_BF16_FALLBACK = ("this CPU has no bf16 instructions (AVX512-BF16 or AMX): bf16 autocast would be emulated, far "
                     "slower than fp32; training in fp32 instead (recorded in config.json as requested_precision bf16)")


def autocast_dtype(precision: str):
    """The autocast dtype of ``precision`` (None: no autocast, fp32 and tf32)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def numerics(precision: str, device_type: str, fast_path: bool) -> dict:
    """What a run computes with on its device: precision, autocast, TF32 and the other fast-path switches."""
    cuda = device_type == "cuda"
    return {"precision": precision,
            "autocast": _AUTOCAST.get(precision),
            "grad_scaler": precision == "fp16",
            "tf32": (precision != "fp32") if cuda else None,  # no TF32 on CPU
            "data_on_device": fast_path, "channels_last_3d": fast_path,
            "cudnn_benchmark": fast_path if cuda else None,
            "cudnn_deterministic": (not fast_path) if cuda else None}


def set_backend(precision: str, device_type: str, fast: bool) -> None:
    """Process-wide flags for training and evaluation on CUDA: TF32 (off only for fp32) and cuDNN's modes."""
    if device_type != "cuda":
        return
    import torch

    torch.backends.cudnn.benchmark = fast
    torch.backends.cudnn.deterministic = not fast
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def make_scalers(precision: str, device_type: str, phases) -> dict:
    """fp16: one gradient scaler per optimiser phase (e.g. SASSNet's discriminator phase too); otherwise none."""
    if precision != "fp16":
        return {}
    import torch

    return {phase: torch.amp.GradScaler(device_type) for phase in phases}
