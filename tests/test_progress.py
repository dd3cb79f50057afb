"""The one progress bar (flows/progress.py) that extraction (samples) and training (steps, loss) show."""

from __future__ import annotations

from pflatents.flows.progress import bar


def test_bar_counts_samples_and_shows_the_last_loss(capsys):
    with bar(4, "training", fields=("loss",)) as update:
        for i in range(1, 5):  # field updates are throttled, the last one always shows
            update(completed=i, loss=f"{1 / i:.4f}")
    with bar(10, "encoding") as update:
        update(advance=4)
        update(advance=6)
    captured = capsys.readouterr()
    assert captured.out == ""  # the bar goes to stderr: stdout keeps the command's result
    out = captured.err
    assert "training" in out and "4/4" in out and "loss 0.2500" in out
    assert "encoding" in out and "10/10" in out


def test_disabled_bar_prints_nothing(capsys):
    with bar(5, "encoding", disabled=True) as update:
        update(advance=5)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
