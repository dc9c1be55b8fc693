"""The Trainer layer (``TrainModule``, ``Trainer``): built on :class:`ember.Accelerator`."""
