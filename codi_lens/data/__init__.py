"""Data: problems (:mod:`~codi_lens.data.problems`), where they come from (:mod:`~codi_lens.data.sources`),
the synthetic generator of the shipped models (:mod:`~codi_lens.data.synthetic`) and clean/corrupted pairs
(:mod:`~codi_lens.data.pairs`). Imports the core and the registry of shipped assets only.
"""

from codi_lens.data.problems import (
    DIFFICULTY_BUCKETS,
    DataError,
    Problem,
    difficulty_bucket,
    problem_from_record,
    problems_fingerprint,
    problems_frame,
    stratified_sample,
)
from codi_lens.data.sources import load_problems, shipped_dataset_text

__all__ = [
    "DIFFICULTY_BUCKETS",
    "DataError",
    "Problem",
    "difficulty_bucket",
    "load_problems",
    "problem_from_record",
    "problems_fingerprint",
    "problems_frame",
    "shipped_dataset_text",
    "stratified_sample",
]
