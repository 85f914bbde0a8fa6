"""pytest plugin for mutation runs only (``-p tests.mutation_preload`` in ``[tool.mutmut]``).

mutmut forks one process per mutant from a server that has collected the tests. Importing the heavy
libraries here, in that server, spares every mutant its own 3-5 s of imports (torch, MONAI, highdicom).
Nothing is computed: a fork after torch has run an operation can deadlock on its thread pool.
"""

import highdicom  # noqa: F401
import monai.transforms  # noqa: F401
import pydicom  # noqa: F401
import SimpleITK  # noqa: F401
import torch  # noqa: F401
