"""The database schema, a contract other tools query, as versioned migrations.

Each migration is applied once, in a transaction, and recorded in `inferd_migrations`
(version, description, applied_at). Never edit a released migration: add the next version.
Statements are listed one by one (no executescript: it would commit behind our back).
"""

from __future__ import annotations

# (version, description, statements) per dialect; versions count up from 1 without gaps.
Migration = tuple[int, str, tuple[str, ...]]

_TIMINGS = ("queue_ms", "decode_ms", "batch_wait_ms", "infer_ms", "write_ms", "total_ms")


def _v1(*, key: str, real: str, text: str, stamp: str, json: str) -> tuple[str, ...]:
    timings = "".join(f",\n    {name} {real}" for name in _TIMINGS)
    return (
        f"""CREATE TABLE images (
    id {key},
    source {text} NOT NULL UNIQUE,
    status {text} NOT NULL CHECK (status IN ('done', 'failed')),
    reason {text},
    message {text},
    width INTEGER,
    height INTEGER,
    model {text},
    task {text},
    device {text},
    batch_size INTEGER,
    processed_at {stamp} NOT NULL{timings}
)""",
        "CREATE INDEX images_processed_at ON images (processed_at)",
        "CREATE INDEX images_status_reason ON images (status, reason)",
        f"""CREATE TABLE detections (
    id {key},
    image_id {"BIGINT" if json == "JSONB" else "INTEGER"} NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    class_id INTEGER NOT NULL,
    class_name {text} NOT NULL,
    confidence {real} NOT NULL,
    x1 {real} NOT NULL,
    y1 {real} NOT NULL,
    x2 {real} NOT NULL,
    y2 {real} NOT NULL,
    payload {json}
)""",
        "CREATE INDEX detections_image_id ON detections (image_id)",
        "CREATE INDEX detections_class_name ON detections (class_name, image_id)",
    )


SQLITE: tuple[Migration, ...] = (
    (1, "images and detections", _v1(key="INTEGER PRIMARY KEY", real="REAL", text="TEXT", stamp="TEXT", json="TEXT")),
)
POSTGRESQL: tuple[Migration, ...] = (
    (
        1,
        "images and detections",
        _v1(
            key="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
            real="DOUBLE PRECISION",
            text="TEXT",
            stamp="TIMESTAMPTZ",
            json="JSONB",
        ),
    ),
)

MIGRATIONS_TABLE = {
    "sqlite": "CREATE TABLE IF NOT EXISTS inferd_migrations "
    "(version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at TEXT NOT NULL)",
    "postgresql": "CREATE TABLE IF NOT EXISTS inferd_migrations "
    "(version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL)",
}
IMAGE_COLUMNS = (
    "source",
    "status",
    "reason",
    "message",
    "width",
    "height",
    "model",
    "task",
    "device",
    "batch_size",
    "processed_at",
    *_TIMINGS,
)
DETECTION_COLUMNS = ("image_id", "class_id", "class_name", "confidence", "x1", "y1", "x2", "y2", "payload")
