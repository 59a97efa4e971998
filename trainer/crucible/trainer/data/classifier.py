"""Learned classifiers (quality, toxicity): hashed word n-grams and a linear model.

Each ``steps.classifiers[i]`` is trained when the filter stage starts, from reference data the
spec names: ``positive`` (documents of the class the score measures: a "good" corpus for
quality, toxic text for toxicity) against ``negative`` (or, when that is empty, a hash-chosen
sample of the raw input). Features are scikit-learn's ``HashingVectorizer`` (word 1..n-grams,
``features`` dimensions, l2-normalised, stateless), the model ``SGDClassifier`` with logistic
loss and balanced class weights, seeded: the same reference data gives the same model, bit for
bit, on every worker, so each worker trains its own copy and no worker waits for another.

Every document gets ``score = P(positive)``. ``drop: below`` fails documents under the
threshold (quality), ``drop: above`` over it (toxicity). ``action: drop`` drops failing
documents (reason ``below_threshold`` / ``above_threshold`` of step ``classifier_<name>``);
``action: weight`` keeps them all and multiplies the document's mixture weight by
``score / threshold`` (``(1 - score) / (1 - threshold)`` for ``above``), at most ``maxWeight``.
The receipt gets the training files' sha256, the sampled negatives' hash, the model's hash, the
threshold and a 20-bin histogram of the scores.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import xxhash

from crucible.trainer.config.data import ClassifierStep
from crucible.trainer.data.decontaminate import EvalSetError, file_texts
from crucible.trainer.data.document import Document
from crucible.trainer.data.readers import DocumentReader, InputFile
from crucible.trainer.data.step import Step
from crucible.trainer.storage import Storage

log = logging.getLogger("crucible.data")

HISTOGRAM_BINS = 20


class ClassifierError(EvalSetError):
    """Reference data that cannot train a classifier (exit 2); the message names the field."""


def _raw_sample(inputs: list[InputFile], count: int, seed: int, storage: Storage) -> Iterator[str]:
    """About ``count`` raw input documents: files in hash order, a few documents from each."""
    order = sorted(inputs, key=lambda f: xxhash.xxh64_intdigest(f"{f.source.name}/{f.relpath}".encode(), seed))
    per_file = max(16, -(-count // max(1, min(len(order), 64))))
    reader = DocumentReader(storage, 10**9)
    taken = 0
    for item in order:
        for i, doc in enumerate(reader.read(item)):
            if i >= per_file or taken >= count:
                break
            taken += 1
            yield doc.text
        if taken >= count:
            return


class TrainedClassifier:
    def __init__(self, config: ClassifierStep, index: int, inputs: list[InputFile], storage: Storage) -> None:
        from sklearn.feature_extraction.text import HashingVectorizer
        from sklearn.linear_model import SGDClassifier

        self.config = config
        where = f"steps.classifiers[{index}]"
        self.vectorizer = HashingVectorizer(n_features=config.features, ngram_range=(1, config.ngram),
                                            alternate_sign=False, norm="l2", lowercase=True)
        pos_files: list[dict[str, Any]] = []
        positive = self._take(file_texts(config.name, f.uri, f.text_fields, storage, f"{where}.positive[{i}]", pos_files)
                              for i, f in enumerate(config.positive))
        neg_files: list[dict[str, Any]] = []
        if config.negative:
            negative = self._take(file_texts(config.name, f.uri, f.text_fields, storage, f"{where}.negative[{i}]",
                                             neg_files) for i, f in enumerate(config.negative))
        else:
            negative = list(_raw_sample(inputs, min(config.negative_sample, config.max_training_docs),
                                        config.seed, storage))
        if len(positive) < 2 or len(negative) < 2:
            raise ClassifierError(
                f"{where}: {len(positive)} positive and {len(negative)} negative reference documents; "
                "a classifier needs at least 2 of each (check positive/negative uris and textFields)"
            )
        x = self.vectorizer.transform(positive + negative)
        y = np.array([1] * len(positive) + [0] * len(negative))
        self.model = SGDClassifier(loss="log_loss", alpha=1e-5, max_iter=30, tol=None, class_weight="balanced",
                                   random_state=config.seed)
        self.model.fit(x, y)
        train_acc = float((self.model.predict(x) == y).mean())
        coef = np.ascontiguousarray(self.model.coef_, np.float64).tobytes() + self.model.intercept_.tobytes()
        neg_hash = hashlib.sha256("\x00".join(negative).encode("utf-8", "surrogatepass")).hexdigest()
        self.training = {
            "positive": {"documents": len(positive), "files": pos_files},
            "negative": ({"documents": len(negative), "files": neg_files} if config.negative else
                         {"documents": len(negative), "sampledFromInput": True, "textsSha256": neg_hash}),
            "trainingAccuracy": round(train_acc, 6),
            "modelSha256": hashlib.sha256(coef).hexdigest(),
        }
        log.info("classifier %s: trained on %d positive / %d negative documents, training accuracy %.3f",
                 config.name, len(positive), len(negative), train_acc)

    def _take(self, streams: Iterable[Iterable[str]]) -> list[str]:
        out: list[str] = []
        for stream in streams:
            for text in stream:
                if len(out) >= self.config.max_training_docs:
                    return out
                out.append(text)
        return out

    def score(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.model.predict_proba(self.vectorizer.transform(texts))[:, 1], np.float64)


class ClassifierFilter(Step):
    """Scores every document; drops failing ones or turns the score into a mixture weight."""

    def __init__(self, classifier: TrainedClassifier) -> None:
        super().__init__()
        self.classifier = classifier
        self.config = classifier.config
        self.name = f"classifier_{classifier.config.name}"  # type: ignore[misc]
        self.histogram = np.zeros(HISTOGRAM_BINS, np.int64)

    def weight(self, score: float) -> float:
        c = self.config
        ratio = score / c.threshold if c.drop == "below" else (1.0 - score) / (1.0 - c.threshold)
        return min(c.max_weight, ratio)

    def process(self, doc: Document) -> str | None:
        score = float(self.classifier.score([doc.text])[0])
        self.histogram[min(HISTOGRAM_BINS - 1, int(score * HISTOGRAM_BINS))] += 1
        doc.meta.setdefault("scores", {})[self.config.name] = round(score, 6)
        if self.config.action == "weight":
            doc.meta["weight"] = doc.meta.get("weight", 1.0) * self.weight(score)
            return None
        failing = score < self.config.threshold if self.config.drop == "below" else score > self.config.threshold
        return f"{self.config.drop}_threshold" if failing else None

    def summary(self) -> dict[str, Any]:
        return {"histogram": self.histogram.tolist()}


def receipt(config: ClassifierStep, training: dict[str, Any], histogram: list[int]) -> dict[str, Any]:
    return {
        "threshold": config.threshold,
        "drop": config.drop,
        "action": config.action,
        "features": config.features,
        "ngram": config.ngram,
        "training": training,
        "histogram": {"edges": [round(i / HISTOGRAM_BINS, 4) for i in range(HISTOGRAM_BINS + 1)], "counts": histogram},
    }
