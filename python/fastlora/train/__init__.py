"""QLoRA training: `fastlora.train(...)` and the `fastlora train` command.

This package is itself callable: `fastlora.train(max_steps=100, data="my.jsonl")` is
`fastlora.train.train(...)` (see `TrainConfig` for the options), while `fastlora.train.data`,
`fastlora.train.TrainConfig` and the other submodules stay reachable as attributes (a plain
function named `train` in `fastlora` would hide them).
"""

import inspect as _inspect
import sys as _sys
import types as _types

from .errors import TrainError
from .trainer import TrainConfig, Trainer, TrainResult, train

__all__ = ["TrainConfig", "TrainError", "TrainResult", "Trainer", "train"]
__signature__ = _inspect.signature(train)


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kwargs) -> TrainResult:
        return train(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
