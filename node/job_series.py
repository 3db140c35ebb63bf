"""What a job analyses: the study's source image series, as file lists, in the order the worker runs them."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from db.jobs import ClaimedJob, source_instances
from db.session import Database
from node.config import RoutingRule
from node.spool import Spool

IMAGE_MODALITIES = ("CT", "CR", "DX")
RADIOGRAPH_MODALITIES = ("CR", "DX")


@dataclass(frozen=True)
class SeriesFiles:
    series_instance_uid: str
    modality: str
    paths: list[Path]
    part: str = ""  # set when a radiograph series is analysed in parts (images of different sizes)
    sop_instance_uids: dict[Path, str] = field(default_factory=dict, compare=False)  # as indexed at receipt


def split_radiographs_by_size(item: SeriesFiles) -> list[SeriesFiles]:
    """A CR/DX series may hold views of different sizes (a PA and a lateral on other cassettes): each size is
    analysed as its own part, since radiographs are independent images. A CT series is never split."""
    if item.modality not in RADIOGRAPH_MODALITIES or len(item.paths) < 2:
        return [item]
    import pydicom

    by_size: dict[tuple[int, int], list[Path]] = defaultdict(list)
    for path in item.paths:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
            by_size[(int(header.Rows), int(header.Columns))].append(path)
        except Exception:  # noqa: BLE001 - unreadable here: the loader says what is wrong with it
            return [item]
    if len(by_size) == 1:
        return [item]
    return [
        SeriesFiles(item.series_instance_uid, item.modality, paths, f"{r}x{c}", item.sop_instance_uids)
        for (r, c), paths in by_size.items()
    ]


def modalities_to_process(rule: RoutingRule | None) -> tuple[str, ...]:
    """The image modalities a job analyses: its rule's (an empty list means any) that the model handles."""
    wanted = rule.modalities if rule is not None and rule.modalities else IMAGE_MODALITIES
    return tuple(m for m in wanted if m in IMAGE_MODALITIES)


def series_to_process(db: Database, spool: Spool, job: ClaimedJob, modalities: tuple[str, ...]) -> list[SeriesFiles]:
    """The study's source image series (never the node's own output), largest first."""
    with db.session() as session:
        instances = source_instances(session, job.study_id, modalities)
    grouped: dict[tuple[str, str], list[Path]] = defaultdict(list)
    sop_uids: dict[Path, str] = {}
    for instance in instances:
        path = spool.path(instance.path)
        grouped[(instance.series_instance_uid, instance.modality)].append(path)
        sop_uids[path] = instance.sop_instance_uid
    found = [
        part
        for (uid, modality), paths in grouped.items()
        for part in split_radiographs_by_size(
            SeriesFiles(uid, modality, paths, sop_instance_uids={p: sop_uids[p] for p in paths})
        )
    ]
    return sorted(found, key=lambda s: -len(s.paths))
