"""What a task provides (``Example``), the verifier, and the JSONL dataset loader."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import numpy as np

from ..config import UsageError
from ..hints import HintLeakError, check_hint


@dataclass
class Example:
    image: np.ndarray | None  # uint8 RGB [H, W, 3]; None for a text-only task
    question: str
    answer: str  # what the verifier compares with
    completion: str = ""  # a reference response (the warm start's target); "" = the answer
    hints: dict[str, str] = field(default_factory=dict)  # hint kind → text ("default" for datasets)

    def hint(self, kind: str) -> str | None:
        """The hint of this kind (``"none"`` → None); a dataset's single hint serves every kind."""
        if kind == "none":
            return None
        if kind in self.hints:
            return self.hints[kind]
        return self.hints.get("default")


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def reward(response: str, answer: str) -> float:
    """1.0 when the response's final answer is right, else 0.0.

    Numeric answers: the last number in the response equals the answer. Other answers: the
    response, stripped and lower-cased, ends with the answer.
    """
    a = answer.strip()
    if _NUMBER.fullmatch(a):
        nums = _NUMBER.findall(response)
        return float(bool(nums) and float(nums[-1]) == float(a))
    return float(response.strip().lower().endswith(a.lower()) and bool(a))


def load_jsonl(path: str) -> list[Example]:
    """A JSONL dataset: one object per line with ``image`` (a path, relative to the file's
    folder or absolute; null for a text-only task), ``question``, ``answer``, ``hint`` (string or
    null) and optionally ``completion``. Any problem raises ``ValueError`` naming the file and
    line number (a :class:`~ptd_train.config.UsageError`), and so does a file that mixes examples
    with and without an image."""
    from PIL import Image

    root = os.path.dirname(os.path.abspath(path))
    examples: list[Example] = []
    with open(path, encoding="utf-8") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); a dataset is JSONL") from None
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise UsageError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            for key in ("image", "question", "answer"):
                if key not in obj:
                    raise UsageError(f"{where}: missing field {key!r}")
            if not isinstance(obj["image"], str) and obj["image"] is not None:
                raise UsageError(f"{where}: field 'image' must be a string (a path) or null")
            if not isinstance(obj["question"], str):
                raise UsageError(f"{where}: field 'question' must be a string")
            if not isinstance(obj["answer"], (str, int, float)) or isinstance(obj["answer"], bool):
                raise UsageError(f"{where}: field 'answer' must be a string or a number")
            hint = obj.get("hint")
            if hint is not None and not isinstance(hint, str):
                raise UsageError(f"{where}: field 'hint' must be a string or null")
            answer = str(obj["answer"])
            if hint:
                try:
                    check_hint(hint, answer)
                except HintLeakError as e:
                    raise UsageError(f"{where}: {e}") from None
            image = None
            if obj["image"] is not None:
                image_path = obj["image"] if os.path.isabs(obj["image"]) else os.path.join(root, obj["image"])
                if not os.path.isfile(image_path):
                    raise UsageError(f"{where}: image {obj['image']!r} not found (looked for {image_path})")
                try:
                    with Image.open(image_path) as im:
                        image = np.asarray(im.convert("RGB"))
                except (OSError, ValueError) as e:
                    raise UsageError(f"{where}: cannot read image {obj['image']!r} ({e})") from None
            if examples and (examples[0].image is None) != (image is None):
                kind = "has no image" if image is None else "has an image"
                raise UsageError(f"{where}: {kind}, unlike the first example (a dataset is all images or all text)")
            examples.append(
                Example(
                    image=image,
                    question=obj["question"],
                    answer=answer,
                    completion=str(obj.get("completion", "")),
                    hints={"default": hint} if hint else {},
                )
            )
    if not examples:
        raise UsageError(f"{path}: no examples (an empty file?)")
    return examples
