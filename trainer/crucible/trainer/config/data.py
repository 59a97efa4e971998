"""Configuration of a DataPipeline: sources, filtering steps, dedup, mixture, tokenizer, shards.

Defaults are the published thresholds: Gopher (Rae et al. 2021, MassiveText), C4 (Raffel et
al. 2020) and FineWeb (Penedo et al. 2024), as datatrove implements them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from crucible.trainer.config.common import InputRef, OutputConfig, StorageConfig, StrictModel, check_uri


class SourceConfig(StrictModel):
    """One input corpus."""

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9_]*[a-z0-9])?$",
                      description="Short name used in receipts and logs.")
    uri: str = Field(min_length=1, description="File, folder or glob; local path or s3://bucket/prefix.")
    format: Literal["auto", "jsonl", "parquet", "text"] = Field(
        default="auto",
        description="auto: by extension (.jsonl, .jsonl.gz, .jsonl.zst, .parquet, .txt).",
    )
    text_field: str = Field(default="text", min_length=1, description="Field holding the document text.")
    id_field: str | None = Field(default=None, description="Field holding a stable document id; empty: file:line.")
    domain: str = Field(default="web", min_length=1, max_length=63, description="Domain used by the mixture step.")
    weight: float = Field(default=1.0, ge=0, le=100, description="Mixture weight: 2.0 doubles, 0.5 halves the domain.")
    license: str | None = Field(
        default=None, min_length=1, max_length=512,
        description="Licence of the source: an SPDX id (CC-BY-4.0, Apache-2.0, ...) or its text; in the manifest and lineage.",
    )
    consent: str | None = Field(
        default=None, min_length=1, max_length=512,
        description="The basis on which the text may be used for training (e.g. opt-in, public-domain, contract X).",
    )
    origin: str | None = Field(
        default=None, min_length=1, max_length=2048, description="Where the source came from: a URL or a description."
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        return check_uri(value) or value


class NormalizeStep(StrictModel):
    enabled: bool = Field(default=True, description="Run this step.")
    form: Literal["NFC", "NFKC"] = Field(default="NFC", description="Unicode normalization form.")


class LanguageStep(StrictModel):
    enabled: bool = Field(default=True, description="Run this step.")
    languages: list[str] = Field(default_factory=lambda: ["en"], min_length=1, description="ISO 639-1 codes to keep.")
    min_score: float = Field(default=0.65, ge=0, le=1, description="Minimum identifier confidence.")


class GopherQuality(StrictModel):
    enabled: bool = Field(default=True, description="Apply the Gopher quality rules.")
    min_doc_words: int = Field(default=50, ge=0, description="Drop documents with fewer words.")
    max_doc_words: int = Field(default=100000, ge=1, description="Drop documents with more words.")
    min_avg_word_length: float = Field(default=3, ge=0, description="Minimum mean word length.")
    max_avg_word_length: float = Field(default=10, ge=0, description="Maximum mean word length.")
    max_symbol_word_ratio: float = Field(default=0.1, ge=0, description="Max ratio of # and … to words.")
    max_bullet_lines_ratio: float = Field(default=0.9, ge=0, le=1, description="Max fraction of lines starting with a bullet.")
    max_ellipsis_lines_ratio: float = Field(default=0.3, ge=0, le=1, description="Max fraction of lines ending in an ellipsis.")
    max_non_alpha_words_ratio: float = Field(default=0.8, ge=0, le=1, description="Min fraction of words with a letter (named as datatrove does).")
    min_stop_words: int = Field(default=2, ge=0, description="Minimum count of English stop words.")


class GopherRepetition(StrictModel):
    enabled: bool = Field(default=True, description="Apply the Gopher repetition rules.")
    dup_line_frac: float = Field(default=0.3, ge=0, le=1, description="Max fraction of duplicated lines.")
    dup_para_frac: float = Field(default=0.3, ge=0, le=1, description="Max fraction of duplicated paragraphs.")
    dup_line_char_frac: float = Field(default=0.2, ge=0, le=1, description="Max char fraction in duplicated lines.")
    dup_para_char_frac: float = Field(default=0.2, ge=0, le=1, description="Max char fraction in duplicated paragraphs.")
    top_n_grams: dict[str, float] = Field(
        default_factory=lambda: {"2": 0.2, "3": 0.18, "4": 0.16},
        description="n -> max char fraction covered by the most frequent n-gram.",
    )
    dup_n_grams: dict[str, float] = Field(
        default_factory=lambda: {"5": 0.15, "6": 0.14, "7": 0.13, "8": 0.12, "9": 0.11, "10": 0.10},
        description="n -> max char fraction covered by duplicated n-grams.",
    )


class C4Quality(StrictModel):
    enabled: bool = Field(default=True, description="Apply the C4 rules.")
    split_paragraph: bool = Field(default=True, description="Treat lines as the unit, as C4 does.")
    remove_citations: bool = Field(default=True, description="Strip Wikipedia-style [1] citations.")
    filter_no_terminal_punct: bool = Field(default=True, description="Drop lines without terminal punctuation.")
    min_num_sentences: int = Field(default=5, ge=0, description="Drop documents with fewer sentences.")
    min_words_per_line: int = Field(default=3, ge=0, description="Drop lines with fewer words.")
    max_word_length: int = Field(default=1000, ge=1, description="Drop lines with a longer word.")
    filter_lorem_ipsum: bool = Field(default=True, description="Drop documents with lorem ipsum.")
    filter_javascript: bool = Field(default=True, description="Drop lines mentioning javascript.")
    filter_curly_bracket: bool = Field(default=True, description="Drop documents with a curly bracket.")
    filter_policy: bool = Field(default=True, description="Drop cookie/terms-of-use boilerplate lines.")


class FineWebQuality(StrictModel):
    enabled: bool = Field(default=True, description="Apply the FineWeb rules.")
    line_punct_thr: float = Field(default=0.12, ge=0, le=1, description="Min fraction of lines ending in punctuation.")
    short_line_thr: float = Field(default=0.67, ge=0, le=1, description="Max fraction of short lines.")
    short_line_length: int = Field(default=30, ge=0, description="A line this short or shorter is short.")
    char_duplicates_ratio: float = Field(default=0.01, ge=0, le=1, description="Max char fraction in duplicated lines.")
    new_line_ratio: float = Field(default=0.3, ge=0, description="Max newlines per word.")


class QualityStep(StrictModel):
    enabled: bool = Field(default=True, description="Run this step.")
    gopher_quality: GopherQuality = Field(default_factory=GopherQuality, description="Gopher quality rules.")
    gopher_repetition: GopherRepetition = Field(default_factory=GopherRepetition, description="Gopher repetition rules.")
    c4: C4Quality = Field(default_factory=C4Quality, description="C4 rules.")
    fineweb: FineWebQuality = Field(default_factory=FineWebQuality, description="FineWeb rules.")


class PiiStep(StrictModel):
    enabled: bool = Field(default=True, description="Run this step.")
    email: bool = Field(default=True, description="Replace e-mail addresses with <EMAIL>.")
    phone: bool = Field(default=True, description="Replace phone numbers with <PHONE>.")
    ip: bool = Field(default=True, description="Replace IPv4/IPv6 addresses with <IP_ADDRESS>.")
    credit_card: bool = Field(default=True, description="Replace Luhn-valid card numbers with <CREDIT_CARD>.")
    secrets: bool = Field(default=True, description="Replace API keys and tokens with <SECRET>.")


class ToxicityStep(StrictModel):
    enabled: bool = Field(default=True, description="Run this step.")
    max_ratio: float = Field(default=0.01, ge=0, le=1, description="Drop documents whose listed-word ratio exceeds this.")
    wordlists: dict[str, str] = Field(
        default_factory=dict,
        description="language -> word list file (one word per line); empty: the lists shipped with Crucible.",
    )


_SET_NAME = r"^[a-z0-9]([-a-z0-9_]*[a-z0-9])?$"


class TextFiles(StrictModel):
    """Reference or evaluation text: jsonl (.gz/.zst), parquet or text files (local or s3://)."""

    uri: str = Field(min_length=1, description="File, folder or glob; local path or s3://bucket/prefix.")
    text_fields: list[str] = Field(
        default_factory=lambda: ["text"], min_length=1,
        description="Fields joined (with a space) into the text of one record, e.g. [question, answer].",
    )


class DecontaminationSet(StrictModel):
    """One evaluation set: exactly one of ``uri``, ``harnessTask`` or ``validation``."""

    name: str = Field(min_length=1, max_length=63, pattern=_SET_NAME,
                      description="Name used in the drop reason contaminated:<name> and the receipt.")
    uri: str | None = Field(default=None, min_length=1, description="Evaluation data files (jsonl, parquet, text).")
    text_fields: list[str] = Field(
        default_factory=lambda: ["text"], min_length=1,
        description="With uri: fields joined into the text of one evaluation record.",
    )
    harness_task: str | None = Field(
        default=None, min_length=1,
        description="An lm-evaluation-harness task whose evaluation documents are the set (data must be local).",
    )
    harness_task_dir: str | None = Field(
        default=None, min_length=1, description="With harnessTask: folder of task YAML files (include_path)."
    )
    validation: bool = Field(default=False, description="The run's own validation split (held-out documents).")

    @model_validator(mode="after")
    def _one_kind(self) -> DecontaminationSet:
        kinds = [self.uri is not None, self.harness_task is not None, self.validation]
        if sum(kinds) != 1:
            raise ValueError("set exactly one of uri, harnessTask or validation: true")
        if self.harness_task_dir is not None and self.harness_task is None:
            raise ValueError("harnessTaskDir: only with harnessTask")
        return self


class DecontaminationStep(StrictModel):
    """Drop (or redact) training text sharing a word n-gram with an evaluation set."""

    sets: list[DecontaminationSet] = Field(default_factory=list, description="Evaluation sets; empty: off.")
    ngram: int = Field(default=13, ge=3, le=64, description="Word n-gram length that counts as contamination.")
    action: Literal["drop", "redact"] = Field(
        default="drop", description="drop: the whole document; redact: cut the matching spans out of it."
    )

    @model_validator(mode="after")
    def _unique(self) -> DecontaminationStep:
        names = [s.name for s in self.sets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"sets: names must be unique, repeated: {', '.join(dupes)}")
        if sum(s.validation for s in self.sets) > 1:
            raise ValueError("sets: at most one set with validation: true")
        return self


class ClassifierStep(StrictModel):
    """A hashed n-gram linear classifier trained at the start of the run from reference data."""

    name: str = Field(min_length=1, max_length=40, pattern=_SET_NAME,
                      description="quality, toxicity, ...: used in reasons and the receipt.")
    positive: list[TextFiles] = Field(min_length=1, description="Reference documents of the class the score measures.")
    negative: list[TextFiles] = Field(
        default_factory=list,
        description="Reference documents of the other class; empty: a hash-chosen sample of the raw input.",
    )
    negative_sample: int = Field(default=2000, ge=10, le=1_000_000,
                                 description="Raw-input documents sampled as negatives when negative is empty.")
    max_training_docs: int = Field(default=20000, ge=10, le=10_000_000,
                                   description="At most this many documents per class are used for training.")
    drop: Literal["below", "above"] = Field(
        default="below",
        description="below: documents scoring under the threshold fail (quality); above: over it (toxicity).",
    )
    threshold: float = Field(default=0.5, gt=0, lt=1, description="Score where a document fails.")
    action: Literal["drop", "weight"] = Field(
        default="drop",
        description="drop: failing documents are dropped; weight: the score scales the document's mixture weight.",
    )
    max_weight: float = Field(default=2.0, ge=1, le=100, description="With action weight: the largest multiplier.")
    ngram: int = Field(default=2, ge=1, le=5, description="Word 1..n-grams hashed into features.")
    features: int = Field(default=1 << 20, ge=1 << 10, le=1 << 24, description="Hashed feature dimension.")
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="Seed of the training (SGD) and the sample.")


