"""The embedded benchmark as an lmms-eval task that runs offline (no hub): :func:`write_shapes_task`."""

from __future__ import annotations

import json
from typing import Any

_TASK_UTILS = """\
# Written by tokprune.integrations.lmms_eval.write_shapes_task: the embedded benchmark as an lmms-eval task.
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    return [Image.open(HERE / doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    prediction = results[0].strip().lower().rstrip(".")
    return {"exact_match": float(prediction == doc["answer"])}
"""


def write_shapes_task(folder: str | Any, split: str = "test", n: int = 50, max_new_tokens: int = 3) -> str:
    """Write the embedded benchmark as an lmms-eval task that runs offline; returns the task name.

    ``folder`` gets ``tokprune_shapes.yaml``, ``utils.py``, ``data.jsonl`` and one PNG per question:
    ``lmms-eval --include_path FOLDER --tasks tokprune_shapes ...`` then evaluates exactly the questions
    ``tokprune run`` sees (``dataset.split=SPLIT``, ``limit=N``), with the same prompt and greedy
    settings, so a setup can be checked end to end without a hub.
    """
    from pathlib import Path

    from ... import data

    if n < 1:
        raise ValueError(f"n must be >= 1 (questions to write), got {n}")
    out = Path(folder)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, sample in enumerate(data.benchmark(split=split, n=n)):
        image = f"images/{i:05d}.png"
        sample.image.save(out / image)
        rows.append(
            {
                "question_id": sample.question_id,
                "question": sample.question,
                "answer": sample.answer,
                "qtype": sample.qtype,
                "image": image,
            }
        )
    (out / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "utils.py").write_text(_TASK_UTILS)
    name = "tokprune_shapes"
    (out / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str((out / 'data.jsonl').resolve()))}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_visual: !function utils.doc_to_visual\n"
        "doc_to_text: !function utils.doc_to_text\n"
        "doc_to_target: answer\n"
        "process_results: !function utils.process_results\n"
        "generation_kwargs:\n"
        f"  max_new_tokens: {max_new_tokens}\n"
        "  temperature: 0\n"
        "  do_sample: false\n"
        "metric_list:\n"
        "  - metric: exact_match\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
    )
    return name
