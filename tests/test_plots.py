"""Stage figures: valid PNGs, one line per loss term, no accuracy figure without accuracies."""
from __future__ import annotations

import gc
import io
import weakref
from pathlib import Path

import matplotlib.image

from pipeline.plots import ACCURACY_FILE, LOSS_FILE, accuracy_figure, loss_figure, png_bytes, write_plots
from tests.test_logfiles import paraphraser_log, student_log

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_loss_figure_has_the_total_and_one_line_per_term() -> None:
    lines = loss_figure(student_log()).axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["train loss", "ce", "kd"]


def test_accuracy_figure_draws_three_splits() -> None:
    labels = [line.get_label() for line in accuracy_figure(student_log()).axes[0].get_lines()]
    assert labels == ["train", "validation", "test", "best on validation"]


def test_write_plots_writes_readable_pngs_and_no_temporary_files(tmp_path: Path) -> None:
    written = write_plots(student_log(), tmp_path)
    assert written == [tmp_path / LOSS_FILE, tmp_path / ACCURACY_FILE]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([LOSS_FILE, ACCURACY_FILE])
    for path in written:
        assert path.read_bytes().startswith(PNG_SIGNATURE)
        assert matplotlib.image.imread(path).ndim == 3


def test_paraphraser_gets_no_accuracy_figure(tmp_path: Path) -> None:
    assert accuracy_figure(paraphraser_log()) is None
    assert write_plots(paraphraser_log(), tmp_path) == [tmp_path / LOSS_FILE]
    assert [path.name for path in tmp_path.iterdir()] == [LOSS_FILE]


def test_log_without_epochs_draws_nothing(tmp_path: Path) -> None:
    assert write_plots(student_log(epochs=0, best_epoch=None), tmp_path) == []


def test_a_drawn_figure_is_freed_with_its_last_reference() -> None:
    figure = loss_figure(student_log())
    png_bytes(figure)
    reference = weakref.ref(figure)
    del figure
    gc.collect()
    assert reference() is None


def test_png_bytes_reads_back() -> None:
    image = matplotlib.image.imread(io.BytesIO(png_bytes(loss_figure(student_log()))))
    assert image.shape[0] > 100 and image.shape[1] > 100