class MinHashConfig(StrictModel):
    enabled: bool = Field(default=True, description="Remove near duplicates.")
    ngram: int = Field(default=5, ge=1, le=32, description="Word n-gram size of the shingles.")
    bands: int = Field(default=14, ge=1, le=256, description="LSH bands.")
    rows: int = Field(default=8, ge=1, le=64, description="Hashes per band.")
    seed: int = Field(default=1, ge=0, description="Seed of the hash functions.")


class DedupStep(StrictModel):
    exact: bool = Field(default=True, description="Remove exact duplicates of the normalized text.")
    minhash: MinHashConfig = Field(default_factory=MinHashConfig, description="Near-duplicate removal by MinHash LSH.")
    earlier_revisions: list[str] = Field(
        default_factory=list, max_length=1000,
        description="Outputs of earlier revisions of this pipeline: a document whose normalized text one of them "
                    "kept (its seen.npy) is dropped as dedup:seen_in_earlier_revision. The backends fill it in for "
                    "a revision (spec.revisions); set it by hand to deduplicate against any earlier output.",
    )

    @field_validator("earlier_revisions")
    @classmethod
    def _earlier(cls, value: list[str]) -> list[str]:
        for uri in value:
            check_uri(uri)
        return value


class MixtureStep(StrictModel):
    enabled: bool = Field(default=True, description="Apply the per-source weights.")
    seed: int = Field(default=0, ge=0, description="Seed of the deterministic sampling.")


