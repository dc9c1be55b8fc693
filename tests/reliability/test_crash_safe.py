"""Checkpoints survive ``kill -9`` at every step of a save, and damaged files are named, never half-loaded.

The kill tests run a fresh interpreter that writes a baseline checkpoint, then, for
each kill point ``k``, forks a process that saves a newer version and sends itself ``SIGKILL``
just before its ``k``-th file-system operation: each file opened for writing, its first write
(leaving a partly written file), each fsync, rename, link, mkdir, unlink, rmdir, rmtree and
directory swap. The process is really killed; no production code knows about the test. This
test process then checks what each kill left: every visible checkpoint, and ``last``, loads with
``load_state`` (the old version or the new one, never a mix), a Trainer resumes from ``last``,
and the next save cleans up and succeeds.
"""

from __future__ import annotations

import builtins
import functools
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_helpers import run_in_subprocess
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember import Accelerator, CheckpointError
from ember.strategies import checkpoint_io, checkpoint_swap
from ember.strategies.checkpoint_io import read_manifest
from ember.strategies.checkpoint_swap import copy_checkpoint, locate_checkpoint
from ember.strategies.single_device import SingleDeviceStrategy

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills forked processes (POSIX)")


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A directory in memory where there is one: the kill tests fsync thousands of times, and a
    process kill (unlike a power cut) does not depend on what reached the disk."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    directory = Path(tempfile.mkdtemp(prefix="ember-crash-", dir=shm))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- the kill switch (runs only in the forked process that is killed) ------------------------------
class _Switch:
    """Counts file-system operations; SIGKILLs this process just before operation ``at``."""

    def __init__(self, at: int | None) -> None:
        self.at, self.events = at, []
        self._lock = threading.Lock()  # a save fsyncs on threads (digests.deferred_syncs)

    def tick(self, name: str) -> None:
        with self._lock:
            if self.at is not None and len(self.events) == self.at:
                os.kill(os.getpid(), signal.SIGKILL)
            self.events.append(name)


class _Written:
    """A file opened for writing; its first write reaches the file, then counts as an operation."""

    def __init__(self, file: Any, switch: _Switch) -> None:
        self._file, self._switch, self._first = file, switch, True

    def write(self, data: Any) -> int:
        count: int = self._file.write(data)
        if self._first:
            self._first = False
            self._file.flush()  # a kill now leaves a partly written file
            self._switch.tick("write")
        return count

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def __enter__(self) -> _Written:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()


def _arm(switch: _Switch, *, atomic_swap: bool) -> None:
    def hook(owner: Any, attr: str) -> None:
        original = getattr(owner, attr)

        @functools.wraps(original)
        def hooked(*args: Any, **kwargs: Any) -> Any:
            switch.tick(attr)
            return original(*args, **kwargs)

        setattr(owner, attr, hooked)

    for attr in ("fsync", "replace", "rename", "link", "mkdir", "unlink", "rmdir"):
        hook(os, attr)
    hook(shutil, "rmtree")
    hook(checkpoint_io, "save_file")  # safetensors writes from Rust: count the call
    if not atomic_swap:  # the file system has no renameat2(RENAME_EXCHANGE): rename aside, then in
        checkpoint_swap._exchange = lambda a, b: False  # type: ignore[assignment]
    hook(checkpoint_swap, "_exchange")
    real_open = builtins.open

    def hooked_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        if any(flag in mode for flag in "wax+"):
            switch.tick("open")
            return _Written(handle, switch)
        return handle

    builtins.open = io.open = hooked_open  # type: ignore[assignment]


def _fork(at: int | None, atomic_swap: bool, body: Any, events: Path) -> int:
    """Run ``body(arm)`` in a forked process that is SIGKILLed just before its ``at``-th operation
    after it calls ``arm()``; it writes the operations it did to ``events``. The wait status."""
    real_open = builtins.open
    pid = os.fork()
    if pid == 0:  # the process to kill: never returns into the caller's stack
        code = 0
        try:
            switch = _Switch(at)
            body(lambda: _arm(switch, atomic_swap=atomic_swap))
            with real_open(events, "w") as f:
                json.dump(switch.events, f)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return os.waitpid(pid, 0)[1]


def _was_killed(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


# -- Accelerator.save_state + the `last` copy, every kill point --------------------------------------
Objects = tuple[Accelerator, nn.Module, torch.optim.Optimizer]


def _objects() -> Objects:
    torch.manual_seed(0)
    accelerator = Accelerator()
    model = nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    loader = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=2, shuffle=True)
    model, optimizer, _, _ = accelerator.prepare(model, optimizer, loader, scheduler)
    accelerator.backward(model(torch.randn(2, 4)).sum())
    optimizer.step()
    return accelerator, model, optimizer


