"""How lm-eval finds the ``linbias`` model and linbias's tasks.

lm-eval 0.4.13 (the release tested) discovers nothing outside its own tree: models come from its
``MODEL_MAPPING``, tasks from its own folder plus ``--include_path``. So:

- ``linbias`` declares the entry point ``lm_eval.models: linbias = linbias.harness.lm:LinbiasLM``,
  the mechanism lm-eval's main branch added after 0.4.13 (EleutherAI/lm-evaluation-harness
  PR 4013): with such a release ``lm-eval --model linbias`` works once linbias is installed.
- With 0.4.13, ``python -m linbias.harness`` is lm-eval's own command line after ``install()``
  (same flags, ``lm-eval run`` inserted when no sub-command is given, as lm-eval does), and
  ``install()`` before ``lm_eval.simple_evaluate`` does the same for Python callers.

``install()`` registers the model lazily (nothing is loaded until lm-eval asks for it) and adds
``TASKS_DIR`` to every ``TaskManager`` lm-eval builds, so ``linbias_qmsum``, ``linbias_passkey``
and ``linbias_lines`` need no ``--include_path`` (an ``--include_path`` given is kept; tasks
of that folder win over linbias's of the same name, as lm-eval orders them).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from linbias.harness import TASKS_DIR, require_harness

__all__ = ["MODEL_TARGET", "install"]

MODEL_TARGET = "linbias.harness.lm:LinbiasLM"


def install() -> None:
    """Register ``linbias`` with lm-eval's model registry and its tasks with every TaskManager.
    Idempotent."""
    require_harness()
    from lm_eval.api.registry import model_registry
    from lm_eval.tasks import manager

    if "linbias" not in model_registry:
        model_registry.register("linbias", target=MODEL_TARGET)
    init = manager.TaskManager.__init__
    if getattr(init, "_linbias", False):
        return

    @functools.wraps(init)
    def with_linbias_tasks(self: Any, *args: Any, include_path: Any = None, **kwargs: Any) -> None:
        paths = [] if include_path is None else (
            list(include_path) if isinstance(include_path, (list, tuple)) else [include_path])
        if not any(Path(p).resolve() == TASKS_DIR.resolve() for p in paths):
            paths.insert(0, str(TASKS_DIR))  # later paths override earlier ones in lm-eval
        init(self, *args, include_path=paths, **kwargs)

    with_linbias_tasks._linbias = True  # type: ignore[attr-defined]
    manager.TaskManager.__init__ = with_linbias_tasks  # type: ignore[method-assign]
