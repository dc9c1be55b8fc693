"""``ember env``: what a bug report needs to know about this machine, as aligned text or one JSON object.

Package versions come from the installed metadata (``importlib.metadata``): nothing is imported
just to read its version, so a slow or side-effecting package (DeepSpeed, torch_xla, wandb) is
never loaded. torch is the exception: ember has already imported it, and only torch can say which
CUDA, cuDNN and NCCL it was built with and which GPUs it sees.

The environment variables shown are read here for display only: ember reads them for its own use in
``strategies/environment.py`` (:func:`detect_environment`).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from importlib import metadata
from typing import Any

__all__ = ["collect", "render_text"]

# Distribution names, in the order printed. Missing ones are reported as None ("not installed").
_PACKAGES = (
    "torch_xla", "deepspeed", "torchmetrics", "wandb", "tensorboard", "rich", "safetensors", "numpy",
    "pyyaml", "matplotlib",
)  # fmt: skip
# Variables that change how a run starts or which devices it sees.
_VARIABLES = (
    "CUDA_VISIBLE_DEVICES", "PJRT_DEVICE", "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE",
    "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "TORCHELASTIC_RUN_ID", "OMP_NUM_THREADS",
    "TORCH_DISTRIBUTED_DEBUG", "TORCH_EXTENSIONS_DIR", "XLA_FLAGS", "CI", "SLURM_JOB_ID", "SLURM_JOB_NAME",
    "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_NTASKS", "SLURM_NNODES", "SLURM_NTASKS_PER_NODE",
    "SLURM_JOB_NODELIST",
)  # fmt: skip
_PREFIXES = ("EMBER_", "NCCL_", "PJRT_")
_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")  # a report is pasted in public: never show these


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _torch() -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    info: dict[str, Any] = {"version": str(torch.__version__), "cuda": torch.version.cuda}
    info["hip"] = getattr(torch.version, "hip", None)
    info["cudnn"] = None
    info["nccl"] = None
    if torch.version.cuda is not None:
        cudnn = torch.backends.cudnn.version()
        info["cudnn"] = str(cudnn) if cudnn is not None else None
        try:
            info["nccl"] = ".".join(str(part) for part in torch.cuda.nccl.version())
        except (RuntimeError, AttributeError, TypeError):  # built without NCCL
            info["nccl"] = None
    checks = (("gloo", dist.is_gloo_available), ("nccl", dist.is_nccl_available))
    info["distributed_backends"] = [name for name, ok in checks if dist.is_available() and ok()]
    return info


def _devices() -> dict[str, Any]:
    import torch

    cpus = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)})
    return {"cpu_count": cpus, "cpus_usable": usable, "cuda_device_count": len(gpus), "cuda_devices": gpus}


def _process(environ: Mapping[str, str]) -> dict[str, Any]:
    from ember.strategies.environment import detect_environment

    try:
        env = detect_environment(environ)
    except ValueError as err:  # e.g. WORLD_SIZE=x: the report still prints, with the reason
        return {"source": "invalid", "error": str(err)}
    return {
        "source": env.source,
        "rank": env.rank,
        "local_rank": env.local_rank,
        "world_size": env.world_size,
        "local_world_size": env.local_world_size,
        "node_rank": env.node_rank,
        "master_addr": env.master_addr,
        "master_port": env.master_port,
    }


def _variables(environ: Mapping[str, str]) -> dict[str, str]:
    names = sorted(n for n in environ if n in _VARIABLES or n.startswith(_PREFIXES))
    return {n: "<redacted>" if any(w in n.upper() for w in _SECRET_WORDS) else environ[n] for n in names}


def collect(environ: Mapping[str, str]) -> dict[str, Any]:
    """The report as plain data (what ``ember env --json`` prints)."""
    import ember

    return {
        "ember": ember.__version__,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "torch": _torch(),
        "packages": {name: _version(name) for name in _PACKAGES},
        "pjrt_device": environ.get("PJRT_DEVICE"),
        "devices": _devices(),
        "process": _process(environ),
        "environment_variables": _variables(environ),
    }


def _or(value: object, missing: str) -> str:
    return missing if value is None else str(value)


def render_text(report: Mapping[str, Any]) -> str:
    """The report as aligned ``name  value`` lines under a few headings."""
    torch, devices, process = report["torch"], report["devices"], report["process"]
    sections: list[tuple[str, list[tuple[str, str]]]] = [
        ("", [("ember", report["ember"]), ("Python", f"{report['python']} ({report['python_executable']})"),
              ("platform", report["platform"])]),
        ("torch", [("version", torch["version"]), ("CUDA", _or(torch["cuda"], "none (CPU build)")),
                   ("cuDNN", _or(torch["cudnn"], "none")), ("NCCL", _or(torch["nccl"], "none")),
                   ("distributed backends", ", ".join(torch["distributed_backends"]) or "none")]),
        ("packages", [(name, _or(version, "not installed")) for name, version in report["packages"].items()]),
    ]  # fmt: skip
    if torch["hip"] is not None:
        sections[1][1].insert(2, ("ROCm (HIP)", torch["hip"]))
    if report["packages"]["torch_xla"] is not None:
        pjrt = _or(report["pjrt_device"], "unset (torch_xla picks TPU when present, else CPU)")
        sections[2][1].insert(1, ("  PJRT device", pjrt))
    gpus = [f"{g['name']} ({g['memory_gib']} GiB)" for g in devices["cuda_devices"]]
    sections.append(("devices", [("CPUs", f"{devices['cpu_count']} ({devices['cpus_usable']} usable)"),
                                 ("CUDA devices", str(devices["cuda_device_count"])),
                                 *[(f"  cuda:{i}", name) for i, name in enumerate(gpus)]]))  # fmt: skip
    if process["source"] == "invalid":
        where = f"invalid: {process['error']}"
    else:
        where = (f"{process['source']}: rank {process['rank']} of {process['world_size']}, local rank "
                 f"{process['local_rank']} of {process['local_world_size']}, node {process['node_rank']}")  # fmt: skip
        if process["world_size"] > 1:
            where += f", master {process['master_addr']}:{_or(process['master_port'], '(port unset)')}"
    sections.append(("process", [("environment", where)]))
    variables = list(report["environment_variables"].items())
    sections.append(("environment variables", variables or [("(none set)", "")]))
    width = max(len(name) for _, rows in sections for name, _ in rows) + 4  # names are indented by 2
    lines = []
    for heading, rows in sections:
        if heading:
            lines.append(f"\n{heading}")
        indent = "  " if heading else ""
        lines += [f"{indent + name:<{width}}{value}".rstrip() for name, value in rows]
    return "\n".join(lines).lstrip("\n")