def _save_version(
    accelerator: Accelerator, model: nn.Module, optimizer: Any, root: Path, version: int
) -> None:
    """Version ``v``: every weight is ``v``, the learning rate ``v / 10``, extra ``{"version": v}``;
    saved to ``ckpt`` and copied to ``last`` (what ModelCheckpoint does)."""
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(version))
    for group in optimizer.param_groups:
        group["lr"] = version / 10
    accelerator.save_state(root / "ckpt", extra={"version": {"v": version}})
    copy_checkpoint(root / "ckpt", root / "last")


_MODES = {"renameat2-exchange": True, "rename-aside": False}  # directory swap: atomic or not


def _accelerator_kills(work: str) -> dict[str, Any]:
    torch.set_num_threads(1)
    accelerator, model, optimizer = _objects()
    root = Path(work)
    _save_version(accelerator, model, optimizer, root / "baseline", 1)
    results = {}
    for mode, atomic_swap in _MODES.items():

        def save(directory: Path, at: int | None) -> int:
            def body(arm: Any) -> None:
                arm()
                _save_version(accelerator, model, optimizer, directory, 2)

            shutil.copytree(root / "baseline", directory)
            return _fork(at, atomic_swap, body, directory / "events.json")  # noqa: B023

        assert save(root / mode / "dry", None) == 0, "the save fails without a kill"
        events = json.loads((root / mode / "dry" / "events.json").read_text())
        # Without the atomic swap only the swaps differ: kill from the first one on.
        start = 0 if atomic_swap else events.index("_exchange")
        killed = {at: _was_killed(save(root / mode / f"k{at:03d}", at)) for at in range(start, len(events))}
        results[mode] = {"events": events, "killed": killed}
    return results


def _loaded_version(directory: Path, objects: Objects) -> int:
    """``load_state`` it into ``objects``; the version it holds, checked file against file."""
    accelerator, model, optimizer = objects
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(-1.0)
    version = accelerator.load_state(directory)["version"]["v"]
    assert all(torch.all(p == version) for p in model.parameters()), f"{directory}: weights mix versions"
    assert optimizer.param_groups[0]["lr"] == version / 10, f"{directory}: optimizer mixes versions"
    return int(version)


def test_kill_at_every_step_of_a_save_leaves_old_or_new(scratch: Path) -> None:
    results = run_in_subprocess(_accelerator_kills, str(scratch), timeout=240)
    objects = _objects()
    for mode, atomic_swap in _MODES.items():
        events, killed = results[mode]["events"], {int(k): v for k, v in results[mode]["killed"].items()}
        # the save's own steps and the swap of both `ckpt` and `last` are all among the kill points
        assert events.count("_exchange") == 2 and "fsync" in events
        assert len(events) >= 40 and all(killed.values()), (mode, events, killed)
        assert len(killed) == (len(events) if atomic_swap else len(events) - events.index("_exchange"))
        swapped = 0  # kill points after which `ckpt` already held the new version
        for k in sorted(killed):
            work = scratch / mode / f"k{k:03d}"
            visible = sorted(p.name for p in work.iterdir() if not p.name.startswith("."))
            assert set(visible) <= {"ckpt", "last"}, (mode, k, events[k], visible)  # one may be aside
            ckpt = _loaded_version(work / "ckpt", objects)
            last = _loaded_version(work / "last", objects)
            assert (ckpt, last) in ((1, 1), (2, 1), (2, 2)), (mode, k, events[k], ckpt, last)
            swapped += ckpt == 2
            # the next save settles what the killed one left; nothing but the two checkpoints remains
            _save_version(*objects, work, 3)
            assert sorted(p.name for p in work.iterdir()) == ["ckpt", "last"], (mode, k, events[k])
            assert _loaded_version(work / "ckpt", objects) == _loaded_version(work / "last", objects) == 3
        assert 0 < swapped < len(killed)  # kills fell before and after the new checkpoint took its place


