"""Downstream long-context tasks through lm-evaluation-harness (``lm-eval`` 0.4).

The interpolation paper (Al-Khateeb, Dey, Soboleva and Hestness 2023, arXiv 2310.13017) measures
perplexity, retrieval and summarization (QMSum's ROUGE). lm-eval runs the last, and hundreds of
other tasks; this package plugs linbias models into it instead of writing a second harness:

- ``LinbiasLM`` (``lm.py``), registered in lm-eval as ``linbias``: a linbias run (``run=PATH``) or
  a transformers causal LM (``pretrained=PATH_OR_NAME``; the ALiBi families through
  ``linbias.hf.extend_context``), evaluated at ``max_length`` L' under a scaling ``rule``, with
  lm-eval's three request types (``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``).
- Task definitions (``tasks/``): ``linbias_qmsum`` reads a local file in SCROLLS' QMSum format and
  scores ROUGE with ``rouge-score``; ``linbias_passkey`` and ``linbias_lines`` are linbias's
  retrieval tasks (``linbias.tasks``) with the same prompts, seeds and exact match.
- ``evaluate_harness`` (``run.py``), behind ``linbias harness``: lm-eval's ``simple_evaluate`` with
  these tasks included, writing lm-eval's results JSON and a short table.
- ``plugin.py``: how lm-eval finds all this without flags (see its docstring).

lm-eval and rouge-score are an optional extra: ``pip install 'linbias[harness]'``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["INSTALL", "TASKS_DIR", "require_harness"]

INSTALL = "pip install 'linbias[harness]'"
TASKS_DIR = Path(__file__).parent / "tasks"  # lm-eval's include_path for linbias's task YAMLs


def require_harness() -> None:
    """ImportError in one line naming the install command if lm-eval or rouge-score is missing."""
    missing = [name for module, name in (("lm_eval", "lm-eval"), ("rouge_score", "rouge-score"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(f"linbias harness needs {' and '.join(missing)}: {INSTALL}")