class StepsConfig(StrictModel):
    normalize: NormalizeStep = Field(default_factory=NormalizeStep, description="Unicode and whitespace normalization.")
    language: LanguageStep = Field(default_factory=LanguageStep, description="Language identification.")
    quality: QualityStep = Field(default_factory=QualityStep, description="Heuristic quality filters.")
    pii: PiiStep = Field(default_factory=PiiStep, description="PII redaction.")
    toxicity: ToxicityStep = Field(default_factory=ToxicityStep, description="Word-list toxicity filter.")
    classifiers: list[ClassifierStep] = Field(
        default_factory=list, description="Learned classifiers (quality, toxicity): score, drop or weight."
    )
    decontamination: DecontaminationStep = Field(
        default_factory=DecontaminationStep, description="Remove evaluation-set text from the training data."
    )
    dedup: DedupStep = Field(default_factory=DedupStep, description="Exact and near-duplicate removal.")
    mixture: MixtureStep = Field(default_factory=MixtureStep, description="Domain up/down-weighting.")


class TokenizerConfig(StrictModel):
    """Train a byte-level BPE, or reuse a model's tokenizer (``source``)."""

    source: InputRef | None = Field(
        default=None, description="Use the tokenizer of this Hugging Face-format model instead of training one."
    )
    vocab_size: int = Field(default=8192, ge=260, le=1048576, description="Vocabulary size of the trained BPE.")
    min_frequency: int = Field(default=2, ge=1, description="Minimum pair frequency for a merge.")
    max_training_docs: int = Field(default=200000, ge=1, description="Documents sampled to train the tokenizer.")