def test_a_save_killed_between_renames_is_found_beside_the_target(tmp_path: Path) -> None:
    """The fallback window itself: the old checkpoint renamed aside, the new one not renamed in yet."""
    objects = _objects()
    _save_version(*objects, tmp_path / "old", 1)
    _save_version(*objects, tmp_path / "new", 2)
    os.replace(tmp_path / "old" / "ckpt", tmp_path / ".ckpt.old")
    os.replace(tmp_path / "new" / "ckpt", tmp_path / ".ckpt.partial")
    assert locate_checkpoint(tmp_path / "ckpt") == tmp_path / ".ckpt.partial"  # the newest complete one
    assert _loaded_version(tmp_path / "ckpt", objects) == 2
    (tmp_path / ".ckpt.partial" / "optimizer.json").unlink()  # the new one incomplete: the old one
    assert _loaded_version(tmp_path / "ckpt", objects) == 1
    (tmp_path / ".ckpt.partial" / "manifest.json").unlink()
    # The next save moves the complete copy back into place first, then replaces it; no debris stays.
    _save_version(*objects, tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "last", "new", "old"]
    assert _loaded_version(tmp_path / "ckpt", objects) == 3
    # a directory without a manifest beside the target is never taken for a checkpoint
    shutil.rmtree(tmp_path / "ckpt")
    shutil.copytree(tmp_path / "last", tmp_path / ".ckpt.old")
    (tmp_path / ".ckpt.old" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="does not exist"):
        objects[0].load_state(tmp_path / "ckpt")


# -- a Trainer's checkpoint (ModelCheckpoint with `last`), then a resume -----------------------------
_TRAIN = dict(
    logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, max_epochs=5
)


def _trainer_parts() -> tuple[Any, Any]:
    from trainer_workers import Net, dataset

    torch.manual_seed(0)
    return Net(), DataLoader(dataset(24), batch_size=4, shuffle=True)


def _fit(max_steps: int, ckpt_path: str | None = None, callbacks: list[Any] | None = None) -> Any:
    """Fit in the current directory (relative paths: a copy of the directory is a copy of the run)."""
    from ember import Trainer
    from ember.callbacks import ModelCheckpoint

    module, loader = _trainer_parts()
    every = ModelCheckpoint(dirpath="checkpoints", every_n_train_steps=2, save_last=True)
    trainer = Trainer(
        max_steps=max_steps, default_root_dir=".", callbacks=[*(callbacks or []), every], **_TRAIN
    )
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return module


def _trainer_kills(work: str) -> dict[str, Any]:
    """One fit to step 6. At step 4, just before ModelCheckpoint saves, the run is forked once per
    kill point into a copy of its directory; each fork, armed, saves that step's checkpoint (the
    new checkpoint, `last` swapped to it, the step-2 one removed) and stops."""
    from ember.callbacks import Callback

    torch.set_num_threads(1)
    root = Path(work)
    (root / "run").mkdir()
    os.chdir(root / "run")
    me, real_open = os.getpid(), builtins.open
    switch = _Switch(None)
    results: dict[str, Any] = {}

    class Fork(Callback):  # before ModelCheckpoint in the list: runs first at each step
        def on_train_batch_end(
            self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            if trainer.global_step != 4 or os.getpid() != me:
                return

            def fork(at: int | None, atomic_swap: bool, directory: Path) -> int | None:
                nonlocal switch
                shutil.copytree(root / "run", directory)
                pid = os.fork()
                if pid == 0:  # the fork goes on: ModelCheckpoint saves next, then the fit stops
                    os.chdir(directory)
                    switch = _Switch(at)
                    _arm(switch, atomic_swap=atomic_swap)
                    trainer.should_stop = True
                    return None
                return os.waitpid(pid, 0)[1]

            # every `every`-th operation, and just before and after every swap and removal
            for (mode, atomic_swap), every in zip(_MODES.items(), (8, 4), strict=True):
                if (status := fork(None, atomic_swap, root / mode / "dry")) is None:
                    return
                assert status == 0, "the save fails without a kill"
                events = json.loads((root / mode / "dry" / "events.json").read_text())
                swaps = [i for i, event in enumerate(events) if event in ("replace", "_exchange", "rmtree")]
                points = {*range(0, len(events), every), *swaps, *(i + 1 for i in swaps)}
                killed = {}
                for at in sorted(p for p in points if p < len(events)):
                    if (status := fork(at, atomic_swap, root / mode / f"k{at:03d}")) is None:
                        return
                    killed[at] = _was_killed(status)
                results[mode] = {"events": events, "killed": killed}

    try:
        module = _fit(max_steps=6, callbacks=[Fork()])
    except BaseException:
        if os.getpid() != me:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        raise
    if os.getpid() != me:  # a fork that was not killed (the dry run): what it did
        with real_open("events.json", "w") as f:
            json.dump(switch.events, f)
        os._exit(0)
    results["final"] = {k: v.tolist() for k, v in module.state_dict().items()}
    return results


def test_kill_during_a_trainer_checkpoint_then_resume(scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    results = run_in_subprocess(_trainer_kills, str(scratch), timeout=240)
    final = {name: torch.tensor(value) for name, value in results["final"].items()}
    saved = {  # the weights of steps 2 and 4
        step: load_file(
            str(scratch / "rename-aside" / run / "checkpoints" / f"epoch=0-step={step}" / "model.safetensors")
        )
        for step, run in ((2, "k000"), (4, "dry"))
    }
    for mode, atomic_swap in _MODES.items():
        events, killed = results[mode]["events"], {int(k): v for k, v in results[mode]["killed"].items()}
        assert len(events) >= 60 and len(killed) >= 15 and all(killed.values()), (mode, events, killed)
        resumed = []
        for k in sorted(killed):
            checkpoints = scratch / mode / f"k{k:03d}" / "checkpoints"
            visible = sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith("."))
            assert "epoch=0-step=2" in visible or "epoch=0-step=4" in visible, (mode, k, events[k], visible)
            for name in {*visible, "last"}:
                found = locate_checkpoint(checkpoints / name)
                read_manifest(found)  # complete: every size and digest matches
                weights = load_file(str(found / "model.safetensors"))
                steps = [s for s, w in saved.items() if all(torch.equal(weights[n], w[n]) for n in w)]
                assert len(steps) == 1 and name in ("last", f"epoch=0-step={steps[0]}"), (mode, k, name)
            # Resume once per mode: without the atomic swap, where `last` was renamed aside (the
            # copy beside it is found). The result is the uninterrupted run's.
            if not resumed and (atomic_swap or not (checkpoints / "last").exists()):
                resumed.append(k)
                monkeypatch.chdir(checkpoints.parent)
                module = _fit(max_steps=6, ckpt_path="last")
                for name, value in module.state_dict().items():
                    torch.testing.assert_close(value, final[name], rtol=1e-5, atol=1e-6)
        assert resumed, f"{mode}: no kill point fell between the two renames of `last`"


# -- damaged files -------------------------------------------------------------------------------------
class _ShardedSingleDevice(SingleDeviceStrategy):
    """One process writing the ``"sharded"`` layout (DCP shard files), like FSDP does per rank."""

    @property
    def sharded_checkpoints(self) -> bool:
        return True


def _layout_objects(sharded: bool) -> tuple[Accelerator, nn.Module]:
    torch.manual_seed(0)
    accelerator = Accelerator(strategy=_ShardedSingleDevice() if sharded else None)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    loader = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=2, shuffle=True)
    model, optimizer, _, _ = accelerator.prepare(model, optimizer, loader, scheduler)
    accelerator.backward(model(torch.randn(2, 4)).sum())
    optimizer.step()
    return accelerator, model


