"""The run record's JSON: what ``status``, ``logs``, ``stop`` and ``restart`` read back."""

from __future__ import annotations

import dataclasses
import json

from remote_runner.runrecord import SCHEMA, ComponentRecord, HostRecord, RunRecord


def _record(tmp_path) -> RunRecord:
    record = RunRecord("20261202-030000-abcd", directory=str(tmp_path / "run"),
                       config={"path": "/x/experiment.py"}, options={"forks": 64, "hosts": ("a", "b")})
    record.hosts["h1"] = HostRecord("h1", "root@h1:22", jump=["j1"], state_dir="/s", run_dir="/s/r")
    record.components.append(ComponentRecord(
        "h1", "server", "server", "/opt/b", "/bin/srv", args=["-p", "80"], env={"K": "v"},
        files=[["/local/a", "a", 420]], pid=123, state="running"))
    return record


def test_the_record_is_written_as_asdict_would_and_reads_back(tmp_path):
    record = _record(tmp_path)
    expected = dataclasses.asdict(record)  # the documented shape: every field, nested as dicts
    expected.pop("directory")
    assert json.loads(json.dumps(record.to_json())) == json.loads(json.dumps({"schema": SCHEMA,
                                                                            **expected}))
    path = record.save()
    with open(path, encoding="utf-8") as handle:
        again = RunRecord.from_json(json.load(handle), directory=str(tmp_path / "run"))
    assert again.components == record.components and again.hosts == record.hosts
    assert again.run_id == record.run_id and again.options["hosts"] == ["a", "b"]


def test_a_components_files_taken_from_its_spec_are_written_as_plain_rows(tmp_path):
    from types import SimpleNamespace

    from remote_runner.runrecord import PlainRows, component_record

    record = _record(tmp_path)
    files = [SimpleNamespace(src=f"/local/f{i}", dest=f"d/f{i}", is_dir=False) for i in range(3)]
    spec = SimpleNamespace(name="client", executable="/bin/c", args=(), env={}, files=files, results=(),
                           ready=None, ready_timeout=60.0, settle=2.5, start_index=2,
                           wait=False, mirror=False)
    rec = component_record(record, "h2", spec, "client", "/opt/c")
    assert type(rec.files) is PlainRows and rec.files == [[f.src, f.dest, False] for f in files]
    assert component_record(record, "h2", spec, "client", "/opt/c") is rec  # added once
    written = json.loads(json.dumps(record.to_json()))
    assert written["components"][-1]["files"] == [[f"/local/f{i}", f"d/f{i}", False] for i in range(3)]
    with open(record.save(), encoding="utf-8") as handle:
        again = RunRecord.from_json(json.load(handle), directory=str(tmp_path / "run"))
    assert again.components[-1].files == rec.files and again.components[-1].settle == 2.5
