"""illume: a production model server for ILLUME-style vision-language models.

The core library (this package) knows models, prompts, sampling, critics, metrics, data sets,
request validation, the feedback store, the adapter registry and the training round body.
It never imports Ray or the generated protobuf stubs (those live in ``illume.v1`` and are used
by ``services/`` only).
"""

__version__ = "0.1.0"
