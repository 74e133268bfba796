"""Validate every golden envelope in sagas/tests/golden against its JSON Schema in docs/schemas."""
import json
import pathlib
import sys

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

root = pathlib.Path(__file__).resolve().parent.parent
schemas = {p.name: json.loads(p.read_text()) for p in (root / "docs/schemas").glob("*.schema.json")}
registry = Registry().with_resources(
    (s["$id"], Resource.from_contents(s)) for s in schemas.values()
).with_resources((name, Resource.from_contents(s)) for name, s in schemas.items())

which = {
    "command": "command", "compensation": "command", "command_with_progress": "command", "heartbeat": "heartbeat",
    "reply_success": "reply", "reply_rejected": "reply", "reply_transient_failure": "reply",
    "start": "start", "event": "event",
    "lifecycle_completed": "lifecycle", "lifecycle_step_failed": "lifecycle", "lifecycle_stopped": "lifecycle",
}
failed = 0
goldens = sorted((root / "sagas/tests/golden").glob("*.json"))
for g in goldens:
    kind = which.get(g.stem)
    if kind is None:
        print(f"{g.name}: no schema assigned in .ci/check_schemas.py")
        failed += 1
        continue
    validator = Draft202012Validator(schemas[f"{kind}.schema.json"], registry=registry)
    for err in validator.iter_errors(json.loads(g.read_text())):
        print(f"{g.name}: {err.json_path}: {err.message}")
        failed += 1
# a bad envelope must fail, or the check proves nothing
bad = json.loads((root / "sagas/tests/golden/reply_success.json").read_text())
bad["body"] = {"type": "maybe"}
if not list(Draft202012Validator(schemas["reply.schema.json"], registry=registry).iter_errors(bad)):
    print("reply schema accepted an unknown outcome")
    failed += 1
bad = json.loads((root / "sagas/tests/golden/heartbeat.json").read_text())
bad["body"]["done"] = True
if not list(Draft202012Validator(schemas["heartbeat.schema.json"], registry=registry).iter_errors(bad)):
    print("heartbeat schema accepted a body with another field")
    failed += 1
print(f"schemas: {len(goldens)} golden envelopes checked, {failed} problems")
sys.exit(1 if failed else 0)
