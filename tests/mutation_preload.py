"""pytest plugin for mutation runs only (``-p tests.mutation_preload`` in ``[tool.mutmut]``).

mutmut forks one process per mutant from a server that has collected the tests. Importing the heavy
libraries here, in that server, spares every mutant its own 3-5 s of imports (torch, MONAI, highdicom).
Nothing is computed: a fork after torch has run an operation can deadlock on its thread pool. It also
orders the tests so that the cheap ones run first (see COST_ORDER).
"""

import highdicom  # noqa: F401
import monai.transforms  # noqa: F401
import pydicom  # noqa: F401
import pytest
import SimpleITK  # noqa: F401
import torch  # noqa: F401

#: test modules in the order a mutant meets them. mutmut runs the tests that cover the mutated function
#: fastest *call* first and stops at the first failure (-x), but a call's time leaves out its fixtures: tests
#: whose module fixtures ingest, train or score (seconds) came first and every killed mutant paid for them.
#: Hand-derived unit checks come first now; within a module mutmut's order is kept (the sort is stable).
COST_ORDER = (
    "test_dicom_geometry", "test_metrics_", "test_dicom_frames", "test_dicom_sr", "test_deid_engine",
    "test_training_library", "test_dicom_writers", "test_deid.py", "test_detection_geometry",
    "test_ingest_adversarial", "test_stage_segmenter", "test_score.py", "test_chest_ct", "test_deid_workflows",
)


def _rank(item: pytest.Item) -> int:
    return next((i for i, name in enumerate(COST_ORDER) if name in item.nodeid), len(COST_ORDER))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=_rank)
