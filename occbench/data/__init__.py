"""Dataset readers: every format yields the same Sample type.

    from occbench.data import open_dataset
    ds = open_dataset("demo")            # or "3dpw", "3dpw-occ", "3doh", "h36m-p1", "h36m-p2",
    sample = ds[0]                       # "3dpw-humandata", a SPIN/HumanData .npz path, a folder

Per-sample problems raise :class:`BadSample` (a UserError with ``sample_id``) so a run can skip them.
"""
from occbench.data.base import BadSample, Dataset, Records
from occbench.data.catalog import DEFAULT_DATASET, KNOWN_DATASETS, dataset_status, known_dataset_names, open_dataset
from occbench.data.sample import Sample

__all__ = ["BadSample", "Dataset", "Records", "Sample", "open_dataset", "DEFAULT_DATASET", "KNOWN_DATASETS",
           "dataset_status", "known_dataset_names"]
