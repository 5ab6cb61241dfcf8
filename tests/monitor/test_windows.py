"""Windows are defined by the data: blocks of N rows, or periods of the predictions' own time."""

from everloop.monitor import _windows


def test_row_windows_are_blocks_of_the_models_rows():
    # batches (seq, rows): 300 + 500 + 450 + 50 = 1300 rows in blocks of 500
    windows = _windows._row_windows([(3, 300), (7, 500), (9, 450), (12, 50)], 500)
    assert [(w.index, w.rows, w.complete, w.first_seq, w.skip) for w in windows] == [
        (0, 500, True, 3, 0), (1, 500, True, 7, 200), (2, 300, False, 9, 200)]
    assert windows[1].key == "rows:500:1"


def test_time_windows_are_periods_of_the_datas_time():
    hour = 3600.0
    found = [(1, 10 * hour + 5, 100), (2, 10 * hour + 1800, 50), (3, 11 * hour + 10, 70), (4, 13 * hour + 1, 5)]
    windows = _windows._time_windows(found, 60)
    assert [(w.index, w.rows, w.complete) for w in windows] == [(10, 150, True), (11, 70, True), (13, 5, False)]
    assert windows[0].start == 10 * hour and windows[0].end == 11 * hour
