"""The JSON shapes of the HTTP API: what a request may hold and what comes back.

pydantic checks every field (types, ranges, unknown names) and FastAPI writes the OpenAPI
description from these same classes, so the two cannot drift apart. Limits that the operator sets
when starting the server (how many labels, how large an upload) are checked by the engine, not here.
"""

from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class ImageData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="The image file's bytes, base64-encoded (standard alphabet).")
    name: Optional[str] = Field(
        None, description='Echoed as the row\'s "path"; default image-N (N counts from 0).'
    )


class ClassifyBody(BaseModel):
    """POST /v1/classify as JSON. As multipart/form-data: `images` file parts (the file name is
    echoed as the row's path), then either `labels` once per label and the other fields as form
    fields, or one field `request` holding the other fields as a JSON object."""

    model_config = ConfigDict(extra="forbid")

    images: list[Union[ImageData, str]] = Field(
        default_factory=list,
        description="Images: objects, or bare base64 strings (named image-N).",
    )
    labels: list[str] = Field(description="Class names in words, e.g. ['corgi', 'jazz album'].")
    templates: Union[str, list[str], None] = Field(
        None,
        description="A template set's name (see GET /v1/models) or the templates themselves, "
        "each with {} where the label goes. Default: the model's own set, else photo.",
    )
    top_k: int = Field(5, ge=1, description="Labels listed per image.")
    multi_label: bool = Field(
        False, description="Score each label on its own (sigmoid) instead of a softmax."
    )
    threshold: Optional[float] = Field(
        None,
        ge=-1.0,
        le=1.0,
        description="multi_label only: the cosine at which a label's score is 0.5 "
        "(default: the model's, else 0.25).",
    )
    min_score: Optional[float] = Field(
        None,
        ge=0.0,
        le=1.0,
        description='A best score below this gives "label": null and "score": null ("none of '
        'these"); top is still listed.',
    )
    exact_preprocess: bool = Field(
        False, description="Decode JPEGs at full size (the reference preprocessing)."
    )


class EmbedBody(BaseModel):
    """POST /v1/embed as JSON. As multipart/form-data: `images` file parts, and `texts` fields or
    one field `request` holding the other fields as a JSON object."""

    model_config = ConfigDict(extra="forbid")

    images: list[Union[ImageData, str]] = Field(default_factory=list)
    texts: list[str] = Field(default_factory=list, description="Texts, embedded as they are.")
    exact_preprocess: bool = False


class TopEntry(BaseModel):
    label: str
    score: float


class PredictionRow(BaseModel):
    """Exactly a `zsclip classify --format jsonl` row: path, label, score, top -- or path, error."""

    path: str
    label: Optional[str] = None
    score: Optional[float] = None
    top: Optional[list[TopEntry]] = None
    error: Optional[str] = None


class ClassifyAnswer(BaseModel):
    model: str
    rows: list[PredictionRow]
    warnings: list[str] = Field(default_factory=list)


class EmbeddingRow(BaseModel):
    """Exactly a `zsclip embed --format jsonl` row: path or text, and embedding (unit length,
    float32 values) -- or path, error."""

    path: Optional[str] = None
    text: Optional[str] = None
    embedding: Optional[list[float]] = None
    error: Optional[str] = None


class EmbedAnswer(BaseModel):
    model: str
    rows: list[EmbeddingRow]


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable, for programs: e.g. queue_full, too_many_labels.")
    message: str = Field(description="One line for people, naming the fix.")


class ErrorAnswer(BaseModel):
    error: ErrorDetail
