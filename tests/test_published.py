"""Published reference numbers: the data file, and the report's published and difference columns."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.report import PUBLISHED_FILE, Published, Reference, ReportError, aggregate, load_published, to_csv, to_markdown

CRD_PAIRS = [("resnet56", "resnet20"), ("resnet110", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4")]


def row(teacher: str, student: str, method: str, seed: int, top1_last: float | None, **fields: Any) -> dict[str, Any]:
    role = "teacher" if method == "teacher" else "student"
    result = {} if top1_last is None else {"top1_last": top1_last}
    return {"dataset": "cifar100", "teacher": teacher, "student": student, "method": method, "seed": seed, "role": role, **result, **fields}


def test_the_data_file_loads_and_every_entry_names_a_described_source() -> None:
    data = json.loads(PUBLISHED_FILE.read_text(encoding="utf-8"))
    assert data["entries"]
    for index, entry in enumerate(data["entries"]):
        assert entry["source"] in data["sources"], f"entries[{index}] names no described source"
        assert 0 < entry["top1"] < 100
    for source in data["sources"].values():
        assert source["paper"] and source["table"] and source["read_from"]
    assert len(load_published().references) == len(data["entries"])


def test_the_crd_table_covers_teacher_vanilla_and_kd_of_each_pair() -> None:
    references = load_published().references
    for teacher, student in CRD_PAIRS:
        for method in ("teacher", "vanilla", "kd"):
            assert references[("cifar100", teacher, student, method)].source == "crd_table1"
    assert references[("cifar100", "resnet110", "resnet32", "teacher")].top1 == 74.31
    assert references[("cifar100", "resnet32x4", "resnet8x4", "dkd")] == Reference(76.32, None, "dkd_cifar100")


def test_a_row_with_a_published_cell_shows_it_and_the_difference() -> None:
    table = aggregate([row("resnet56", "resnet20", "kd", 0, 71.0), row("resnet56", "resnet20", "kd", 1, 71.5)])
    assert table[0].published == Reference(70.66, None, "crd_table1")
    assert table[0].difference == pytest.approx(0.59)
    markdown = to_markdown(table)
    assert "| kd | 2 | 71.25 ± 0.35 | - | - | - | - | 70.66 | +0.59 |" in markdown
    assert "- `crd_table1`: Tian, Krishnan & Isola" in markdown
    record = next(csv.DictReader(io.StringIO(to_csv(table))))
    assert (float(record["published_top1"]), record["published_source"]) == (70.66, "crd_table1")
    assert float(record["top1_last_minus_published"]) == pytest.approx(0.59)


def test_a_row_without_a_published_cell_shows_dashes() -> None:
    table = aggregate([row("resnet56", "resnet20", "tucker", 0, 70.0), row("resnet32x4", "resnet8x4", "teacher", 0, 79.0)])
    tucker, teacher = table
    assert tucker.published is None and tucker.difference is None
    assert "| tucker | 1 | 70.00 | - | - | - | - | - | - |" in to_markdown(table)
    assert "| teacher | 1 | 79.00 | - | - | - | - | 79.42 | -0.42 |" in to_markdown(table)
    record = next(csv.DictReader(io.StringIO(to_csv(table))))
    assert (record["published_top1"], record["top1_last_minus_published"], record["published_source"]) == ("", "", "")


def test_a_pending_row_shows_the_published_value_but_no_difference() -> None:
    line = aggregate([row("resnet110", "resnet32", "dkd", 0, None)])[0]
    assert (line.published.top1, line.difference) == (74.11, None)
    assert "| dkd | 0 (+1 pending) | pending | pending | pending | pending | - | 74.11 | - |" in to_markdown([line])


def test_labels_with_axis_values_match_the_published_cell_of_their_method() -> None:
    rows = [row("resnet56 [teacher.lr=0.1]", "resnet20", "dist student.lr=0.01", 0, 72.0)]
    assert aggregate(rows)[0].published == Reference(71.75, 0.3, "dist_cifar100")
    assert "| 71.75 ± 0.30 | +0.25 |" in to_markdown(aggregate(rows))


def test_an_entry_naming_an_unknown_source_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "published.json"
    path.write_text(json.dumps({"sources": {"crd_table1": {"paper": "p", "table": "t"}}, "entries": [
        {"dataset": "cifar100", "teacher": "resnet56", "student": "resnet20", "method": "kd", "top1": 70.0, "source": "crd"},
    ]}))
    with pytest.raises(ReportError, match=r"published.json: entries\[0\].source: 'crd' is not one of crd_table1"):
        load_published(path)


def test_a_report_can_be_given_other_references() -> None:
    published = Published({("cifar100", "resnet56", "resnet20", "kd"): Reference(60.0, None, "mine")}, {"mine": "my paper, table 2"})
    table = aggregate([row("resnet56", "resnet20", "kd", 0, 61.0)], published)
    assert table[0].difference == pytest.approx(1.0)
    assert "- `mine`: my paper, table 2" in to_markdown(table, published)