@pytest.mark.parametrize("sharded", [False, True], ids=["full", "sharded"])
def test_every_damaged_file_is_named_before_anything_loads(tmp_path: Path, sharded: bool) -> None:
    accelerator, _ = _layout_objects(sharded)
    ckpt = accelerator.save_state(tmp_path / "ckpt", extra={"note": {"text": "x"}})
    files = sorted(read_manifest(ckpt)["files"])
    if sharded:
        assert any(f.startswith("model.shards/") for f in files)
        assert any(f.startswith("optimizer.shards/") for f in files)
    kinds = {Path(f).suffix for f in files}
    assert kinds == {".json", ".safetensors"}, files
    pristine = {f: (ckpt / f).read_bytes() for f in files}
    for name in files:
        for damage in ("truncated", "altered"):
            data = bytearray(pristine[name])
            if damage == "truncated":
                data = data[: len(data) // 2]
            else:
                data[len(data) // 2] ^= 0x01
            (ckpt / name).write_bytes(bytes(data))
            fresh, fresh_model = _layout_objects(sharded)
            with torch.no_grad():
                for p in fresh_model.parameters():
                    p.fill_(-3.0)
            expected = "truncated" if damage == "truncated" else "does not match its XXH3-128 digest"
            with pytest.raises(CheckpointError, match=expected) as err:
                fresh.load_state(ckpt)
            assert str(ckpt / name) in str(err.value)
            assert all(torch.all(p == -3.0) for p in fresh_model.parameters()), f"{name} was half-loaded"
            (ckpt / name).write_bytes(pristine[name])
    accelerator.load_state(ckpt)  # restored: loads again


def test_weights_that_do_not_fit_are_refused_before_the_model_changes(tmp_path: Path) -> None:
    accelerator, _ = _layout_objects(sharded=False)
    ckpt = accelerator.save_state(tmp_path / "ckpt")
    other = Accelerator()
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 5))  # the last layer differs
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    loader = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=2)
    model, *_ = other.prepare(model, optimizer, loader, scheduler)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*does not fit this model: shapes differ"):
        other.load_state(ckpt)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
