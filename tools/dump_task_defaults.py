"""Print every registered task's resolved spec defaults as JSON (field -> default, the task's
own field set): ``tests/data/task_defaults.json`` is this output, taken before the shared spec
fields were declared once (issue 13), and tests/model/test_hygiene.py checks it still holds.

Run: ``DIFFEDITOR_DISABLE_PLUGINS=1 python tools/dump_task_defaults.py > tests/data/task_defaults.json``
"""

from __future__ import annotations

import json
import sys


def resolved_defaults(registry) -> dict:
    from pydantic_core import PydanticUndefined

    out = {}
    for name, task in sorted(registry.tasks.items()):
        fields = {}
        for key, f in task.spec_model.model_fields.items():
            value = f.get_default(call_default_factory=True)
            if value is PydanticUndefined:
                value = "<required>"
            elif hasattr(value, "model_dump"):
                value = value.model_dump(mode="json")
            fields[key] = value
        out[name] = json.loads(json.dumps(fields, default=str))
    return out


if __name__ == "__main__":
    from diffeditor.plugins import get_registry

    json.dump(resolved_defaults(get_registry()), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
