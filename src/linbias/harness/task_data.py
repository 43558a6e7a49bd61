"""The documents and scores of linbias's lm-eval tasks (the YAML files in ``tasks/`` name these).

lm-eval calls a task's ``custom_dataset`` with its metadata: the ``--model_args`` (``run=``,
``pretrained=``, ``tokenizer=``, ...) merged with ``--metadata``, so every function here takes
``**kwargs`` and reads only its own keys.

- ``qmsum_dataset``: a local file in SCROLLS' QMSum format (JSON lines with ``id``, ``input``,
  ``output``; ``input`` is the query, a blank line, then the transcript), metadata key
  ``qmsum_file`` (default: the sample shipped beside the tasks, written for the tests, not taken
  from QMSum). Rows with the same ``id`` are one document with several references, as SCROLLS
  merges them. ``qmsum_rouge`` scores a generation as SCROLLS does: ``rouge_score`` with the
  Porter stemmer, F-measure times 100, the best over the references; ``rougeL`` is ``rougeLsum``
  (newlines split sentences).
- ``passkey_dataset``, ``lines_dataset``: ``linbias.tasks`` trials, built with the model's own
  tokenizer (``run=`` or ``pretrained=``/``tokenizer=``) for each cell of metadata ``lengths``,
  ``depths``, ``trials`` and ``seed`` (``linbias.config.EvalConfig``'s defaults, and its seed per
  cell), so the prompts are the token ids ``linbias eval --task`` scores. A document's text is their
  decoding; it re-encodes to the same ids with the byte-level BPE tokenizers linbias trains and
  exports (``tokens_match`` records it per document). The score is lm-eval's ``acc`` of a
  loglikelihood request: 1 iff the greedy choice at every answer token is that token, the exact
  match of ``linbias.tasks.score``. Passkey's haystack is the filler sentences.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

from linbias.harness import TASKS_DIR

__all__ = ["QMSUM_SAMPLE", "lines_dataset", "passkey_dataset", "qmsum_dataset", "qmsum_rouge",
           "rouge_scores"]

QMSUM_SAMPLE = TASKS_DIR / "qmsum_sample.jsonl"
_ROUGE_TYPES = {"rouge1": "rouge1", "rouge2": "rouge2", "rougeL": "rougeLsum"}


# --- QMSum, SCROLLS' format -----------------------------------------------------------------------


def qmsum_dataset(qmsum_file: str | None = None, **_: Any) -> dict[str, datasets.Dataset]:
    """The ``test`` split: one document per ``id``, with ``question``, ``text`` and ``outputs``.

    Raises:
        ValueError: a missing file, a line that is not a JSON object with string ``id``,
            ``input`` and ``output``, or an ``input`` without the blank line after the query.
    """
    path = Path(qmsum_file) if qmsum_file is not None else QMSUM_SAMPLE
    if not path.is_file():
        raise ValueError(f"qmsum_file {path} does not exist: give a JSON-lines file in SCROLLS' "
                         "QMSum format (id, input, output)")
    docs: dict[str, dict[str, Any]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = _qmsum_row(path, n, line)
        if row["id"] in docs:
            docs[row["id"]]["outputs"].append(row["output"])
            continue
        query, sep, text = row["input"].partition("\n\n")
        if not sep:
            raise ValueError(f"{path} line {n}: input has no blank line between the query and "
                             "the transcript (SCROLLS' QMSum format)")
        docs[row["id"]] = {"id": row["id"], "question": query, "text": text,
                           "outputs": [row["output"]]}
    if not docs:
        raise ValueError(f"{path} holds no documents")
    return {"test": datasets.Dataset.from_list(list(docs.values()))}


def _qmsum_row(path: Path, n: int, line: str) -> dict[str, str]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} line {n} is not JSON: {exc}") from None
    if not isinstance(row, dict) or not all(isinstance(row.get(k), str)
                                            for k in ("id", "input", "output")):
        raise ValueError(f"{path} line {n}: expected an object with string fields id, input and "
                         "output (SCROLLS' QMSum format)")
    return row


def rouge_scores(prediction: str, references: list[str]) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-Lsum F-measures times 100, the best over ``references``."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(_ROUGE_TYPES.values()), use_stemmer=True)
    scores = [scorer.score(ref, prediction) for ref in references]
    return {name: 100 * max(s[kind].fmeasure for s in scores) for name, kind in _ROUGE_TYPES.items()}


def qmsum_rouge(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval's ``process_results``: the generation's ROUGE against the document's outputs."""
    return rouge_scores(results[0], list(doc["outputs"]))


# --- retrieval: linbias.tasks as documents -------------------------------------------------------


def passkey_dataset(**metadata: Any) -> dict[str, datasets.Dataset]:
    """``linbias.tasks.passkey`` trials as documents (see the module docstring)."""
    return _retrieval_dataset("passkey", metadata)


def lines_dataset(**metadata: Any) -> dict[str, datasets.Dataset]:
    """``linbias.tasks.lines`` trials as documents (see the module docstring)."""
    return _retrieval_dataset("lines", metadata)


def _retrieval_dataset(task: str, metadata: dict[str, Any]) -> dict[str, datasets.Dataset]:
    from linbias.config import EvalConfig
    from linbias.evaluate import cell_seed
    from linbias.tasks import make_trials

    if "lengths" not in metadata:
        raise ValueError(f"linbias_{task} needs the prompt lengths in tokens: --metadata "
                         "'{\"lengths\": [256, 512]}' (also depths, trials, seed)")
    fields = {k: metadata[k] for k in ("lengths", "depths", "trials", "seed") if k in metadata}
    config = EvalConfig.from_dict({**fields, "task": task})  # checks every value
    encode = _encoder(metadata)
    docs = []
    for length in config.lengths:
        for depth in config.depths:
            for trial in make_trials(task, encode, length, depth, config.trials,
                                     cell_seed(config.seed, length, depth)):
                context = encode.decode(trial.prompt_ids)
                docs.append({"context": context, "answer": encode.decode(trial.answer_ids),
                             "length": length, "depth": float(depth),
                             "distance": trial.distance,
                             "tokens_match": encode(context) == list(trial.prompt_ids)})
    return {"test": datasets.Dataset.from_list(docs)}


def _encoder(metadata: dict[str, Any]) -> Any:
    """``linbias.tasks.encoder`` of the model's tokenizer, named by the model args."""
    from linbias.tasks import encoder

    if metadata.get("run") is not None:
        from linbias.data import load_tokenizer

        return encoder(load_tokenizer(Path(str(metadata["run"])) / "tokenizer.json"))
    source = metadata.get("tokenizer") or metadata.get("pretrained")
    if source is None:
        raise ValueError("linbias's retrieval tasks build their prompts with the model's "
                         "tokenizer: give run=PATH, pretrained=PATH_OR_NAME or tokenizer=NAME in "
                         "--model_args (or --metadata)")
    from transformers import AutoTokenizer

    return encoder(AutoTokenizer.from_pretrained(str(source)))
