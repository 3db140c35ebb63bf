"""DICOM result objects written from an AnomalyResult with highdicom, one module per object.

`write_results` (writer.py) is the entry point. seg.py: the BINARY SEG and optional FRACTIONAL SEGs; sc.py: the
RGB Secondary Capture heatmaps, whose pixels heatmap_render.py draws; sr.py: the TID 1500 report; common.py: what
they share (model identity, derived UIDs, the source images and the attributes copied from them).
"""

from db.models import ResultKind
from node.results.writer import ResultObject, write_results

__all__ = ["ResultKind", "ResultObject", "write_results"]