class ShardsConfig(StrictModel):
    tokens_per_shard: int = Field(default=100_000_000, ge=1024, description="Tokens per shard file.")
    validation_fraction: float = Field(default=0.01, ge=0, lt=1, description="Fraction of documents held out.")
    seed: int = Field(default=0, ge=0, description="Seed of the document-level train/validation split.")


class DroppedConfig(StrictModel):
    keep: bool = Field(default=False, description="Write a sample of dropped documents with their reason.")
    sample_rate: float = Field(default=0.01, gt=0, le=1, description="Fraction of dropped documents written.")


class DataPolicy(StrictModel):
    """What every source must declare before the pipeline runs (checked by ``crucible validate`` too)."""

    require_license: bool = Field(default=False, description="Every source must set license.")
    allowed_licenses: list[str] = Field(
        default_factory=list, description="Licences a source may have (exact match); empty: any."
    )
    require_consent: bool = Field(default=False, description="Every source must set consent.")


class DataPipelineConfig(StrictModel):
    """What the ``data`` stage of the trainer runs."""

    sources: list[SourceConfig] = Field(min_length=1, description="Input corpora.")
    steps: StepsConfig = Field(default_factory=StepsConfig, description="Filtering steps, each toggleable.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Tokenizer to train or reuse.")
    shards: ShardsConfig = Field(default_factory=ShardsConfig, description="Packed token shards.")
    dropped: DroppedConfig = Field(default_factory=DroppedConfig, description="Sampled dropped documents.")
    workers: int = Field(default=1, ge=1, le=10000, description="Parallel workers (Indexed Job completions).")
    max_doc_chars: int = Field(default=1_000_000, ge=1, description="Longer documents are dropped as too_long.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where shards and the manifest go.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Object storage settings.")
    policy: DataPolicy = Field(default_factory=DataPolicy, description="Licence and consent every source must declare.")

    @model_validator(mode="after")
    def _unique_sources(self) -> DataPipelineConfig:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"sources: names must be unique, repeated: {', '.join(dupes)}; rename them")
        names = [c.name for c in self.steps.classifiers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"steps.classifiers: names must be unique, repeated: {', '.join(dupes)}")
        for i, dset in enumerate(self.steps.decontamination.sets):
            if dset.validation and not self.shards.validation_fraction:
                raise ValueError(
                    f"steps.decontamination.sets[{i}].validation: shards.validationFraction is 0, so there is no "
                    "validation split to decontaminate against; raise it or remove the set"
                )
        return self

    @model_validator(mode="after")
    def _policy(self) -> DataPipelineConfig:
        policy = self.policy
        for i, src in enumerate(self.sources):
            if policy.require_license and not src.license:
                raise ValueError(
                    f"sources.{i}.license: source {src.name!r} declares no licence and policy.requireLicense is set; "
                    "add license: <SPDX id or text> to the source, or drop the source"
                )
            if policy.allowed_licenses and src.license and src.license not in policy.allowed_licenses:
                raise ValueError(
                    f"sources.{i}.license: source {src.name!r} is licensed {src.license!r}, which "
                    f"policy.allowedLicenses ({', '.join(policy.allowed_licenses)}) does not allow; "
                    "drop the source or extend the policy"
                )
            if policy.allowed_licenses and not src.license:
                raise ValueError(
                    f"sources.{i}.license: source {src.name!r} declares no licence, so it cannot be checked "
                    "against policy.allowedLicenses; add license: to the source"
                )
            if policy.require_consent and not src.consent:
                raise ValueError(
                    f"sources.{i}.consent: source {src.name!r} declares no consent basis and policy.requireConsent "
                    "is set; add consent: (e.g. opt-in, public-domain, licensed) to the source"
                )
        return self
