"""The description of each ``Trainer`` argument: ``Trainer.__init__``'s docstring.

Kept here, out of ``trainer.py`` (a file of about 400 lines at most), and set as the docstring in the
class body, where ``help(Trainer)`` and ``TrainerCLI``'s ``--help`` (jsonargparse reads the Google-style
"Args:" section) find it. One line each: the value forms and what ``None`` means; the defaults are in
the signature. Details: docs/reference/trainer.md.
"""

from __future__ import annotations

__all__ = ["INIT_DOC"]

INIT_DOC = """Set up a Trainer; every argument is keyword-only and checked before any process starts.

Args:
    accelerator: Device type: "auto" (CUDA when available, else CPU), "cpu", "cuda" (also "gpu") or "xla";
        None: ember launch's --accelerator, else "auto".
    strategy: A strategy name ("ddp", "fsdp", "deepspeed", "xla", ...) or a Strategy instance, which
        carries the strategy's own options; "auto": one device alone, DDP with several processes, XLA on
        accelerator="xla"; None: ember launch's --strategy, else "auto".
    devices: Processes on this node: an int >= 1 or "auto" (the launcher's count, else 1); on GPUs also
        -1 (every visible GPU) or a list of GPU indices.
    num_nodes: Nodes (machines) of the run, an int >= 1 that divides the number of processes.
    precision: "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", an alias (32, 16,
        "bf16", ...) or a Precision instance; None: ember launch's --precision, else "32-true".
    max_epochs: Stop after this many epochs; -1: no epoch limit; None: 1000 (with a warning), or no limit
        when max_steps, max_time or a Timer callback bounds the fit.
    max_steps: Stop after this many optimizer steps; -1: no step limit.
    min_epochs: A stop request (EarlyStopping, trainer.should_stop) waits until this many epochs have run;
        None: no minimum.
    min_steps: A stop request waits until this many optimizer steps are done; None: no minimum.
    max_time: Stop after this much time: "DD:HH:MM:SS", a datetime.timedelta or its keywords as a dict
        ({"hours": 2}); None: no time limit.
    accumulate_grad_batches: Batches whose gradients are accumulated before each optimizer step, an int
        >= 1 (automatic optimization only).
    gradient_clip_val: Clip the gradients at this value, a number >= 0 (automatic optimization only);
        None or 0: no clipping.
    gradient_clip_algorithm: How gradient_clip_val clips: "norm" (the total 2-norm) or "value" (each
        element), in any case; None: "norm".
    val_check_interval: When to validate: a float in (0.0, 1.0] is a fraction of the epoch, an int >= 1
        a number of training batches, and "DD:HH:MM:SS", a timedelta or a dict of its keywords a time.
    check_val_every_n_epoch: Validate in every N-th epoch, an int >= 1; None: every val_check_interval
        (an int) training batches, counted across epochs.
    limit_train_batches: Training batches per epoch and process: an int >= 0 is a count, a float in
        [0.0, 1.0] a fraction of the loader.
    limit_val_batches: Validation batches per loader and process, as limit_train_batches; 0 turns
        validation (and the sanity check) off.
    limit_test_batches: Test batches per loader and process, as limit_train_batches.
    limit_predict_batches: Predict batches per loader and process, as limit_train_batches.
    num_sanity_val_steps: Validation batches per loader run before training (not when resuming); -1:
        all, 0: none; None: 2 (0 under barebones).
    fast_dev_run: A quick trial of the code: True (1) or an int n runs n batches of each stage in one
        epoch, without sanity check, checkpoints or logs; False or 0: off.
    log_every_n_steps: Write a logger row every N optimizer steps, an int >= 1; None: 50.
    callbacks: A Callback or a list of them, run with the ones the Trainer adds (such as checkpointing,
        progress bar, model summary, non-finite guard).
    logger: True: a CSVLogger under default_root_dir; False: none; a Logger or a list of them; None: True
        (False under barebones).
    enable_checkpointing: Add a ModelCheckpoint when none is among the callbacks; None: True (False under
        barebones).
    enable_progress_bar: Add a RichProgressBar when no progress bar is among the callbacks; None: True
        (False under barebones).
    enable_model_summary: Add a ModelSummary when none is among the callbacks; None: True (False under
        barebones).
    enable_autolog_hparams: Send the module's and the DataModule's saved hyper-parameters to the loggers
        at the start of each stage.
    default_root_dir: Where logs and checkpoints go ("~" expanded); None: the current directory.
    deterministic: torch.use_deterministic_algorithms: True on, "warn" on with warnings instead of
        errors, False off; None: left as it is.
    detect_anomaly: Run the loops under torch.autograd.detect_anomaly() (slow), which names the
        operation that produced a NaN in the backward pass.
    use_distributed_sampler: Shard every dataloader across the processes; False: each process reads
        every batch.
    seed: Seed every random generator (seed_everything) and the loaders' shuffling; None: no seeding,
        and the loaders shuffle with global rank 0's torch.initial_seed().
    auto_resume: A fit without ckpt_path resumes from the newest valid checkpoint of the
        ModelCheckpoint's directory: True always, False never, None only in a restarted process (ember
        launch --max-restarts, a requeued SLURM job).
    non_finite: The default NonFiniteGuard, on a NaN or Inf loss or gradient: "stop" raises
        FloatingPointError, "skip" skips that optimizer step; None: no guard.
    collective_timeout: Seconds (or a timedelta) a process may wait in a collective before the watchdog
        ends the run with every rank's stack; None: no watchdog.
    overfit_batches: Above 0, train and validate on the same first batches every epoch, read in order
        (an int is a count, a float in [0.0, 1.0] a fraction): a check that the model can fit them.
    benchmark: torch.backends.cudnn.benchmark: True or False sets it; None leaves it as it is (False
        when deterministic is set).
    inference_mode: Run validation, test and predict under torch.inference_mode(); False: under
        torch.no_grad().
    sync_batchnorm: Convert the module's BatchNorm layers to torch.nn.SyncBatchNorm, so that batch
        statistics span all processes (GPUs only).
    reload_dataloaders_every_n_epochs: Ask the module or DataModule for new training and validation
        loaders every N epochs; 0: never.
    profiler: Time what the Trainer runs and print a report after each stage: "simple", "advanced",
        "pytorch", "xla" or a Profiler instance; None: nothing is timed.
    plugins: Lightning's way to give the precision: a Precision instance, or a list holding one (not
        together with precision).
    barebones: Turn off every feature that costs step time (checkpoints, loggers, progress bar,
        summaries, sanity check, non-finite guard, self.log), to measure the loop itself.
"""
