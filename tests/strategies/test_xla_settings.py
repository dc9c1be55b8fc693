"""XLA strategies where torch_xla is not installed (the main suite): names, settings and errors
that are decided before torch_xla is imported. The XLA runs themselves are in tests/xla."""

from __future__ import annotations

import pytest
from dist_helpers import PYTHON, REPO, run_command

from ember import Accelerator
from ember.strategies import STRATEGY_REGISTRY, XLASPMDConfig, XLASPMDStrategy, XLAStrategy

SCRIPT = str(REPO / "tests" / "xla" / "xla_script.py")


def test_registered_names() -> None:
    assert isinstance(STRATEGY_REGISTRY.create("xla"), XLAStrategy)
    spmd, fsdp = STRATEGY_REGISTRY.create("xla_spmd"), STRATEGY_REGISTRY.create("xla_fsdp")
    assert isinstance(spmd, XLASPMDStrategy) and not spmd.config.shard_parameters
    assert isinstance(fsdp, XLASPMDStrategy) and fsdp.config.shard_parameters


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="shard_parameters='yes' must be True or False"):
        XLASPMDConfig(shard_parameters="yes")  # type: ignore[arg-type]


def test_without_torch_xla_the_error_says_how_to_install() -> None:
    with pytest.raises(ImportError, match=r"torch_xla 2.9 needs torch 2.9.*torch_xla==2.9.0"):
        Accelerator(strategy="xla")


@pytest.mark.parametrize(
    ("accelerator", "strategy", "message"),
    [
        ("cuda", "xla", "accelerator='cuda' does not fit strategy='xla', which runs on accelerator='xla'"),
        ("cpu", "xla_spmd", "accelerator='cpu' does not fit strategy='xla_spmd'"),
        ("xla", "ddp", "accelerator='xla' needs an XLA strategy, not strategy='ddp'"),
        (
            "tpu",
            "xla",
            "accelerator='tpu' is not supported. Valid choices: 'auto', 'cpu', 'cuda', 'gpu', 'xla'",
        ),
    ],
)
def test_accelerator_and_strategy_must_agree(accelerator: str, strategy: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Accelerator(accelerator=accelerator, strategy=strategy)


def test_spmd_under_a_launcher_is_refused_before_processes_start() -> None:
    done = run_command(
        [PYTHON, "-m", "ember", "launch", "--strategy", "xla_spmd", "--nproc-per-node", "2", SCRIPT]
    )
    assert done.returncode == 2
    assert "runs one process that drives every device, not 2" in done.stderr
