"""--no-progress, --json and --debug mean the same on every command that has work to show."""

from __future__ import annotations

import pytest

from pflatents.flows.cli import build_parser

# command line (without the flags) of each command that has work to show
WORK = {
    "extract": ["extract", "--data", "x.npy", "--model", "gmm:m.json", "--out", "o.zarr"],
    "resume": ["resume", "o.zarr"],
    "analyze": ["analyze", "o.zarr"],
    "train": ["train", "--data", "x.npy", "--out", "m"],
    "demo": ["demo"],
}
# commands whose output is data: --json prints it as JSON
DATA = {**{k: v for k, v in WORK.items() if k != "demo"}, "status": ["status", "o.zarr"],
        "verify": ["verify", "o.zarr"], "server status": ["server", "status"]}


@pytest.mark.parametrize("cmd", sorted(WORK))
def test_no_progress_and_debug_everywhere(cmd):
    ap = build_parser()
    a = ap.parse_args([*WORK[cmd], "--no-progress", "--debug"])
    assert a.no_progress is True and a.debug is True
    a = ap.parse_args(["--debug", *WORK[cmd]])  # before the subcommand: the same
    assert a.debug is True and a.no_progress is False
    assert ap.parse_args(WORK[cmd]).debug is False


@pytest.mark.parametrize("cmd", sorted(DATA))
def test_json_where_output_is_data(cmd):
    ap = build_parser()
    assert ap.parse_args([*DATA[cmd], "--json"]).json is True
    assert ap.parse_args(DATA[cmd]).json is False


def test_every_subcommand_takes_debug():
    ap = build_parser()
    for line in (["server", "stop", "--debug"], ["server", "start", "--debug"], ["verify", "s", "--debug"]):
        assert ap.parse_args(line).debug is True
