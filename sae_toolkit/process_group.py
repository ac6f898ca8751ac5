"""Joining torch's default process group so that `destroy_process_group` really ends it.

`torch.distributed.nn.functional` binds `group=group.WORLD` as the default argument of ten functions when it is
first imported, and transformers imports it when it loads a model. Imported after the group exists, those
defaults hold the group: `destroy_process_group` then leaves its gloo threads running until interpreter exit,
where a rank aborts now and then ("terminate called without an active exception", SIGABRT, after all its work was
done). Imported before the group exists, the defaults bind None.
"""

from __future__ import annotations

from typing import Any


def init_process_group(backend: str, **kwargs: Any) -> None:
    """`torch.distributed.init_process_group(backend, **kwargs)`, after importing what would otherwise pin it."""
    import torch.distributed as dist
    import torch.distributed.nn  # noqa: F401  (binds its group.WORLD defaults to None; see the module docstring)

    dist.init_process_group(backend, **kwargs)
