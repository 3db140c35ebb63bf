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
    part: str = ""  # set when a radiograph series is analysed in parts (one per image): the image's SOP UID
    sop_instance_uids: dict[Path, str] = field(default_factory=dict, compare=False)  # as indexed at receipt


def split_radiographs(item: SeriesFiles) -> list[SeriesFiles]:
    """A CR/DX series is analysed one image per part: radiographs are independent images (a PA and a lateral, or
    repeated exposures), each gets its own SEG, heatmap and report. (A SEG without a Frame of Reference, which a
    projection radiograph has none of, holds a single frame, so several same-size images cannot share one.) The
    part is named by the image's SOP Instance UID as received, so a re-run derives the same result UIDs. A CT
    series is never split."""
    if item.modality not in RADIOGRAPH_MODALITIES or len(item.paths) < 2:
        return [item]
    return [
        SeriesFiles(
            item.series_instance_uid,
            item.modality,
            [path],
            item.sop_instance_uids.get(path, path.stem),
            {path: item.sop_instance_uids[path]} if path in item.sop_instance_uids else {},
        )
        for path in item.paths
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
        for part in split_radiographs(
            SeriesFiles(uid, modality, paths, sop_instance_uids={p: sop_uids[p] for p in paths})
        )
    ]
    return sorted(found, key=lambda s: -len(s.paths))
