"""The preparation progress bar (datamodules/progress.py) shows on a terminal only and never changes the items."""
import io
import sys

from datamodules.progress import progress


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bar_is_drawn_on_a_terminal_and_items_are_unchanged():
    stream = FakeTTY()
    items = list(progress(iter(["a", "b", "c"]), total=3, desc="decoding", file=stream))
    assert items == ["a", "b", "c"]
    out = stream.getvalue()
    assert "decoding" in out and "/3" in out, out  # a tqdm bar with the description and the total


def test_bar_is_off_when_the_stream_is_not_a_terminal():
    stream = io.StringIO()  # isatty() is False, as for pytest capture, CI and redirected logs
    assert list(progress(range(4), total=4, desc="decoding", file=stream)) == [0, 1, 2, 3]
    assert stream.getvalue() == ""


def test_default_stream_is_stderr(monkeypatch):
    tty, plain = FakeTTY(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", tty)
    assert list(progress([1, 2], total=2, desc="scan")) == [1, 2]
    assert "scan" in tty.getvalue()
    monkeypatch.setattr(sys, "stderr", plain)
    assert list(progress([1, 2], total=2, desc="scan")) == [1, 2]
    assert plain.getvalue() == ""
