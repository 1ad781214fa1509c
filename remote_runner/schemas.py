"""JSON Schemas of the documents ``--json`` prints: the plan and the run result.

Scripts, CI jobs and notebooks read these documents, so their keys are a contract: a key is
never renamed or given another type within one ``schema`` version (``remote-runner/plan/1``,
``remote-runner/run/1``); new keys may appear. The schemas live here, as data, so the tests
validate real output against exactly what the README documents.
"""

from __future__ import annotations

from typing import Any, Dict

_HOP: Dict[str, Any] = {
    "type": "object",
    "required": ["name", "user", "address", "port", "host_key", "target"],
    "properties": {
        "name": {"type": "string"},
        "user": {"type": "string"},
        "address": {"type": "string"},
        "port": {"type": "integer"},
        "host_key": {"enum": ["known", "unknown"]},
        "target": {"type": "string"},
    },
}

_INDEX = {"type": ["integer", "number"]}

PLAN_SCHEMA: Dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "remote-runner plan (--dry-run --json)",
    "type": "object",
    "required": ["schema", "config_file", "screen", "state_dir", "kill_previous", "terminate",
                 "connected", "hosts", "order"],
    "properties": {
        "schema": {"const": "remote-runner/plan/1"},
        "config_file": {"type": "string"},
        "screen": {"type": "string"},
        "state_dir": {"type": "string"},
        "kill_previous": {"type": "boolean"},
        "terminate": {"type": "boolean"},
        "connected": {"type": "boolean", "description": "whether the hosts were asked"},
        "hosts": {"type": "array", "items": {
            "type": "object",
            "required": ["host", "local", "route", "jumps", "proxy_command", "checked", "problem",
                         "files", "windows", "copy_files", "copy_bytes"],
            "properties": {
                "host": {"type": "string"},
                "local": {"type": "boolean"},
                "route": {"oneOf": [{"type": "null"}, _HOP]},
                "jumps": {"type": "array", "items": _HOP},
                "proxy_command": {"type": ["string", "null"]},
                "checked": {"type": "boolean"},
                "problem": {"type": ["string", "null"]},
                "copy_files": {"type": "integer", "minimum": 0},
                "copy_bytes": {"type": "integer", "minimum": 0},
                "files": {"type": "array", "items": {
                    "type": "object",
                    "required": ["src", "dest", "size", "mode", "components", "reason", "copy"],
                    "properties": {
                        "src": {"type": "string"},
                        "dest": {"type": "string"},
                        "size": {"type": "integer", "minimum": 0},
                        "mode": {"type": "string", "pattern": "^[0-7]{4}$"},
                        "components": {"type": "array", "items": {"type": "string"}},
                        "reason": {"enum": ["missing", "size", "mode", "hash", "always-copy",
                                            "unchanged", "not checked",
                                            "missing (new temporary base_dir)"]},
                        "copy": {"type": "boolean"},
                    },
                }},
                "windows": {"type": "array", "items": {
                    "type": "object",
                    "required": ["host", "name", "start_index", "argv", "cwd", "wait", "mirror"],
                    "properties": {
                        "host": {"type": "string"},
                        "name": {"type": "string"},
                        "start_index": _INDEX,
                        "argv": {"type": "array", "items": {"type": "string"}},
                        "cwd": {"type": "string"},
                        "wait": {"type": "boolean"},
                        "mirror": {"type": "boolean"},
                    },
                }},
            },
        }},
        "order": {"type": "array", "items": {
            "type": "object",
            "required": ["start_index", "components"],
            "properties": {"start_index": _INDEX,
                           "components": {"type": "array", "items": {"type": "string"}}},
        }},
    },
}

_SECONDS = {"type": ["number", "null"], "minimum": 0}
_TIME = {"type": ["string", "null"]}

RUN_SCHEMA: Dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "remote-runner run result (--json)",
    "type": "object",
    "required": ["schema", "run_id", "config_file", "screen", "result", "exit_code", "error",
                 "started_at", "finished_at", "seconds", "phases", "hosts", "components"],
    "properties": {
        "schema": {"const": "remote-runner/run/1"},
        "run_id": {"type": ["string", "null"],
                   "description": "the run record's id where runs are recorded, else null"},
        "config_file": {"type": "string"},
        "screen": {"type": "string"},
        "result": {"enum": ["ok", "failed"]},
        "exit_code": {"type": "integer"},
        "error": {"type": ["string", "null"]},
        "started_at": {"type": "string"},
        "finished_at": {"type": "string"},
        "seconds": {"type": "number", "minimum": 0},
        "phases": {"type": "array", "items": {
            "type": "object", "required": ["name", "seconds"],
            "properties": {"name": {"enum": ["connect", "prepare", "copy", "start", "wait",
                                             "terminate"]},
                           "seconds": {"type": "number", "minimum": 0}},
        }},
        "hosts": {"type": "array", "items": {
            "type": "object",
            "required": ["host", "connected", "error", "session", "state_dir", "files_copied",
                         "files_unchanged", "bytes_copied", "started", "ready", "failed"],
            "properties": {
                "host": {"type": "string"},
                "connected": {"type": ["boolean", "null"]},
                "error": {"type": ["string", "null"]},
                "session": {"type": ["string", "null"]},
                "state_dir": {"type": ["string", "null"]},
                "files_copied": {"type": "integer", "minimum": 0},
                "files_unchanged": {"type": "integer", "minimum": 0},
                "bytes_copied": {"type": "integer", "minimum": 0},
                "started": {"type": "integer", "minimum": 0},
                "ready": {"type": "integer", "minimum": 0},
                "failed": {"type": "integer", "minimum": 0},
                "execs": {"type": ["integer", "null"], "minimum": 0},
                "steps": {"type": ["integer", "null"], "minimum": 0},
                "sftp_sessions": {"type": ["integer", "null"], "minimum": 0},
                "sftp_requests": {"type": ["integer", "null"], "minimum": 0},
            },
        }},
        "components": {"type": "array", "items": {
            "type": "object",
            "required": ["host", "name", "start_index", "wait", "mirror", "base_dir", "pid",
                         "exit_status", "failure", "terminated", "outcome", "started_at",
                         "ended_at", "seconds", "last_log_line"],
            "properties": {
                "host": {"type": "string"},
                "name": {"type": "string"},
                "start_index": _INDEX,
                "wait": {"type": "boolean"},
                "mirror": {"type": "boolean"},
                "base_dir": {"type": ["string", "null"]},
                "pid": {"type": ["integer", "null"]},
                "exit_status": {"type": ["integer", "null"]},
                "failure": {"type": ["string", "null"]},
                "terminated": {"type": "boolean"},
                "outcome": {"enum": ["not started", "running", "exited", "failed", "terminated"]},
                "started_at": _TIME,
                "ended_at": _TIME,
                "seconds": _SECONDS,
                "last_log_line": {"type": ["string", "null"]},
            },
        }},
    },
}
